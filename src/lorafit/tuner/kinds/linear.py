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
        if not _one_op(module, x):
            return None
        return _LinearWithBranch.apply(x, module.weight, module.bias, A, B, scale)

    def join(self, modules) -> bool:
        first = modules[0]
        if len(modules) < 2 or not all(
            type(m).forward is nn.Linear.forward
            and m.in_features == first.in_features
            and (m.bias is None) == (first.bias is None)
            for m in modules
        ):
            return False
        tensors = [m.weight for m in modules] + [m.bias for m in modules if m.bias is not None]
        if (
            any(t.requires_grad or type(t.data) is not torch.Tensor for t in tensors)
            or len({(t.dtype, t.device) for t in tensors}) != 1
        ):
            return False
        with torch.no_grad():
            weight = torch.cat([m.weight for m in modules])  # (sum out, in)
            bias = torch.cat([m.bias for m in modules]) if first.bias is not None else None
        start = 0
        for m in modules:
            stop = start + m.out_features
            m.weight.data = weight[start:stop]
            if bias is not None:
                m.bias.data = bias[start:stop]
            start = stop
        first._lorafit_joined = (weight, bias, tuple(m.out_features for m in modules))
        return True

    def group_with_branch(self, modules, x, factors):
        joined = getattr(modules[0], "_lorafit_joined", None)
        if joined is None or not all(_one_op(m, x) for m in modules):
            return None
        weight, bias, sizes = joined
        start = 0
        for m, size in zip(modules, sizes, strict=True):  # still views of the joined tensor
            if m.weight.data_ptr() != weight[start].data_ptr() or m.out_features != size:
                return None
            start += size
        As, Bs, scales = zip(*factors)
        return _LinearGroupWithBranch.apply(x, weight, bias, sizes, scales, *As, *Bs)

    def probe(self, module: nn.Linear, gen: torch.Generator) -> torch.Tensor:
        w = module.weight
        return torch.randn(8, module.in_features, generator=gen).to(w.device, w.dtype)  # (8, in)


def _one_op(module: nn.Linear, x: torch.Tensor) -> bool:
    """Whether module(x) is F.linear(x, weight, bias) in x's dtype, as the one-op forms compute."""
    return not (
        type(module).forward is not nn.Linear.forward  # a subclass computing something else
        or module._forward_hooks
        or module._forward_pre_hooks
        or x.dtype != module.weight.dtype
        or (  # autocast would compute in another dtype: leave it to F.linear
            torch.is_autocast_enabled(x.device.type)
            and torch.get_autocast_dtype(x.device.type) != x.dtype
        )
    )


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


class _LinearGroupWithBranch(torch.autograd.Function):
    """`_LinearWithBranch` of k nn.Linears that read the same x and whose weights are row blocks
    of one (sum out, in) tensor (`LinearKind.join`): one matmul by the joined weight, one by the
    stacked A's (k r, in), and one `addmm_` of the B's as a block-diagonal (sum out, k r) matrix;
    in backward one matmul of the outputs' gradients side by side for the input gradient (plus
    one for the branches) and one for all the A gradients. The outputs are column blocks of one
    (tokens, sum out) tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, sizes, scales, *factors):
        k = len(sizes)
        As, Bs = factors[:k], factors[k:]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        ranks = [a.shape[0] for a in As]
        Ac = torch.cat(As).to(x.dtype)  # (k r, in)
        Bd = torch.block_diag(*(B * s for B, s in zip(Bs, scales))).to(x.dtype)  # (sum out, k r)
        t = F.linear(x2, Ac)  # (N, k r)
        y = F.linear(x2, weight, bias).addmm_(t, Bd.T)  # (N, sum out)
        ctx.save_for_backward(x2, weight, t, Ac, Bd)
        ctx.sizes, ctx.ranks, ctx.scales, ctx.x_shape = sizes, ranks, scales, x.shape
        ctx.dtypes = [a.dtype for a in As] + [b.dtype for b in Bs]
        return tuple(part.view(*x.shape[:-1], n) for part, n in zip(y.split(sizes, 1), sizes))

    @staticmethod
    def backward(ctx, *grads):
        x2, weight, t, Ac, Bd = ctx.saved_tensors
        # (N, sum out); autograd hands zeros for an output the loss did not use
        g = torch.cat([gi.reshape(x2.shape[0], -1) for gi in grads], 1)
        gt = g.mm(Bd)  # (N, k r)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = g.mm(weight).addmm_(gt, Ac).reshape(ctx.x_shape)
        k = len(ctx.sizes)
        gA = [None] * k
        if any(ctx.needs_input_grad[5 : 5 + k]):
            gA = [p.to(dt) for p, dt in zip(gt.T.mm(x2).split(ctx.ranks), ctx.dtypes)]
        gB = [
            (gi.T.mm(ti) * scale).to(dt) if ctx.needs_input_grad[5 + k + i] else None
            for i, (gi, ti, scale, dt) in enumerate(
                zip(g.split(ctx.sizes, 1), t.split(ctx.ranks, 1), ctx.scales, ctx.dtypes[k:])
            )
        ]
        return (gx, None, None, None, None, *gA, *gB)
