"""`QuantizedLinear`: a frozen nn.Linear whose weight is stored quantized (NF4 or int8).

The weight is dequantized on the fly, one layer at a time, in forward and again in backward (the
input gradient needs W; nothing dequantized is kept between the two, so a step never holds more
than one layer's float weight). The weight never gets a gradient; LoRA's A and B, wrapped around
this module by the `quantized` layer kind, are what trains.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

import lorafit.quant.int8  # noqa: F401  (registers the int8 backends)
import lorafit.quant.nf4  # noqa: F401  (registers the NF4 backends)
from lorafit.quant.backends import Backend, Storage, pick_backend

_PREFIX = "q_"


class _QuantizedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        ctx.module = module
        if module.keep_dequantized:  # only under activation checkpointing: see QuantizedLinear
            w = module.dequantize(x.dtype)  # (out, in)
            ctx.save_for_backward(w)
            return torch.nn.functional.linear(x, w)  # (..., out)
        ctx.save_for_backward()
        return module.backend.linear(x, module.storage(), x.dtype)  # (..., out)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved = ctx.saved_tensors
        w = saved[0] if saved else ctx.module.dequantize(dy.dtype)  # (out, in)
        return dy @ w.to(dy.dtype), None  # (..., out) @ (out, in) -> (..., in)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored by a quantization backend; computes in `compute_dtype`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        backend: Backend,
        storage: Storage,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend, self.compute_dtype = backend, compute_dtype
        self._static = {k: v for k, v in storage.items() if not torch.is_tensor(v)}
        for key, value in storage.items():
            if torch.is_tensor(value):
                # Not persistent: a state_dict (and so a checkpoint) never holds the base weights.
                self.register_buffer(_PREFIX + key, value, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), False)
        self.keep_dequantized = False
        """Keep the dequantized weight from forward for backward. Right only under activation
        checkpointing (set by train.step.prepare_for_training): there the first forward keeps
        nothing, and the recompute's copy lives just until this layer's backward, so each step
        dequantizes twice instead of three times for one layer's weight of memory. Without
        checkpointing it would keep every layer's float weight: the whole model unquantized."""

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scheme: str,
        device: torch.device | str = "cpu",
        library: str = "auto",
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> QuantizedLinear:
        """Quantize an (out, in) weight on `device` (`library`: auto, bitsandbytes or torchao);
        the layer computes in `compute_dtype`."""
        backend = pick_backend(scheme, device, library)
        # Always from fp32: the stored codes and scales then depend on the checkpoint only, not
        # on the compute dtype, so a base quantized for bf16 training and one quantized again at
        # merge time in fp32 are the same base.
        w = weight.detach().to(device=device, dtype=torch.float32)
        out_features, in_features = w.shape
        bias = None if bias is None else bias.detach().to(device)
        return cls(in_features, out_features, backend, backend.quantize(w), bias, compute_dtype)

    @property
    def scheme(self) -> str:
        return self.backend.scheme

    def storage(self) -> Storage:
        tensors = {
            name[len(_PREFIX) :]: buf
            for name, buf in self._buffers.items()
            if name.startswith(_PREFIX)
        }
        return {**tensors, **self._static}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) float weight (a new tensor)."""
        return self.backend.dequantize(self.storage(), dtype or self.compute_dtype)

    def nbytes(self) -> int:
        """Bytes the quantized weight (and bias) occupy."""
        own = sum(_tensor_bytes(b) for b in self._buffers.values() if b is not None)
        return own + (0 if self.bias is None else self.bias.nbytes)

    def _apply(self, fn, recurse: bool = True):
        # Device moves apply; dtype casts (model.half(), .to(bf16)) must not touch the quantized
        # storage (its code tables and scales have fixed dtypes) nor the compute dtype.
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        if self.bias is not None:
            moved = fn(self.bias.data)
            self.bias.data = self.bias.data.to(moved.device)
        return self

    @property
    def device(self) -> torch.device:
        return next(b for b in self._buffers.values() if b is not None).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = _QuantizedMatmul.apply(x.to(self.compute_dtype), self)  # (..., out)
            return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quantize={self.scheme} ({self.backend.library}), "
            f"compute_dtype={self.compute_dtype}"
        )


def _tensor_bytes(t: torch.Tensor) -> int:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) is not torch.Tensor:  # a torchao tensor subclass
        names, _ = inner()
        return sum(_tensor_bytes(getattr(t, n)) for n in names if torch.is_tensor(getattr(t, n)))
    return t.numel() * t.element_size()


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def quantizable(module: nn.Module) -> bool:
    """Whether `module` is a plain nn.Linear (subclasses may compute something else)."""
    return type(module) is nn.Linear


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def quantize_model(
    model: nn.Module,
    scheme: str,
    library: str = "auto",
    keep: Iterable[str] = (),
    compute_dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Replace every nn.Linear of `model` (except the module paths in `keep` and their children)
    by a QuantizedLinear, in place; returns how many. Checks first: a model without linear layers,
    or a scheme/backend that cannot run here, raises with the model untouched."""
    keep = set(keep)
    targets = [
        (path, m)
        for path, m in model.named_modules()
        if quantizable(m) and not any(path == k or path.startswith(k + ".") for k in keep)
    ]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layers to quantize "
            f"(besides the head); use model.quantize: none"
        )
    device = targets[0][1].weight.device
    pick_backend(scheme, device, library)  # fail before touching anything
    for path, m in targets:
        q = QuantizedLinear.quantize(
            m.weight, m.bias, scheme, m.weight.device, library, compute_dtype
        )
        _replace(model, path, q)
    return len(targets)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every QuantizedLinear by an nn.Linear with the dequantized weight, in place."""
    found = quantized_modules(model)
    for path, m in found:
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(m.dequantize(dtype), requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
        _replace(model, path, lin)
    return len(found)


def is_quantized(model: nn.Module) -> bool:
    return bool(quantized_modules(model))
