"""Causal-LM loss without the full logits tensor.

A 135M model with a 49,152-token vocabulary spends more memory on fp32 logits (B*T*V*4 bytes,
and again for their gradient) than on everything else in a LoRA step. So the loss here:
  1. runs the decoder body to hidden states (B, T, H),
  2. keeps only the positions that have a label (the answer tokens: prompt and padding cost nothing),
  3. applies the output head chunk by chunk under activation checkpointing, so at most one
     (chunk, V) block of logits exists at a time, in forward and in backward.
It falls back to the model's own forward for heads that do more than a linear map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def supports_chunked_head(model: nn.Module) -> bool:
    """True when logits are exactly `lm_head(decoder(x))`, so the head can be applied in chunks."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "get_output_embeddings") or not hasattr(model, "base_model"):
        return False
    if model.base_model is model or model.get_output_embeddings() is None:
        return False
    # Heads that scale or soft-cap logits (Gemma 2/3, Cohere, Granite, ...) are computed by the model.
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return False
    return True


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()                                        # (n, V)
    return F.cross_entropy(logits, labels, reduction="sum")


def _chunk_loss_and_hits(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor):
    logits = head(hidden).float()                                        # (n, V)
    return F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(-1) == labels).sum()


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 2048,
                   need_accuracy: bool = False) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(mean next-token loss over labelled tokens, number of labelled tokens, correct predictions)."""
    labels = batch["labels"]                                             # (B, T)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    target = labels[:, 1:]                                               # (B, T-1)
    keep = target != IGNORE_INDEX                                        # (B, T-1)
    n = int(keep.sum())
    if not supports_chunked_head(model):
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        loss = F.cross_entropy(logits[keep], target[keep], reduction="sum")
        correct = (logits[keep].argmax(-1) == target[keep]).sum() if need_accuracy else None
        return loss / max(n, 1), n, correct
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    hidden = hidden[:, :-1][keep]                                        # (n, H)
    target = target[keep]                                                # (n,)
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, n, chunk):
        h, t = hidden[start:start + chunk], target[start:start + chunk]
        if need_accuracy:  # evaluation: no graph, and the argmax is wanted
            part, hits = _chunk_loss_and_hits(head, h, t)
            correct = correct + hits
        elif torch.is_grad_enabled() and h.requires_grad:
            part = checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            part = _chunk_loss(head, h, t)
        total = total + part
    return total / max(n, 1), n, correct if need_accuracy else None
