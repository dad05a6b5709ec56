"""Which scaled-dot-product-attention kernel a training step runs, by the size of its scores.

On CPU, torch's flash-attention kernel pays off for long sequences, but for the short, padded
batches of chat / instruction SFT (a batch of 8 examples of 60-160 tokens) its backward is the
single largest cost of a LoRA step (23% of SmolLM2-135M's step in torch.profiler, the closing note
of issue #16), and the plain "math" kernel (scores materialised, one softmax) runs the whole step
10-25% faster (benchmarks/short_examples.py; measured at B=8, T=100-160). Math keeps the
probabilities for backward, batch x heads x T^2 values per layer, so it is used only while those
stay small (MATH_MAX_SCORES; at B=4, T=256 flash was already faster). CUDA keeps torch's own choice.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

MATH_MAX_SCORES = 1 << 21
"""Largest batch x heads x T^2 that runs the math kernel on CPU (B=8, 9 heads, T=160 is 1.84M)."""


def attention_kernel(
    model: nn.Module, input_ids: torch.Tensor
) -> contextlib.AbstractContextManager:
    """The SDPA kernel choice for one forward (+ backward) of `model` on `input_ids` (B, T)."""
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if input_ids.device.type != "cpu" or not heads or input_ids.dim() != 2:
        return contextlib.nullcontext()
    B, T = input_ids.shape
    if B * heads * T * T > MATH_MAX_SCORES:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])
