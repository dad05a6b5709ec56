"""nn.Linear: weight (out, in), y = x W^T + b; with one LoRA adapter, y = x W^T + b + s (x A^T) B^T
as one autograd op (`with_branch`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.tuner.kinds.base import LayerKind, register_kind


class LinearKind(LayerKind):
    name = "linear"
    label = "nn.Linear"
    module_types = (nn.Linear,)
    all_linear = True
    gguf_lora = True
    svd_init = True
    plain_linear = True

    def fan_dims(self, module: nn.Linear) -> tuple[int, int]:
        return module.in_features, module.out_features

    def weight(self, module: nn.Linear) -> torch.Tensor:
        return module.weight  # (out, in): already out-major

    def write_weight(self, module: nn.Linear, w: torch.Tensor) -> None:
        module.weight.data.copy_(w.to(module.weight.dtype))

    def branch(self, module: nn.Linear, x, A, B) -> torch.Tensor:
        return F.linear(F.linear(x, A), B)  # (..., in) -> (..., r) -> (..., out)

    def base_op(self, module: nn.Linear, x, w, bias: bool = True) -> torch.Tensor:
        b = module.bias if bias else None
        return F.linear(x, w.to(module.weight.dtype), b)  # (..., out)

    def with_branch(self, module: nn.Linear, x, A, B, scale: float) -> torch.Tensor | None:
        w = module.weight
        if (
            type(module).forward is not nn.Linear.forward  # a subclass computing something else
            or module._forward_hooks
            or module._forward_pre_hooks
            or x.dtype != w.dtype
            or (  # autocast would compute in another dtype: leave it to F.linear
                torch.is_autocast_enabled(x.device.type)
                and torch.get_autocast_dtype(x.device.type) != x.dtype
            )
        ):
            return None
        return _LinearWithBranch.apply(x, w, module.bias, A, B, scale)

    def probe(self, module: nn.Linear, gen: torch.Generator) -> torch.Tensor:
        w = module.weight
        return torch.randn(8, module.in_features, generator=gen).to(w.device, w.dtype)  # (8, in)


class _LinearWithBranch(torch.autograd.Function):
    """y = x W^T + b + (x A^T)(s B)^T in x's dtype, the branch added inside the matmul (`addmm_`)
    rather than as a separate (tokens, out) sum, and in backward the input gradient
    g W + (g s B) A likewise: two full-size element-wise passes less per layer each step than
    autograd's add of the branch and sum of the two input gradients. The same matmuls otherwise;
    A and B are cast (and B scaled) as `LoraLayer.branch` does, and their gradients come back in
    their own dtype."""

    @staticmethod
    def forward(ctx, x, w, bias, A, B, scale):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        Ac = A.to(x.dtype)
        Bc = B.to(x.dtype) * scale  # (out, r)
        t = F.linear(x2, Ac)  # (N, r)
        y = F.linear(x2, w, bias).addmm_(t, Bc.T)  # (N, out)
        ctx.save_for_backward(x2, w, t, Ac, Bc)
        ctx.scale, ctx.x_shape, ctx.dtypes = scale, x.shape, (A.dtype, B.dtype)
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, w, t, Ac, Bc = ctx.saved_tensors
        g = gy.reshape(-1, gy.shape[-1])  # (N, out)
        gt = g.mm(Bc)  # (N, r)
        gx = gA = gB = None
        if ctx.needs_input_grad[0]:
            gx = g.mm(w).addmm_(gt, Ac).reshape(ctx.x_shape)  # g, w: x's dtype
        if ctx.needs_input_grad[3]:
            gA = gt.T.mm(x2).to(ctx.dtypes[0])  # (r, in)
        if ctx.needs_input_grad[4]:
            gB = (g.T.mm(t) * ctx.scale).to(ctx.dtypes[1])  # (out, r)
        return gx, None, None, gA, gB, None


LINEAR = register_kind(LinearKind())
