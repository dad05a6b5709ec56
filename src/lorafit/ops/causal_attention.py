"""Causal attention for CPU training: torch's flash kernel forward, a math backward from its
log-sum-exp.

On CPU, for the short documents of chat / instruction SFT (T ~ 100, head dim 64), torch's two SDPA
kernels are each good at one half: flash's forward is ~4x faster than math's (no T x T scores
kept, no fp32 copies of q / k / v), while flash's backward is ~3.5x slower than math's (measured at
8 documents x 9 heads x 100 tokens, bf16, 2 cores; `benchmarks/short_examples.py --profile`). So
forward runs `_scaled_dot_product_flash_attention_for_cpu`, which also returns each row's
log-sum-exp, and backward recomputes the probabilities from it (P = exp(q k^T s - lse)) and applies
the attention gradient in fp32 with four batched matmuls: no probabilities are kept between
forward and backward (math keeps batch x heads x T^2 fp32 values per layer).

Grouped-query attention (fewer key/value heads) needs no repeated keys or values: the query heads
of one key/value head are laid end to end, (G*T, d) against (T, d), so dK and dV sum over the group
inside the matmuls.
"""

from __future__ import annotations

import torch

from lorafit.ops import fused


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, True, scale=scale
        )
        ctx.save_for_backward(q, k, v, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, lse = ctx.saved_tensors
        B, H, T, d = q.shape
        G, n = H // k.shape[1], B * k.shape[1]
        f32 = torch.float32
        q3 = q.reshape(n, G * T, d)  # the G query heads of a key/value head, end to end
        k3, v3 = k.reshape(n, T, d), v.reshape(n, T, d)
        do3 = d_out.reshape(n, G * T, d)
        s = torch.bmm(q3.to(f32), k3.to(f32).transpose(1, 2))  # scores and dP in fp32
        dp = torch.bmm(do3.to(f32), v3.to(f32).transpose(1, 2))  # (n, GT, T)
        p, ds = fused.attention_grad_scores(s, dp, lse.reshape(n, G * T, 1), ctx.scale, T, q.dtype)
        # the products of p and ds in q's dtype (bf16: as flash attention's backward on GPUs)
        dv = torch.bmm(p.transpose(1, 2), do3)  # (n, T, d): sums over the group
        dq = torch.bmm(ds, k3).view(B, H, T, d)
        dk = torch.bmm(ds.transpose(1, 2), q3)
        return dq, dk.view_as(k), dv.view_as(v), None


def causal_attention(q, k, v, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v for (B, heads, T, d) queries and (B, kv_heads, T, d)
    keys / values (heads a multiple of kv_heads), on CPU."""
    return _CausalAttention.apply(q, k, v, scale)


def supports(q: torch.Tensor, k: torch.Tensor, dropout: float) -> bool:
    """Whether `causal_attention` computes what SDPA would here."""
    return (
        q.device.type == "cpu"
        and dropout == 0.0
        and q.dtype in (torch.float32, torch.bfloat16)
        and q.dtype == k.dtype
        and q.shape[1] % k.shape[1] == 0
        and q.shape[2] == k.shape[2]
    )
