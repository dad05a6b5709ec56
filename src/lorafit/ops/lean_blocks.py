"""Memory-lean replacements for two hot spots of Llama-style blocks, used by the training path.

What autograd keeps for backward is most of a LoRA step's memory (the base weights are frozen and
shared). Two common ops keep far more than they need:
- RMSNorm in transformers keeps its fp32 input, the normalised fp32 tensor and the output, and the
  q/k/v (and gate/up) projections each keep their own bf16 cast of that output. `rms_norm` keeps
  only the input and one value per row, and hands out the output already in the autocast dtype, so
  the projections share one tensor.
- SwiGLU (silu(gate) * up) keeps gate, silu(gate) and up; `swiglu` keeps gate and up and
  recomputes silu in backward (cheap, element-wise).
- The SwiGLU output h feeds down_proj, whose LoRA A-gradient needs h, so autograd keeps h too
  (1,536 values per token per layer). `recompute_swiglu` stores a recipe instead (gate and up,
  which the SwiGLU backward keeps anyway) and recomputes h, an element-wise op, when backward asks.
All give the same numbers as the transformers code under autocast (the casts happen where
autocast would do them). `patch_model` swaps them in for modules it recognises and leaves any
other module alone.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from lorafit.ops import fused


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
        # detached: the compiled kernel then serves training and evaluation alike (no recompile)
        y, rstd = fused.rms_norm_forward(x.detach(), weight.detach(), eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.weight_grad = weight.requires_grad
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx = fused.rms_norm_backward(x, weight, rstd, dy)
        dw = fused.rms_norm_weight_grad(x, rstd, dy).to(weight.dtype) if ctx.weight_grad else None
        return dx, dw, None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        ctx.save_for_backward(gate, up)
        return fused.swiglu_forward(gate.detach(), up.detach())

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        return fused.swiglu_backward(gate, up, dout)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out_dtype = (
        torch.get_autocast_dtype(x.device.type)
        if torch.is_autocast_enabled(x.device.type)
        else x.dtype
    )
    return _RMSNorm.apply(x, weight, eps, out_dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class _Recompute:
    """What a saved view of the SwiGLU output is replaced by: its inputs and where the view sat."""

    __slots__ = ("gate", "up", "size", "stride", "offset")

    def __init__(self, gate, up, view):
        self.gate, self.up = gate, up
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def tensor(self) -> torch.Tensor:
        h = fused.swiglu_forward(self.gate, self.up)  # same op, same numbers
        return h.as_strided(self.size, self.stride, self.offset)


def _mlp_forward_recompute(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    h = swiglu(gate, up)
    if not (torch.is_grad_enabled() and h.requires_grad and h.is_contiguous()):
        return self.down_proj(h)
    # Autograd keeps the hooks alive with every tensor they saved, so they must not refer to h
    # (or its storage): only its address and dtype, valid while h is alive (this forward call).
    ptr, dtype = h.untyped_storage().data_ptr(), h.dtype
    g, u = (
        gate.detach(),
        up.detach(),
    )  # the SwiGLU backward keeps these tensors already: no new memory

    def pack(t: torch.Tensor):
        same = t.untyped_storage().data_ptr() == ptr and t.dtype == dtype
        return _Recompute(g, u, t) if same else t

    def unpack(p):
        return p.tensor() if isinstance(p, _Recompute) else p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return self.down_proj(h)


def _is_rms_norm(module: nn.Module) -> bool:
    # Llama, Mistral, Qwen2/3, SmolLM ... share this exact definition (weight * normalised input).
    return type(module).__name__ in (
        "LlamaRMSNorm",
        "MistralRMSNorm",
        "Qwen2RMSNorm",
        "Qwen3RMSNorm",
    ) and hasattr(module, "variance_epsilon")


def _is_swiglu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and type(act).__name__ in ("SiLU", "SiLUActivation")
        and type(module).__name__.endswith("MLP")
    )


def patch_model(model: nn.Module, recompute_swiglu: bool = False) -> int:
    """Use the lean ops in recognised modules of `model` (in place); returns how many were patched.
    `recompute_swiglu` must be off under activation checkpointing (whose own saved-tensor hooks the
    MLP's would override)."""
    count = 0
    mlp_forward = _mlp_forward_recompute if recompute_swiglu else _mlp_forward
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
            count += 1
        elif _is_swiglu_mlp(module):
            module.forward = types.MethodType(mlp_forward, module)
            count += 1
    return count
