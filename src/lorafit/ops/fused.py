"""Element-wise pieces of a training step fused into one pass each by torch.compile (inductor).

A LoRA step on short examples is memory-bound outside the matmuls: SwiGLU's backward in eager
torch makes ~12 passes over fp32 tensors of tokens x intermediate values, and took 15-18 ms per
layer on SmolLM2 at B=8, T=116 (23% of the step on this 2-core machine) where one fused pass takes
~1.1 ms. Each kernel here is a tensor function with an eager reference (pure, except
`cross_entropy_grad_`, which writes its result over its input); `fused(fn)` compiles
it on first use (dynamic shapes: one compile serves every batch shape; inductor's on-disk cache
makes later processes cheap) and falls back to the eager function, for the rest of the process,
if compiling fails (no C++ compiler, no Triton on a GPU). `set_fusion(False)` (train.fused_kernels)
runs the eager references throughout. The numbers are the eager references' up to rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lorafit.tuner.kinds import linear

_enabled = True  # train.fused_kernels sets it through train.step.prepare_for_training


def set_fusion(enabled: bool) -> None:
    """Use the compiled kernels (True) or the eager references (False) from now on."""
    global _enabled
    _enabled = enabled


def fusion_enabled() -> bool:
    return _enabled


class _Fused:
    """`fn` compiled on first call; the eager `fn` when fusion is off or compiling failed."""

    def __init__(self, fn: Callable, dynamic: bool | None = True, writes_input: bool = False):
        self.fn, self.name, self.dynamic = fn, fn.__name__, dynamic
        self.writes_input = writes_input  # an input may be half-written when the call fails
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, *args):
        if not _enabled or self.failed or torch.compiler.is_compiling():
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=self.dynamic, fullgraph=True)
        try:
            return self.compiled(*args)
        except Exception as exc:  # a missing compiler or backend: eager from now on
            if self.writes_input and not isinstance(exc, torch._dynamo.exc.TorchDynamoException):
                raise  # failed while running (e.g. out of memory): rerunning would read its output
            self.failed = True
            msg = (
                f"lorafit: could not compile {self.name} ({type(exc).__name__}); running it eagerly"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return self.fn(*args)


def fused(fn: Callable | None = None, *, dynamic: bool | None = True, writes_input: bool = False):
    """`@fused`: compiled once for every shape (dynamic); `@fused(dynamic=None)`: torch's
    automatic dynamic shapes, for a kernel whose int arguments (head counts and sizes) must stay
    constants in the generated code to vectorise: a size that changes is made symbolic on its
    second value (one recompile), the ints never change for a model. `writes_input`: the kernel
    writes over an input, so it falls back to eager only when compiling failed (dynamo / inductor
    errors, raised before anything runs), never after a failure while running."""
    if fn is None:
        return lambda f: _Fused(f, dynamic, writes_input)
    return _Fused(fn, dynamic, writes_input)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp32 math for half inputs


# ------------------------------------------------------------------------------- SwiGLU --
def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _swiglu_grad(gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    g = gate.to(_acc(gate))
    sig = torch.sigmoid(g)
    d = dout.to(g.dtype)
    d_up = (d * g * sig).to(up.dtype)
    d_gate = (d * up.to(g.dtype) * sig * (1 + g * (1 - sig))).to(gate.dtype)
    return torch.cat([d_gate, d_up], -1)


@fused
def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, as the Llama MLP computes it."""
    return _swiglu(gate, up)


@fused
def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """(d gate | d up) of silu(gate) * up side by side in one (..., 2 I) tensor, in fp32 math: the
    gate / up projections' one-op backward reads them as one gradient without a copy."""
    return _swiglu_grad(gate, up, dout)


@fused
def swiglu_backward_and_forward(
    gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`swiglu_backward(gate, up, dout)`, `swiglu_forward(gate, up)`) in one pass: the backward
    computes silu(gate) anyway, so the output made again costs one write, not a second read of
    gate and up."""
    return _swiglu_grad(gate, up, dout), _swiglu(gate, up)


# ------------------------------------------------------------------------------ RMSNorm --
@fused
def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * x / rms(x) as transformers computes it, cast to out_dtype; 1 / rms per row)."""
    xf = x.to(_acc(x))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    y = weight * (xf * rstd).to(x.dtype)
    return y.to(out_dtype), rstd


@fused
def rms_norm_backward(
    x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor
) -> torch.Tensor:
    """d x of rms_norm_forward (the weight's gradient is `rms_norm_weight_grad`)."""
    xf, dyf = x.to(_acc(x)), dy.to(_acc(x))
    n = xf * rstd
    dn = dyf * weight.to(_acc(x))
    return (rstd * (dn - n * (dn * n).mean(-1, keepdim=True))).to(x.dtype)


@fused
def rms_norm_weight_grad(x: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """d weight of rms_norm_forward (fp32), for norms that train."""
    n = x.to(_acc(x)) * rstd
    return (dy.to(n.dtype) * n).reshape(-1, n.shape[-1]).sum(0)


# ------------------------------------------------------------------------------ rotary --
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


@fused
def rotary_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotary embedding of q and k (x cos + rotate_half(x) sin; cos / sin broadcast
    over the heads), in fp32 math, each result in its input's dtype."""
    c, s = cos.to(_acc(q)), sin.to(_acc(q))
    rq = q.to(c.dtype) * c + _rotate_half(q.to(c.dtype)) * s
    rk = k.to(c.dtype) * c + _rotate_half(k.to(c.dtype)) * s
    return rq.to(q.dtype), rk.to(k.dtype)


@fused
def rotary_backward(
    gq: torch.Tensor, gk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input gradients of rotary_forward: g cos - rotate_half(g sin) (rotate_half's transpose
    is its negative)."""
    c, s = cos.to(_acc(gq)), sin.to(_acc(gq))
    dq = gq.to(c.dtype) * c - _rotate_half(gq.to(c.dtype) * s)
    dk = gk.to(c.dtype) * c - _rotate_half(gk.to(c.dtype) * s)
    return dq.to(gq.dtype), dk.to(gk.dtype)


@fused(dynamic=None)  # heads, d as constants: 4x faster than symbolic (200 vs 870 us, N=700)
def rotary_rows_forward(
    y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, d: int
) -> torch.Tensor:
    """`rotary_forward` on token rows (N, q | k | v side by side): the first `heads` heads of d
    values (q's and k's) rotated by their token's cos / sin (N, d), the rest (v) copied; one pass
    that writes the rows again side by side."""
    n, rot = y.shape[0], heads * d
    c, s = cos.to(_acc(y))[:, None, :], sin.to(_acc(y))[:, None, :]  # (N, 1, d)
    x = y[:, :rot].reshape(n, heads, d).to(c.dtype)
    r = (x * c + _rotate_half(x) * s).reshape(n, rot).to(y.dtype)
    return torch.cat([r, y[:, rot:]], 1)


@fused(dynamic=None)
def rotary_rows_backward(
    g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, d: int
) -> torch.Tensor:
    """The input gradient of rotary_rows_forward (v's part passes through)."""
    n, rot = g.shape[0], heads * d
    c, s = cos.to(_acc(g))[:, None, :], sin.to(_acc(g))[:, None, :]
    x = g[:, :rot].reshape(n, heads, d).to(c.dtype)
    r = (x * c - _rotate_half(x * s)).reshape(n, rot).to(g.dtype)
    return torch.cat([r, g[:, rot:]], 1)


# -------------------------------------------------------------------- causal attention --
@fused
def attention_grad_scores(
    s: torch.Tensor,
    dp: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    T: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention's backward between its matmuls, in one pass: from the raw scores s = q k^T
    and dp = dO v^T (n, G*T, T) (fp32) and each row's log-sum-exp (n, G*T, 1), the probabilities
    p = exp(s * scale - lse) (zero above the diagonal; row r is query position r mod T) and the
    scores' gradient p * (dp - rowsum(p * dp)) * scale, both in out_dtype."""
    rows = torch.arange(s.shape[1], device=s.device) % T
    keep = rows[:, None] >= torch.arange(s.shape[2], device=s.device)[None, :]
    p = torch.where(keep, torch.exp(s * scale - lse), 0.0)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
    return p.to(out_dtype), ds.to(out_dtype)


# ------------------------------------------------------------------------- cross-entropy --
@fused(writes_input=True)
def cross_entropy_grad_(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of logits (n, V) against target (n,) over the rows where valid (n,)
    is True, its gradient softmax - one-hot), in fp32 math. The gradient overwrites `logits` (zero
    in the rows left out) and is returned: the compiled kernel reads each row for its log-sum-exp,
    then writes the row in place, so the loss needs no (n, V) buffer besides the logits. The
    one-hot is a comparison with the column index, not a scatter, which inductor would run on an
    fp32 (n, V) copy (SmolLM2: 44 MB at 224 rows, the step's peak, and twice the time)."""
    x = logits.to(_acc(logits))
    lse = torch.logsumexp(x, dim=-1)  # (n,)
    picked = x.gather(1, target[:, None]).squeeze(1)  # (n,)
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == target[:, None]
    g = torch.where(valid[:, None], (x - lse[:, None]).exp() - hit.to(x.dtype), 0.0)
    logits.copy_(g)
    return torch.where(valid, lse - picked, 0.0).sum(), logits


@fused
def cross_entropy_hits(
    logits: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of logits (n, V) against target (n,), rows whose argmax is the
    target), in fp32 math: one read of the logits (evaluation's loss without the fp32 copies and
    log-softmax tensor `F.cross_entropy(logits.float(), ...)` makes, 3x the logits' memory)."""
    x = logits.to(_acc(logits))
    lse = torch.logsumexp(x, dim=-1)  # (n,)
    picked = x.gather(1, target[:, None]).squeeze(1)  # (n,)
    return (lse - picked).sum(), (x.argmax(-1) == target).sum()


# ------------------------------------------------------------------------- DoRA's scale --
@fused
def scale_grad(g: torch.Tensor, y: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
    """`tuner.kinds.linear.scale_grad` (d loss / d c for y = c * v: the sum over tokens of g y / c)
    in one read of g and y, summed by blocks of 64 tokens first: the first sum runs along
    contiguous memory, then (tokens / 64, out) partial sums (padding-free rows come in multiples of
    64 tokens; a remainder is summed on its own). (4,096, 3,072) bf16 with cold caches: 3.9 ms vs
    6.1 ms summed over all tokens at once, vs 7.2 ms eager (a (tokens, out) product, then its sum)."""
    n, out = g.shape[0] // 64 * 64, g.shape[1]
    if n == 0:  # fewer than 64 tokens
        return linear.scale_grad(g, y, cc)
    blocks = (g[:n].reshape(-1, 64, out) * y[:n].reshape(-1, 64, out)).sum(1)  # (n / 64, out)
    rest = (g[n:] * y[n:]).sum(0)
    return (blocks.float().sum(0) + rest.float()) / cc.float()


linear.use_kernel("scale_grad", scale_grad)
