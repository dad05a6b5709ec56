"""The KV cache of a continuously batched decoder: one buffer of slots, one request per slot.

transformers runs the model; the attention of each layer comes here through the `lorafit_attention`
kwarg that `ops.attention` hands on (so no cache class of transformers is involved):
- `Prefill(slots, row)`: a new request's prompt, (1, n): its keys and values go to its slot at
  positions 0..n-1, and it attends causally to itself.
- `Decode(slots, positions)`: one new token for each of S running requests, (S, 1), each at its own
  position: its key and value are written at that position of its slot, and its query attends to
  the slot's first position + 1 keys (a length mask; the rest of the buffer is never read).
Slots 0..S-1 are the running requests, kept contiguous (a finished request's slot is filled with
the last one's), so decoding reads the buffer as a view, never gathering it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVSlots:
    """Keys and values of up to `slots` sequences of up to `max_len` tokens, for every layer."""

    def __init__(self, config, slots: int, max_len: int, dtype: torch.dtype, device):
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = (slots, kv_heads, max_len, head_dim)
        # one tensor per layer (not one 5-d tensor): a compiled step then writes each layer's
        # new keys in place instead of copying a view's whole base (decoder.py)
        layers = range(config.num_hidden_layers)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.slots, self.max_len = slots, max_len

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compaction)."""
        for buf in (*self.k, *self.v):
            buf[dst, :, :length] = buf[src, :, :length]


def _attend(q, k, v, scaling, mask=None):
    """q (S, H, n, d) against k, v (S, Hkv, L, d), grouped-query without copying k and v."""
    S, H, n, d = q.shape
    kv_heads = k.shape[1]
    g = H // kv_heads
    q = q.reshape(S, kv_heads, g * n, d)  # heads h = kv * g + j share kv head kv
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling  # (S, Hkv, g*n, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).to(v.dtype)
    out = torch.matmul(probs, v)  # (S, Hkv, g*n, d)
    return out.reshape(S, H, n, d).transpose(1, 2)  # (S, n, H, d)


class Prefill:
    def __init__(self, cache: KVSlots, slot: int):
        self.cache, self.slot = cache, slot

    def attend(self, module: nn.Module, query, key, value, scaling, dropout=0.0):
        layer, n = module.layer_idx, key.shape[2]
        self.cache.k[layer][self.slot, :, :n] = key[0]
        self.cache.v[layer][self.slot, :, :n] = value[0]
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            is_causal=True,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )  # (1, H, n, d)
        return out.transpose(1, 2)


class Decode:
    """One new token per row. `slots[i]` is row i's slot (default: slot i); rows may come in
    another order than their slots (the engine sorts them by adapter), the attention still reads
    slots 0..S-1 as one view and only the queries are put in slot order and back."""

    def __init__(self, cache: KVSlots, positions: torch.Tensor, slots: torch.Tensor | None = None):
        self.cache = cache
        self.positions = positions  # (S,) where each row's new token goes
        S = len(positions)
        self.slots = torch.arange(S, device=positions.device) if slots is None else slots
        self.permuted = slots is not None
        if self.permuted:
            self.row_of_slot = torch.argsort(slots)  # (S,): the row held by slot j
            positions = positions[self.row_of_slot]  # in slot order
        self.longest = int(positions.max()) + 1
        span = torch.arange(self.longest, device=positions.device)
        self.mask = (span[None, :] <= positions[:, None])[:, None, None, :]  # (S, 1, 1, L)

    def attend(self, module: nn.Module, query, key, value, scaling, dropout=0.0):
        layer, S = module.layer_idx, query.shape[0]
        k_buf, v_buf = self.cache.k[layer], self.cache.v[layer]
        k_buf[self.slots, :, self.positions] = key[:, :, 0]
        v_buf[self.slots, :, self.positions] = value[:, :, 0]
        if self.permuted:
            query = query[self.row_of_slot]
        out = _attend(
            query, k_buf[:S, :, : self.longest], v_buf[:S, :, : self.longest], scaling, self.mask
        )
        return out[self.slots] if self.permuted else out  # back to row order
