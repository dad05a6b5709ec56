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
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from lorafit.ops import causal_attention

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


# ------------------------------------------------------------- attention given per forward --
IMPLEMENTATION = "lorafit"
"""The attention implementation `enable_lorafit_attention` registers with transformers."""


class Documents:
    """The attention of a padding-free row (1, N): each document attends causally to itself only.
    Built once per forward from the documents' lengths and passed as `lorafit_attention`. Its
    tokens are gathered into a padded (D, heads, longest, d) batch — slots past a document's end
    repeat its first token: right padding under a causal mask, which no real token sees — one SDPA
    call runs with is_causal (bf16 on CPU: `causal_attention`, flash forward + a lean backward;
    otherwise SDPA, the math kernel while the scores are small on CPU, as `attention_kernel`
    picks), and the real tokens are scattered back."""

    def __init__(self, doc_lens: torch.Tensor):
        lens = doc_lens.to("cpu", torch.long)
        self.count, self.longest = len(lens), int(lens.max())
        starts = torch.cumsum(lens, 0) - lens  # (D,)
        slot = torch.arange(self.longest)  # (L,)
        inside = slot[None, :] < lens[:, None]  # (D, L)
        gather = torch.where(inside, starts[:, None] + slot[None, :], starts[:, None])
        device = doc_lens.device
        self.gather = gather.reshape(-1).to(device)  # (D*L,) the token each slot reads
        self.scatter = torch.nonzero(inside.reshape(-1)).squeeze(1).to(device)  # (N,) its slot

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """(1, heads, N, d) -> (D, heads, longest, d)."""
        heads, d = x.shape[1], x.shape[3]
        x = x[0].index_select(1, self.gather).view(heads, self.count, self.longest, d)
        return x.transpose(0, 1)

    def pad_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) token rows -> (D, longest, C): one gather for everything a token carries (its
        q | k | v side by side, its rotary angles) rather than one per head tensor."""
        return x.index_select(0, self.gather).view(self.count, self.longest, x.shape[-1])

    def attend(self, module: nn.Module, query, key, value, scaling, dropout=0.0):
        q, k, v = (self._padded(t) for t in (query, key, value))  # (D, heads, L, d)
        return self.unpad(self.attend_padded(module, q, k, v, scaling, dropout))

    def attend_padded(self, module: nn.Module, q, k, v, scaling, dropout=0.0) -> torch.Tensor:
        """Causal attention of padded documents (D, heads, L, d) -> (D, heads, L, d)."""
        heads = q.shape[1]
        p = dropout if module.training else 0.0
        if q.dtype == torch.bfloat16 and causal_attention.supports(q, k, p):
            return causal_attention.causal_attention(q, k, v, scaling or q.shape[-1] ** -0.5)
        small = q.device.type == "cpu" and self.count * heads * self.longest**2 <= MATH_MAX_SCORES
        with sdpa_kernel([SDPBackend.MATH]) if small else contextlib.nullcontext():
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=p,
                is_causal=True,
                scale=scaling,
                enable_gqa=k.shape[1] != heads,
            )

    def unpad(self, out: torch.Tensor) -> torch.Tensor:
        """(D, heads, longest, d) -> (1, N, heads, d)."""
        out = out.transpose(1, 2).reshape(self.count * self.longest, out.shape[1], -1)
        return out.index_select(0, self.scatter).unsqueeze(0)


def lorafit_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    lorafit_attention=None,
    **kwargs,
):
    """transformers' attention-function signature. A forward called with `lorafit_attention=obj`
    (transformers hands extra keyword arguments down to every layer's attention) gets
    `obj.attend(module, query, key, value, scaling, dropout)`: `Documents` for padding-free
    training rows, the KV slots of `lorafit serve`. Without it, this is transformers' SDPA."""
    if lorafit_attention is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return lorafit_attention.attend(module, query, key, value, scaling, dropout), None


def enable_lorafit_attention(model: nn.Module) -> bool:
    """Route `model`'s attention through `lorafit_attention` (calls without the keyword are
    unchanged). False, leaving the model as it was, when its attention does not go through
    transformers' attention interface or does not use SDPA (padding-free rows then still train
    correctly: transformers' own mask, built from the position ids, keeps documents apart)."""
    cfg = getattr(model, "config", None)
    if not getattr(model, "_supports_attention_backend", False) or cfg is None:
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", IMPLEMENTATION):
        return False
    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, lorafit_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)  # generation: SDPA's masks
    model.set_attn_implementation(IMPLEMENTATION)
    return True
