"""Causal-LM loss without the full logits tensor.

A 135M model with a 49,152-token vocabulary spends more memory on fp32 logits (B*T*V*4 bytes,
and again for their gradient) than on everything else in a LoRA step. So the loss here:
  1. runs the decoder body to hidden states (B, T, H),
  2. keeps only the positions that have a label (the answer tokens: prompt and padding cost nothing),
  3. applies the output head chunk by chunk, so at most one (chunk, V) block of logits exists at
     a time. When the head is a plain `nn.Linear` (the usual tied, frozen LM head), training uses
     `linear_cross_entropy`: each chunk's gradient (softmax - one-hot, times the head) is computed
     right in the forward pass, so nothing of the logits is kept and backward does not recompute
     them (one head matmul per chunk less than checkpointing, which is ~10% of a SmolLM2 step).
     Other heads (e.g. a LoRA-wrapped one) run each chunk under activation checkpointing instead.
It falls back to the model's own forward for heads that do more than a linear map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorafit.ops import fused
from lorafit.ops.attention import Documents

IGNORE_INDEX = -100


def supports_chunked_head(model: nn.Module) -> bool:
    """True when logits are exactly `lm_head(decoder(x))`, so the head can be applied in chunks."""
    cfg = getattr(model, "config", None)
    if (
        cfg is None
        or not hasattr(model, "get_output_embeddings")
        or not hasattr(model, "base_model")
    ):
        return False
    if model.base_model is model or model.get_output_embeddings() is None:
        return False
    # Heads that scale or soft-cap logits (Gemma 2/3, Cohere, Granite, ...) are computed by the model.
    for attr in (
        "final_logit_softcapping",
        "logit_scale",
        "logits_scaling",
        "output_multiplier_scale",
    ):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return False
    return True


# The labelled rows are padded to a multiple of this (zero rows, left out of the loss): the head's
# matmuls then see a few row counts, whose oneDNN primitives stay cached, instead of a new count
# each step (creating the (rows, V) x (V, hidden) one cost ~10 ms, as much as running it).
ROWS_MULTIPLE = 32


def _padded(h: torch.Tensor, target: torch.Tensor, multiple: int):
    """(h, target, valid) with zero rows (target 0, valid False) up to a multiple of `multiple`."""
    n, pad = h.shape[0], -h.shape[0] % multiple
    valid = torch.ones(n + pad, dtype=torch.bool, device=h.device)
    if pad:
        h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
        target = torch.cat([target, target.new_zeros(pad)])
        valid[n:] = False
    return h, target, valid


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """(start, end) of chunks of <= chunk rows, except that a last chunk of 1 row joins the one
    before it: the compiled loss kernel would compile once more for a size-1 dimension."""
    bounds = [*range(0, n, chunk), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(zip(bounds, bounds[1:]))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T + b, target_i) with its gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk):
        # Matmuls run in the dtype autocast would pick (bf16 under bf16 autocast), CE math in fp32:
        # the same numbers as `F.cross_entropy(head(hidden).float(), target)` under autocast.
        dtype = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else torch.promote_types(hidden.dtype, weight.dtype)
        )
        acc = torch.promote_types(dtype, torch.float32)  # CE math: fp32 (fp64 stays fp64)
        W, h_all = weight.to(dtype), hidden.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        want_w = weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        n = hidden.shape[0]
        multiple = ROWS_MULTIPLE if chunk % ROWS_MULTIPLE == 0 else 1  # padding in the last chunk
        h_all, target, valid = _padded(h_all, target, multiple)
        for start, end in _chunks(h_all.shape[0], chunk):
            h, t, ok = h_all[start:end], target[start:end], valid[start:end]
            real = min(end, n) - start  # rows before the padding
            # t copied: a view would tie the compiled kernel's guards to its base's size (recompiles)
            part, g = fused.cross_entropy_grad_(F.linear(h, W, b), t.clone(), ok.clone())
            total += part  # g: d(sum CE)/d logits (written over them), zero in padding rows
            if grad_h is not None:
                grad_h[start : start + real] = (g @ W)[:real].to(hidden.dtype)
            if want_w:
                grad_w += (g.T @ h).to(acc)
            if want_b:
                grad_b += g.sum(0, dtype=acc)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = [
            None if g is None else (g * grad_out).to(dt)
            for g, dt in zip(ctx.saved_tensors, ctx.dtypes)
        ]
        return grads[0], grads[1], grads[2], None, None


def linear_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, target: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `target` (n,), without keeping any logits."""
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, target, chunk)


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V)
    return F.cross_entropy(logits, labels, reduction="sum")


def _chunk_loss_and_hits(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor):
    return fused.cross_entropy_hits(head(hidden), labels.clone())  # no graph: evaluation


def causal_lm_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 2048, need_accuracy: bool = False
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(mean next-token loss over labelled tokens, number of labelled tokens, correct predictions)."""
    labels = batch["labels"]  # (B, T)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "doc_lens")}
    if "doc_lens" in batch:  # a padding-free row: each layer's attention through ops.attention
        inputs["lorafit_attention"] = Documents(batch["doc_lens"])
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE_INDEX  # (B, T-1)
    n = int(keep.sum())
    if not supports_chunked_head(model):
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        loss = F.cross_entropy(logits[keep], target[keep], reduction="sum")
        correct = (logits[keep].argmax(-1) == target[keep]).sum() if need_accuracy else None
        return loss / max(n, 1), n, correct
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    hidden = hidden[:, :-1][keep]  # (n, H)
    target = target[keep]  # (n,)
    head = model.get_output_embeddings()
    if (
        torch.is_grad_enabled() and not need_accuracy and type(head) is nn.Linear
    ):  # training: no logits kept
        return linear_cross_entropy(hidden, head, target, chunk) / max(n, 1), n, None
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start, end in _chunks(n, chunk):  # no 1-row chunk: the compiled kernels' size-1 recompile
        h, t = hidden[start:end], target[start:end]
        if need_accuracy:  # evaluation: no graph, and the argmax is wanted
            part, hits = _chunk_loss_and_hits(head, h, t)
            correct = correct + hits
        elif torch.is_grad_enabled() and h.requires_grad:
            part = checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            part = _chunk_loss(head, h, t)
        total = total + part
    return total / max(n, 1), n, correct if need_accuracy else None
