"""Memory-lean replacements for two hot spots of Llama-style blocks, used by the training path.

What autograd keeps for backward is most of a LoRA step's memory (the base weights are frozen and
shared). Two common ops keep far more than they need:
- RMSNorm in transformers keeps its fp32 input, the normalised fp32 tensor and the output, and the
  q/k/v (and gate/up) projections each keep their own bf16 cast of that output. `rms_norm` keeps
  only the input and one value per row, and hands out the output already in the autocast dtype, so
  the projections share one tensor.
- SwiGLU (silu(gate) * up) keeps gate, silu(gate) and up; `swiglu` keeps gate and up and
  recomputes silu in backward (cheap, element-wise).
- A projection's LoRA A-gradient gt^T x needs its input x. When x is RMSNorm's output
  w * x0 / rms(x0), the projections' one-op forms keep what the norm keeps anyway (x0, 1 / rms,
  w) and compute ((gt / rms)^T x0) * w (`tuner.kinds.base.input_for_grad`): one (tokens, hidden)
  tensor less per norm, no extra pass. `recompute_swiglu` does the like for the SwiGLU output h
  down_proj reads: gate and up (kept by the SwiGLU backward) and h made again in backward
  (1,536 values per token per layer), when down_proj runs as one op.
- The projections that read one input (an attention block's q / k / v, an MLP's gate / up), each
  LoRA'd with one adapter (plain LoRA or DoRA), run as one op (`tuner.shared_input_forward`: one matmul by their
  joined frozen weights, one by their stacked A's, one block-diagonal B update; in backward one
  input-gradient matmul and no sum of three): fewer, larger matmuls and no per-projection passes.
  The attention forward is transformers' own for Llama / Mistral / Qwen2 / Qwen3 with the three
  projection calls replaced (`_attention_forward`); a call it does not cover (a KV cache) runs the
  original.
All give the same numbers as the transformers code under autocast (the casts happen where
autocast would do them). `patch_model` swaps them in for modules it recognises and leaves any
other module alone.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

from lorafit.ops import fused
from lorafit.ops.attention import Documents
from lorafit.tuner.kinds.base import input_for_grad
from lorafit.tuner.layer import join_shared_input, shared_input_forward


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
        # detached: the compiled kernel then serves training and evaluation alike (no recompile)
        y, rstd = fused.rms_norm_forward(x.detach(), weight.detach(), eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.weight_grad = weight.requires_grad
        ctx.mark_non_differentiable(rstd)
        return y, rstd

    @staticmethod
    def backward(ctx, dy: torch.Tensor, _: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx = fused.rms_norm_backward(x, weight, rstd, dy)
        dw = fused.rms_norm_weight_grad(x, rstd, dy).to(weight.dtype) if ctx.weight_grad else None
        return dx, dw, None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, ahead: _GradAhead | None):
        ctx.save_for_backward(gate, up)
        ctx.ahead = ahead
        return fused.swiglu_forward(gate.detach(), up.detach())

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        d = ctx.ahead.take(dout) if ctx.ahead is not None else None
        if d is None:
            d = fused.swiglu_backward(gate, up, dout)  # (..., 2 I): the two gradients side by side
        return *d.split(gate.shape[-1], -1), None


class _GradAhead:
    """down_proj's one-op backward, holding gate and up instead of h = silu(gate) * up, makes h
    again for its A gradient; it has h's gradient in hand by then, so it computes SwiGLU's
    gradient in the same pass (`fused.swiglu_backward_and_forward`) and leaves it here for
    `_SwiGLU.backward`, which takes it if the gradient it is handed is that very tensor (h read by
    nothing else: no sum of gradients, no write since), else computes its own."""

    def __init__(self):
        self.d: torch.Tensor | None = None
        self.key: tuple | None = None

    def t_mm(self, gt: torch.Tensor, gh: torch.Tensor | None, gate, up) -> torch.Tensor:
        if gh is None:
            h = fused.swiglu_forward(gate, up)
        else:
            self.d, h = fused.swiglu_backward_and_forward(gate, up, gh)
            self.key = _identity(gh)
        return gt.T.mm(h.reshape(gt.shape[0], -1))

    def take(self, dout: torch.Tensor) -> torch.Tensor | None:
        d, key, self.d, self.key = self.d, self.key, None, None
        return d if d is not None and key == _identity(dout) else None


def _identity(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t._version, t.shape, t.stride(), t.dtype


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return fused.rotary_forward(q.detach(), k.detach(), cos.detach(), sin.detach())

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        dq, dk = fused.rotary_backward(gq, gk, cos, sin)
        return dq, dk, None, None


class _RotaryRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, cos, sin, heads: int, d: int):
        ctx.save_for_backward(cos, sin)
        ctx.heads, ctx.d = heads, d
        return fused.rotary_rows_forward(y.detach(), cos.detach(), sin.detach(), heads, d)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return fused.rotary_rows_backward(g, cos, sin, ctx.heads, ctx.d), None, None, None, None


def rotary_rows(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, d: int):
    """`rotary` on token rows y (N, q | k | v): the first `heads` heads of d values (q's, k's)
    rotated by cos / sin (N, d), the rest unchanged; one pass each way, rows kept side by side."""
    return _RotaryRows.apply(y, cos, sin, heads, d)


def rotary(q, k, cos, sin):
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin)` (cos / sin (B, T, d), q / k
    (B, heads, T, d)) as one pass forward and one backward, fp32 math inside."""
    return _Rotary.apply(q, k, cos.unsqueeze(1), sin.unsqueeze(1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out_dtype = (
        torch.get_autocast_dtype(x.device.type)
        if torch.is_autocast_enabled(x.device.type)
        else x.dtype
    )
    y, rstd = _RMSNorm.apply(x, weight, eps, out_dtype)
    if torch.is_grad_enabled():  # the projections reading y keep x, 1 / rms(x) and w, not y
        input_for_grad(y, _norm_t_mm, x.detach(), rstd, weight.detach())
    return y


def _norm_t_mm(gt, gx, x, rstd, weight):
    """gt^T y for y = w * x / rms(x), from x: ((gt / rms)^T x) * w, no (tokens, hidden) pass."""
    n = gt.shape[0]
    scaled = (gt * rstd.reshape(n, 1)).to(x.dtype)  # (N, r)
    return scaled.T.mm(x.reshape(n, -1)).mul_(weight.to(x.dtype))


def swiglu(gate: torch.Tensor, up: torch.Tensor, recompute: bool = False) -> torch.Tensor:
    if not (recompute and torch.is_grad_enabled()):
        return _SwiGLU.apply(gate, up, None)
    ahead = _GradAhead()  # down_proj keeps gate and up, not h, and hands back SwiGLU's gradient
    return input_for_grad(_SwiGLU.apply(gate, up, ahead), ahead.t_mm, gate.detach(), up.detach())


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _gate_up(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pair = shared_input_forward((mlp.gate_proj, mlp.up_proj), x)
    return pair if pair is not None else (mlp.gate_proj(x), mlp.up_proj(x))


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(*_gate_up(self, x)))


_SLIDING_WINDOW = {  # the one argument the families' attention forwards differ in
    "LlamaAttention": lambda m: {},
    "MistralAttention": lambda m: {"sliding_window": getattr(m.config, "sliding_window", None)},
    "Qwen2Attention": lambda m: {"sliding_window": m.sliding_window},
    "Qwen3Attention": lambda m: {"sliding_window": m.sliding_window},
}


def _attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs
):
    """transformers' attention forward of these families (q_norm / k_norm where the module has
    them) with q / k / v from one `shared_input_forward`; the original when that does not apply
    or a cache is passed."""
    qkv = None
    if cache is None and "past_key_values" not in kwargs and position_embeddings is not None:
        layers = (self.q_proj, self.k_proj, self.v_proj)
        docs = kwargs.get("lorafit_attention")
        if (  # a padding-free row with a fixed rotary embedding: its documents padded once
            isinstance(docs, Documents)
            and hidden_states.shape[0] == 1
            and _fixed(position_embeddings)
        ):
            qkv = shared_input_forward(layers, hidden_states, joined=True)
            if qkv is not None:
                return _documents_attention(self, docs, qkv, position_embeddings), None
        else:
            qkv = shared_input_forward(layers, hidden_states)
    if qkv is None:
        return type(self).forward(
            self,
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
    family = sys.modules[type(self).__module__]
    input_shape = hidden_states.shape[:-1]
    q, k, v = (t.view(*input_shape, -1, self.head_dim) for t in qkv)
    if getattr(self, "q_norm", None) is not None:
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if _fixed(position_embeddings):
        q, k = rotary(q, k, *position_embeddings)
    else:  # a trained rotary embedding: transformers' op
        q, k = family.apply_rotary_pos_emb(q, k, *position_embeddings)
    attend = family.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, family.eager_attention_forward
    )
    out, weights = attend(
        self,
        q,
        k,
        v,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **_SLIDING_WINDOW[type(self).__name__](self),
        **kwargs,
    )
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _fixed(position_embeddings) -> bool:
    """Whether the rotary angles (cos, sin) are constants (not a trained rotary embedding)."""
    return not any(t.requires_grad for t in position_embeddings)


def _documents_attention(self, docs: Documents, qkv: torch.Tensor, position_embeddings):
    """The attention block of a padding-free row (1, N) from its q | k | v side by side (qkv,
    (1, N, sum out), one `shared_input_forward`), its documents padded once: rotated on the
    token rows in one pass that keeps them side by side (`rotary_rows`), one gather lays them out
    as (documents, longest, sum out) for the attention, one gather brings the outputs back to
    the row. With q_norm / k_norm (Qwen3), which come before the rotary embedding, both run on
    the padded layout (the rotary angles padded likewise). Transformers' path pads q, k and v
    one by one (three gathers forward, three scatters backward)."""
    d = self.head_dim
    sizes = [m.weight.shape[0] for m in (self.q_proj, self.k_proj, self.v_proj)]
    y = qkv[0]  # (N, sum out)
    norms = getattr(self, "q_norm", None) is not None
    if not norms:  # rotate q and k on the token rows: N tokens, not documents x longest
        cos, sin = (t[0] for t in position_embeddings)  # (N, d)
        y = rotary_rows(y, cos, sin, (sizes[0] + sizes[1]) // d, d)
    rows = docs.pad_rows(y)  # (D, L, sum out)
    q, k, v = (t.unflatten(-1, (-1, d)) for t in rows.split(sizes, -1))  # (D, L, heads, d)
    if norms:  # q_norm / k_norm come before the rotary embedding: both on the padded layout
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (D, heads, L, d)
    if norms:
        cos, sin = (docs.pad_rows(t[0]) for t in position_embeddings)  # (D, L, d)
        q, k = rotary(q, k, cos, sin)
    dropout = 0.0 if not self.training else self.attention_dropout
    out = docs.unpad(docs.attend_padded(self, q, k, v, self.scaling, dropout))  # (1, N, heads, d)
    return self.o_proj(out.reshape(*qkv.shape[:-1], -1))


def _mlp_forward_recompute(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(*_gate_up(self, x), recompute=True))


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
    `recompute_swiglu`: down_proj keeps gate and up rather than the SwiGLU output (moot, and off,
    under activation checkpointing, which recomputes the whole layer).
    """
    count = 0
    mlp_forward = _mlp_forward_recompute if recompute_swiglu else _mlp_forward
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
            count += 1
        elif _is_swiglu_mlp(module):
            join_shared_input((module.gate_proj, module.up_proj))
            module.forward = types.MethodType(mlp_forward, module)
            count += 1
        elif _is_attention(module) and join_shared_input(
            (module.q_proj, module.k_proj, module.v_proj)
        ):
            module.forward = types.MethodType(_attention_forward, module)
            count += 1
    return count


def _is_attention(module: nn.Module) -> bool:
    family = sys.modules.get(type(module).__module__)
    return type(module).__name__ in _SLIDING_WINDOW and all(
        hasattr(family, n)
        for n in ("apply_rotary_pos_emb", "ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")
    )
