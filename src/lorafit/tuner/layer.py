"""The LoRA layer: a frozen base module plus any number of named low-rank updates.

    y = base(x) + scale * B(A(dropout(x)))          scale = alpha / r  (alpha / sqrt(r): rsLoRA)

One class, `LoraLayer`, serves every supported base (nn.Linear, GPT-2 Conv1D, nn.Embedding,
nn.Conv1d/2d/3d). The differences between them are confined to three small functions: how the
LoRA branch runs, how the base weight maps to an "out-major" matrix (rows = output features),
and how a delta in that layout is written back. Everything else (DoRA, merge, several adapters,
per-sample adapters) is written once against the out-major view.

Tensor shapes follow PEFT's so adapter files map one to one:
    linear / conv1d_gpt2: A (r, d_in)          B (d_out, r)
    embedding:            A (r, num_embeddings) B (embedding_dim, r)
    conv:                 A (r, c_in, *k)      B (c_out, r, 1, ...)
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # GPT-2 style Conv1D: a Linear whose weight is stored (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def layer_kind(module: nn.Module) -> str | None:
    """The LoRA flavour for a base module, or None when lorafit cannot wrap it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d_gpt2"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return None


def fan_dims(base: nn.Module) -> tuple[int, int]:
    """(fan_in, fan_out) of a wrappable module, as the A and B shapes see them."""
    w = base.weight
    if layer_kind(base) in ("linear", "conv"):
        return w.shape[1], w.shape[0]
    return w.shape[0], w.shape[1]  # Conv1D stores (in, out); Embedding (num, dim)


class LoraAdapter(nn.Module):
    """One adapter's tensors inside one LoraLayer."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float, dropout: float,
                 magnitude: torch.Tensor | None, r: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.magnitude = nn.Parameter(magnitude) if magnitude is not None else None
        self.scale, self.dropout, self.r, self.alpha = scale, dropout, r, alpha
        self.merge_norm: torch.Tensor | None = None  # DoRA: ||W + s BA|| captured at merge, for unmerge
        self.pissa_init: tuple[torch.Tensor, torch.Tensor] | None = None  # (A0, B0) to convert on save


class LoraLayer(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise TypeError(f"cannot wrap {type(base_layer).__name__}")
        if kind == "conv":
            if base_layer.groups != 1 or any(d != 1 for d in base_layer.dilation):
                raise TypeError("LoRA on grouped or dilated convolutions is not supported (as in PEFT)")
            if base_layer.padding_mode != "zeros":
                raise TypeError("LoRA on convolutions needs padding_mode='zeros'")
        self.base_layer = base_layer
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.sample_adapters: list[str] | None = None  # per-row adapter names for one mixed batch
        self._row_sq_cache: tuple | None = None  # DoRA: (key, ||w_i||^2) of the frozen base weight

    # --- geometry ------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:  # transformers sometimes reads module.weight (e.g. tying)
        return self.base_layer.weight

    def dims(self) -> tuple[int, int]:
        return fan_dims(self.base_layer)

    def _out_major(self, w: torch.Tensor) -> torch.Tensor:
        return w.T if self.kind in ("conv1d_gpt2", "embedding") else w

    def out_major_weight(self) -> torch.Tensor:
        """The base weight with rows = output features, in fp32 (a copy)."""
        return self._out_major(self.base_layer.weight.detach()).float().clone()

    def _write_out_major(self, w: torch.Tensor) -> None:
        target = self.base_layer.weight
        target.data.copy_(self._out_major(w).to(target.dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B A in the out-major layout of the base weight, fp32."""
        return self.delta_weight_of(self.adapters[name])

    def delta_weight_of(self, ad: "LoraAdapter") -> torch.Tensor:
        A, B = ad.A.detach().float(), ad.B.detach().float()
        delta = B.flatten(1) @ A.flatten(1)  # (out, in * prod(k))
        shape = self._out_major(self.base_layer.weight).shape
        return ad.scale * delta.reshape(shape)

    # --- adapters ------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    dora: bool = False, init: bool | str = True) -> None:
        fan_in, fan_out = self.dims()
        w = self.base_layer.weight
        kernel = tuple(w.shape[2:]) if self.kind == "conv" else ()
        # Trainable tensors stay fp32 even on a half-precision base: tiny, and Adam needs the range.
        A = torch.empty((r, fan_in, *kernel), dtype=torch.float32, device=w.device)
        B = torch.zeros((fan_out, r, *(1,) * len(kernel)), dtype=torch.float32, device=w.device)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        pissa = isinstance(init, str) and init.startswith("pissa")
        if self.kind == "embedding":  # PEFT's choice for embeddings: A = 0, B ~ N(0, 1)
            nn.init.zeros_(A)
            nn.init.normal_(B)
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        elif pissa:
            A, B = self._pissa(r, scale, init)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init is False:  # PEFT's "no identity" init, used to test non-trivial adapters
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        ad = LoraAdapter(A, B, scale, dropout, None, r, alpha)
        if pissa:
            ad.pissa_init = (A.clone(), B.clone())
        if dora:
            norm = self.weight_norm(ad)
            ad.magnitude = nn.Parameter(norm.reshape(self._magnitude_shape()))
        self.adapters[name] = ad

    def _magnitude_shape(self) -> tuple[int, ...]:
        out = self.dims()[1]
        if self.kind == "conv":  # PEFT keeps (1, out, 1, ...) for convolutions
            return (1, out) + (1,) * (self.base_layer.weight.dim() - 2)
        return (out,)

    def _pissa(self, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind not in ("linear", "conv1d_gpt2"):
            raise TypeError("PiSSA initialisation is defined for linear layers only")
        W = self.out_major_weight()  # (out, in)
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:  # pissa_niter_N: randomised SVD, much faster on big matrices
            niter = int(init.rsplit("_", 1)[1])
            U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
            Vh = V.T
        S = S / scale
        A = torch.diag(S.sqrt()) @ Vh  # (r, in)
        B = U @ torch.diag(S.sqrt())   # (out, r)
        self._write_out_major(W - scale * (B @ A))  # the base keeps the residual
        return A, B

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or not self.adapters:
            return result
        if self.sample_adapters is not None:
            return self._forward_mixed(x, result)
        base_out = result
        for name in self.active:
            if name in self.merged or name not in self.adapters:
                continue
            result = result + self._adapter_out(self.adapters[name], x, base_out)
        return result

    def _forward_mixed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.merged:
            raise RuntimeError("per-sample adapters need unmerged weights: call unmerge() first")
        if len(self.sample_adapters) != x.shape[0]:
            raise ValueError(f"got {len(self.sample_adapters)} adapter names for a batch of {x.shape[0]}")
        result = result.clone()
        for name in set(self.sample_adapters):
            if name not in self.adapters:
                continue  # "__base__" rows, or an adapter that does not touch this layer
            rows = [i for i, n in enumerate(self.sample_adapters) if n == name]
            idx = torch.tensor(rows, device=x.device)
            result[idx] = result[idx] + self._adapter_out(self.adapters[name], x[idx], result[idx])
        return result

    def _branch(self, ad: LoraAdapter, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """scale * B(A(x)); x already dropped out where that applies. The scale is folded into B (an
        (out, r) multiply) rather than applied to the (..., out) result: one full-size op less each way."""
        A = ad.A.to(x.dtype) if x.is_floating_point() else ad.A
        base = self.base_layer
        if self.kind == "embedding":
            h = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                            base.scale_grad_by_freq, base.sparse)  # (..., r)
            return h @ _scaled(ad.B.to(h.dtype), scale).T             # (..., dim)
        if self.kind == "conv":
            conv = _CONV_FN[A.dim() - 2]
            h = conv(x, A, stride=base.stride, padding=base.padding)  # (N, r, *spatial)
            return conv(h, _scaled(ad.B.to(h.dtype), scale))          # (N, out, *spatial)
        return F.linear(F.linear(x, A), _scaled(ad.B.to(x.dtype), scale))  # (..., r) -> (..., out)

    def _adapter_out(self, ad: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to the base output."""
        drop = ad.dropout > 0 and self.training and self.kind != "embedding"
        xd = F.dropout(x, ad.dropout, training=True) if drop else x
        if ad.magnitude is None:
            return self._branch(ad, xd, ad.scale)
        # DoRA: W' = m * (W + sBA) / ||W + sBA||, the norm treated as a constant (as in the paper).
        norm = self.weight_norm(ad)
        mscale = ad.magnitude.reshape(-1) / norm                      # (out,)
        lora = self._branch(ad, xd, mscale * ad.scale)                # per-output scale folded into B
        mscale = mscale.to(lora.dtype)
        mscale = mscale.view(-1, *(1,) * (lora.dim() - 2)) if self.kind == "conv" else mscale
        if drop:
            base_plain = self.base_output(xd, self._out_major(self.base_layer.weight), bias=False)
        else:
            base_plain = base_out - self._bias_view(base_out)
        return (mscale - 1) * base_plain + lora

    def _bias_view(self, out: torch.Tensor) -> torch.Tensor | float:
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            return 0.0
        return bias.view(-1, *(1,) * (out.dim() - 2)) if self.kind == "conv" else bias

    @torch.no_grad()
    def weight_norm(self, ad: LoraAdapter) -> torch.Tensor:
        """Row norms of W + s B A for the current base weight, without materialising B A.

        ||w_i + s (BA)_i||^2 = ||w_i||^2 + 2 s <w_i A^T, b_i> + s^2 b_i (A A^T) b_i^T
        costs one (out, in) x (in, r) product instead of an (out, in) temporary, and ||w_i||^2 is
        cached (the base is frozen). DoRA treats this norm as a constant, hence no_grad.
        """
        W = self._out_major(self.base_layer.weight).flatten(1)       # (out, in'), base dtype
        A, B = ad.A.flatten(1).float(), ad.B.flatten(1).float()      # (r, in'), (out, r)
        cross = F.linear(A.to(W.dtype), W).float().T                 # (out, r) = W A^T
        s = ad.scale
        sq = self._row_sq(W) + 2 * s * (cross * B).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
        return sq.clamp_min(0).sqrt()                                # (out,)

    def _row_sq(self, W: torch.Tensor) -> torch.Tensor:
        # Keyed on storage and version: a merge or any in-place write to the weight invalidates it.
        key = (W.data_ptr(), self.base_layer.weight._version, W.dtype)
        if self._row_sq_cache is None or self._row_sq_cache[0] != key:
            self._row_sq_cache = (key, W.float().pow(2).sum(1))
        return self._row_sq_cache[1]

    # --- merge ---------------------------------------------------------------------------------
    def merged_weight(self, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The out-major fp32 weight with `names` folded in (nothing is written), and the DoRA
        norms captured on the way. Raises FloatingPointError on NaN/inf."""
        W, norms = self.out_major_weight(), {}
        for name in names:
            ad = self.adapters[name]
            W = W + self.delta_weight(name)
            if ad.magnitude is not None:
                norms[name] = W.flatten(1).norm(dim=1)  # (out,)
                W = W * _rows(ad.magnitude.detach().float().reshape(-1) / norms[name], W)
            if not torch.isfinite(W).all():
                raise FloatingPointError(f"merging adapter {name!r} would put NaN/inf in the weights")
        return W, norms

    def merge(self, names: list[str]) -> None:
        """Fold adapters into the base weight, computing in fp32. Idempotent per adapter."""
        todo = [n for n in names if n in self.adapters and n not in self.merged]
        if not todo:
            return
        W, norms = self.merged_weight(todo)
        self._write_out_major(W)
        for name in todo:
            self.adapters[name].merge_norm = norms.get(name)
        self.merged += todo

    def unmerge(self) -> None:
        """Undo merges, newest first."""
        W = self.out_major_weight()
        while self.merged:
            ad = self.adapters[self.merged.pop()]
            if ad.magnitude is not None:
                W = W / _rows(ad.magnitude.detach().float().reshape(-1) / ad.merge_norm, W)
                ad.merge_norm = None
            W = W - self.delta_weight_of(ad)
        self._write_out_major(W)

    def base_output(self, x: torch.Tensor, w_out_major: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The base op run with another weight (given out-major): for probes and DoRA."""
        base = self.base_layer
        b = base.bias if bias and getattr(base, "bias", None) is not None else None
        w = w_out_major.to(base.weight.dtype)
        if self.kind == "embedding":
            return F.embedding(x, w.T, base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)
        if self.kind == "conv":
            return _CONV_FN[w.dim() - 2](x, w, b, base.stride, base.padding)
        return F.linear(x, w, b)


def _scaled(B: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """B (out, r, ...) times a scalar or a per-output (out,) scale."""
    if torch.is_tensor(scale):
        return B * scale.to(B.dtype).view(-1, *(1,) * (B.dim() - 1))
    return B * scale


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(out,) -> broadcastable over the rows of an out-major weight."""
    return v.view(-1, *(1,) * (like.dim() - 1))


class TrainedCopy(nn.Module):
    """A module trained in full for an adapter (PEFT's modules_to_save), e.g. a classifier head.

    The original stays frozen and in place; each adapter owns a copy, used while it is active."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        self.sample_adapters: list[str] | None = None

    def add_copy(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original_module

    def forward(self, x, *args, **kwargs):
        if self.sample_adapters is None or self.disabled:
            return self.current()(x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs).clone()
        for name in set(self.sample_adapters) & set(self.copies):
            idx = torch.tensor([i for i, n in enumerate(self.sample_adapters) if n == name], device=x.device)
            out[idx] = self.copies[name](x[idx], *args, **kwargs)
        return out
