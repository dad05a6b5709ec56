"""nn.Linear: weight (out, in), y = x W^T + b; with one LoRA adapter, y = c (x W^T + b + s (x A^T) B^T)
as one autograd op (`with_branch`; c a per-output scale, DoRA's m / ||W + s B A||, or none)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.tuner.kinds.base import LayerKind, kept_input, register_kind


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

    def with_branch(self, module: nn.Linear, x, A, B, scale: float, out_scale=None):
        if not _one_op(module, x):
            return None
        c = None if out_scale is None else out_scale()
        return _LinearWithBranch.apply(x, module.weight, module.bias, A, B, scale, c)

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

    def group_with_branch(self, modules, x, factors, joined=False):
        tensors = getattr(modules[0], "_lorafit_joined", None)
        if tensors is None or not all(_one_op(m, x) for m in modules):
            return None
        weight, bias, sizes = tensors
        start = 0
        for m, size in zip(modules, sizes, strict=True):  # still views of the joined tensor
            if m.weight.data_ptr() != weight[start].data_ptr() or m.out_features != size:
                return None
            start += size
        As, Bs, scales, out_scales = zip(*factors)
        cs = [None if f is None else f() for f in out_scales]
        return _LinearGroupWithBranch.apply(x, weight, bias, (sizes, joined), scales, *As, *Bs, *cs)

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
    their own dtype. With a per-output scale c (out,), c scales W's and B's rows (`_rows`)."""

    @staticmethod
    def forward(ctx, x, w, bias, A, B, scale, c):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        Ac = A.to(x.dtype)
        Bc = B.to(x.dtype) * scale  # (out, r)
        t = F.linear(x2, Ac)  # (N, r)
        cc = _cast_scale(c, x.dtype)
        b = bias if cc is None or bias is None else bias * cc
        y = F.linear(x2, _rows(w, cc), b).addmm_(t, _rows(Bc, cc).T)  # (N, out)
        ctx.t_mm, keep = kept_input(x)  # x itself, or what gives gt^T x (`input_for_grad`)
        ctx.save_for_backward(w, t, Ac, Bc, None if cc is None else y, cc, *keep)
        ctx.scale, ctx.x_shape, ctx.dtypes = scale, x.shape, (A.dtype, B.dtype)
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        w, t, Ac, Bc, y, cc, *keep = ctx.saved_tensors
        g = gy.reshape(-1, gy.shape[-1])  # (N, out)
        gc = (
            _kernels["scale_grad"](g, y, cc) if cc is not None and ctx.needs_input_grad[6] else None
        )
        gt = g.mm(_rows(Bc, cc))  # (N, r)
        gx = gA = gB = None
        if ctx.needs_input_grad[0]:
            gx = g.mm(_rows(w, cc)).addmm_(gt, Ac).reshape(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            gA = ctx.t_mm(gt, gx, *keep).to(ctx.dtypes[0])  # (r, in)
        if ctx.needs_input_grad[4]:
            gB = _rows(g.T.mm(t) * ctx.scale, cc).to(ctx.dtypes[1])  # (out, r)
        return gx, None, None, gA, gB, None, gc


# An exactly-zero output scale is applied as this power of two instead: the output stays ~1e-18
# of the unscaled value, and y / c still recovers that value for the scale's gradient.
_ZERO_SCALE = 2.0**-60


def _cast_scale(c: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A per-output scale c (out,) in the compute dtype (as an autograd multiply would cast it),
    zeros replaced by `_ZERO_SCALE`; None for no scale."""
    if c is None:
        return None
    cc = c.detach().to(dtype)
    return cc.masked_fill(cc == 0, _ZERO_SCALE)


def _rows(m: torch.Tensor, cc: torch.Tensor | None) -> torch.Tensor:
    """m with its rows (outputs) scaled by c; m for no scale. The output scale goes into the
    weights (out x in values) rather than onto the output (tokens x out), in forward and backward
    alike: c (x W^T + b + t B^T) = x (cW)^T + cb + t (cB)^T, and the input gradient of g is
    g (cW) + (g (cB)) A, so no (tokens, out) pass is spent on c (DoRA)."""
    return m if cc is None else m * cc[:, None]


def scale_grad(g: torch.Tensor, y: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
    """d loss / d c for y = c * v: the sum over tokens of g v = g (y / c) (summed in fp32, as
    torch's CPU and CUDA sums of half-precision tensors accumulate; a dtype=float32 sum would
    first copy the whole product to fp32). The eager reference of `ops/fused.py`'s one-pass
    kernel, which `use_kernel` puts in its place."""
    return (g * y).sum(0).float() / cc.float()


_kernels = {"scale_grad": scale_grad}


def use_kernel(name: str, fn) -> None:
    """Run `fn` for the one-op forms' element-wise piece `name` (the same arguments and result up
    to rounding): `ops/fused.py` installs its compiled kernels here, as the tuner cannot import
    ops. Eager, the scale's gradient makes a (tokens, out) product and sums it (two passes, the
    product a fresh block: ~16 ms per gate|up group at 4 x 1,024 tokens); compiled, one read."""
    if name not in _kernels:
        raise KeyError(f"no element-wise piece {name!r}; known: {sorted(_kernels)}")
    _kernels[name] = fn


LINEAR = register_kind(LinearKind())


class _LinearGroupWithBranch(torch.autograd.Function):
    """`_LinearWithBranch` of k nn.Linears that read the same x and whose weights are row blocks
    of one (sum out, in) tensor (`LinearKind.join`): one matmul by the joined weight, one by the
    stacked A's (k r, in), and one `addmm_` of the B's as a block-diagonal (sum out, k r) matrix;
    in backward one matmul of the outputs' gradients side by side for the input gradient (plus
    one for the branches) and one for all the A gradients. The outputs are column blocks of one
    (tokens, sum out) tensor; a module's per-output scale (or None) scales its rows of the joined
    weight and of the B's (`_rows`), forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, layout, scales, *factors):
        sizes, joined = layout  # joined: one (..., sum out) output rather than k
        k = len(sizes)
        As, Bs, cs = factors[:k], factors[k : 2 * k], factors[2 * k :]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        ranks = [a.shape[0] for a in As]
        Ac = torch.cat(As).to(x.dtype)  # (k r, in)
        Bd = torch.block_diag(*(B * s for B, s in zip(Bs, scales))).to(x.dtype)  # (sum out, k r)
        t = F.linear(x2, Ac)  # (N, k r)
        ccs = [_cast_scale(c, x.dtype) for c in cs]
        ctx.scaled = [cc is not None for cc in ccs]  # y kept only for the scales' gradients
        call = None  # every output's scale (1 where a block has none)
        if any(ctx.scaled):
            call = torch.cat([x.new_ones(n) if cc is None else cc for n, cc in zip(sizes, ccs)])
        b = bias if call is None or bias is None else bias * call
        y = F.linear(x2, _rows(weight, call), b).addmm_(t, _rows(Bd, call).T)
        parts = y.split(sizes, 1)
        ctx.t_mm, keep = kept_input(x)
        ctx.save_for_backward(weight, t, Ac, Bd, None if call is None else y, call, *keep)
        ctx.sizes, ctx.ranks, ctx.scales, ctx.x_shape = sizes, ranks, scales, x.shape
        ctx.dtypes = [a.dtype for a in As] + [b.dtype for b in Bs]
        if joined:
            return y.view(*x.shape[:-1], y.shape[1])
        return tuple(part.view(*x.shape[:-1], n) for part, n in zip(parts, sizes))

    @staticmethod
    def backward(ctx, *grads):
        weight, t, Ac, Bd, y, call, *keep = ctx.saved_tensors
        k, n = len(ctx.sizes), t.shape[0]
        # autograd hands zeros for an output the loss did not use
        if len(grads) == 1 < k:  # the joined output's gradient
            grads = list(grads[0].reshape(n, -1).split(ctx.sizes, 1))
        else:
            grads = [gi.reshape(n, -1) for gi in grads]
        g = _side_by_side(grads)  # (N, sum out)
        if g is None:
            g = torch.cat(grads, 1)
        ccs = [None] * k  # each block's scale, or None
        if call is not None:
            ccs = [cc if on else None for cc, on in zip(call.split(ctx.sizes), ctx.scaled)]
        gcs = [None] * k
        if call is not None and any(ctx.needs_input_grad[5 + 2 * k :]):
            # one pass over the joined (contiguous) g and y: column blocks are strided and slower
            parts = _kernels["scale_grad"](g, y, call).split(ctx.sizes)
            gcs = [None if cc is None else p for p, cc in zip(parts, ccs)]
        Bd = _rows(Bd, call)
        gt = g.mm(Bd)  # (N, k r)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = g.mm(_rows(weight, call)).addmm_(gt, Ac).reshape(ctx.x_shape)
        gA = [None] * k
        if any(ctx.needs_input_grad[5 : 5 + k]):
            gA = [p.to(dt) for p, dt in zip(ctx.t_mm(gt, gx, *keep).split(ctx.ranks), ctx.dtypes)]
        gB = [
            _rows(gi.T.mm(ti) * scale, cc).to(dt) if ctx.needs_input_grad[5 + k + i] else None
            for i, (gi, ti, scale, cc, dt) in enumerate(
                zip(grads, t.split(ctx.ranks, 1), ctx.scales, ccs, ctx.dtypes[k:])
            )
        ]
        return (gx, None, None, None, None, *gA, *gB, *gcs)


def _side_by_side(blocks: list[torch.Tensor]) -> torch.Tensor | None:
    """The (N, sum of widths) tensor whose consecutive column blocks `blocks` are, when they are
    (a backward that wrote its gradients into one buffer, e.g. SwiGLU's d gate | d up), so it is
    read without a copy; else None."""
    first = blocks[0]
    total = sum(b.shape[1] for b in blocks)
    offset = first.storage_offset()
    for b in blocks:
        if (
            b.dtype != first.dtype
            or b.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or b.stride() != (total, 1)
            or b.storage_offset() != offset
        ):
            return None
        offset += b.shape[1]
    return first.as_strided((first.shape[0], total), (total, 1), first.storage_offset())
