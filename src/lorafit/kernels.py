"""Memory-lean replacements for two hot spots of Llama-style blocks, used by the training path.

What autograd keeps for backward is most of a LoRA step's memory (the base weights are frozen and
shared). Two common ops keep far more than they need:
- RMSNorm in transformers keeps its fp32 input, the normalised fp32 tensor and the output, and the
  q/k/v (and gate/up) projections each keep their own bf16 cast of that output. `rms_norm` keeps
  only the input and one value per row, and hands out the output already in the autocast dtype, so
  the projections share one tensor.
- SwiGLU (silu(gate) * up) keeps gate, silu(gate) and up; `swiglu` keeps gate and up and
  recomputes silu in backward (cheap, element-wise).
Both give the same numbers as the transformers code under autocast (the casts happen where
autocast would do them). `patch_model` swaps them in for modules it recognises and leaves any
other module alone.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32 math for half inputs


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
        xf = x.to(_acc(x))                                               # (..., H) fp32 (or fp64)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)      # (..., 1)
        y = weight * (xf * rstd).to(x.dtype)                             # as transformers computes it
        ctx.save_for_backward(x, weight, rstd)
        ctx.weight_grad = weight.requires_grad
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf, dyf = x.to(_acc(x)), dy.to(_acc(x))
        n = xf * rstd                                                    # (..., H)
        dn = dyf * weight.to(_acc(x))
        dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
        dw = (dyf * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype) if ctx.weight_grad else None
        return dx.to(x.dtype), dw, None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        g = gate.to(_acc(gate))
        sig = torch.sigmoid(g)
        silu = g * sig
        d = dout.to(g.dtype)
        d_up = (d * silu).to(up.dtype)
        d_gate = (d * up.to(g.dtype) * sig * (1 + g * (1 - sig))).to(gate.dtype)
        return d_gate, d_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return _RMSNorm.apply(x, weight, eps, out_dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _is_rms_norm(module: nn.Module) -> bool:
    # Llama, Mistral, Qwen2/3, SmolLM ... share this exact definition (weight * normalised input).
    return (type(module).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
            and hasattr(module, "variance_epsilon"))


def _is_swiglu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(act).__name__ in ("SiLU", "SiLUActivation") and type(module).__name__.endswith("MLP"))


def patch_model(model: nn.Module) -> int:
    """Use the lean ops in recognised modules of `model` (in place); returns how many were patched."""
    count = 0
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
            count += 1
        elif _is_swiglu_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            count += 1
    return count
