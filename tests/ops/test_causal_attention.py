"""`causal_attention` (flash forward, math backward from the log-sum-exp) computes causal SDPA:
the output and the q / k / v gradients of an fp64 reference, with and without grouped keys."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lorafit.ops.causal_attention import causal_attention, supports


def _inputs(dtype, heads, kv_heads, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, heads, T, 16, generator=g)
    k = torch.randn(3, kv_heads, T, 16, generator=g)
    v = torch.randn(3, kv_heads, T, 16, generator=g)
    d_out = torch.randn(3, heads, T, 16, generator=g)
    return [t.to(dtype) for t in (q, k, v)], d_out.to(dtype)


def _run(fn, qkv, d_out, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in qkv]
    out = fn(*leaves)
    out.backward(d_out.to(dtype))
    return [out.detach(), *(t.grad for t in leaves)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=0.3, enable_gqa=k.shape[1] != q.shape[1]
    )


def _errors(got, exact):
    return [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, exact)]


@pytest.mark.parametrize("heads,kv_heads,T", [(4, 4, 7), (6, 2, 13), (9, 3, 33)])
def test_fp32_equals_sdpa(heads, kv_heads, T):
    qkv, d_out = _inputs(torch.float32, heads, kv_heads, T)
    exact = _run(_sdpa, qkv, d_out, torch.float64)
    got = _run(lambda q, k, v: causal_attention(q, k, v, 0.3), qkv, d_out, torch.float32)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, exact):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("heads,kv_heads,T", [(4, 4, 7), (9, 3, 33)])
def test_bf16_is_as_close_to_exact_as_sdpas_math_kernel(heads, kv_heads, T):
    """bf16 inputs: each result's relative error within 1.5x of what SDPA's math kernel (fp32
    inside) gets on the same inputs."""
    qkv, d_out = _inputs(torch.bfloat16, heads, kv_heads, T)
    exact = _run(_sdpa, qkv, d_out, torch.float64)
    with sdpa_kernel([SDPBackend.MATH]):
        math = _errors(_run(_sdpa, qkv, d_out, torch.bfloat16), exact)
    ours = _errors(
        _run(lambda q, k, v: causal_attention(q, k, v, 0.3), qkv, d_out, torch.bfloat16), exact
    )
    for name, o, m in zip(("out", "dq", "dk", "dv"), ours, math):
        assert o <= 1.5 * m + 1e-4, (name, o, m)


def test_supports_only_what_it_computes():
    q, k = torch.zeros(1, 4, 5, 8), torch.zeros(1, 2, 5, 8)
    assert supports(q, k, 0.0)
    assert not supports(q, k, 0.1)  # dropout
    assert not supports(q, torch.zeros(1, 3, 5, 8), 0.0)  # heads not a multiple of kv heads
    assert not supports(q, torch.zeros(1, 2, 6, 8), 0.0)  # keys of another length
    assert not supports(q.double(), k.double(), 0.0)
