"""Causal language modelling: chat / instruction / prompt-completion / plain-text SFT, and generation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorafit.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    build_causal_lm_examples,
    pack_examples,
    render_prompt,
    with_system,
)
from lorafit.ops.lm_loss import causal_lm_loss
from lorafit.tasks.base import Task, eval_batches, register_task
from lorafit.tuner import adapter_rows


ROW_MULTIPLE = 64
"""Padding-free rows are padded to a multiple of this many tokens (see CausalLMCollator): in 10
steps of E2E batches, native memory (oneDNN's per-shape primitives) grew 8 MB per step instead of
18, for ~5% more tokens."""


@register_task
class CausalLM(Task):
    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    head = "causal-lm"
    metrics = {"loss": "minimize", "perplexity": "minimize", "token_accuracy": "maximize"}
    generative = True
    padding_free = True

    def build_examples(self, records: Sequence[dict], tokenizer, data, labels=None):
        if not records:
            return [], None
        examples = build_causal_lm_examples(
            records,
            tokenizer,
            data.max_length,
            train_on_prompt=data.train_on_prompt,
            system_prompt=data.system_prompt,
        )
        return examples, None

    def pack(self, examples: list[dict], data) -> list[dict]:
        """Training examples packed into max_length sequences when `data.packing` asks for it."""
        return pack_examples(examples, data.max_length) if data.packing else examples

    def collator(self, tokenizer, padding_free=False):
        if padding_free:
            return CausalLMCollator(tokenizer.pad_token_id, ROW_MULTIPLE, padding_free=True)
        return CausalLMCollator(tokenizer.pad_token_id)

    def target_count(self, batch):
        # Position 0 is never a target: logits at t-1 predict labels[t].
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model, batch, chunk):
        return causal_lm_loss(model, batch, chunk)[0]

    @torch.no_grad()
    def evaluate(self, model, examples, collator, batch_size=8, chunk=2048, max_batches=None):
        if not examples:
            return {}
        total_loss, total_n, total_correct = 0.0, 0, 0
        for batch in eval_batches(model, examples, collator, batch_size, max_batches):
            loss, n, correct = causal_lm_loss(model, batch, chunk, need_accuracy=True)
            total_loss += loss.item() * n
            total_n += n
            total_correct += int(correct)
        mean = total_loss / max(total_n, 1)
        return {
            "loss": mean,
            "perplexity": math.exp(min(mean, 50.0)),
            "token_accuracy": total_correct / max(total_n, 1),
        }

    def infer(self, model, tokenizer, inputs, **options):
        return generate(model, tokenizer, inputs, **options)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str | list[dict[str, str]]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    system: str | None = None,
    batch_size: int = 8,
    adapter_names: list[str] | None = None,
) -> list[str]:
    """Complete each prompt (a user message, or a whole message list); greedy when temperature is 0.

    The prompt text is rendered exactly as training rendered the text before an answer. With
    `adapter_names`, prompt i runs with adapter adapter_names[i] ("__base__": none) in one batch.
    """
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"got {len(adapter_names)} adapter names for {len(prompts)} prompts")
    device = next(model.parameters()).device
    texts = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        texts.append(render_prompt(tokenizer, with_system(messages, system)))
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    outputs: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,  # the rendered text already holds BOS where one belongs
            ).to(device)
            rows = adapter_names[start : start + batch_size] if adapter_names else None
            with adapter_rows(rows, model):
                out = model.generate(**enc, **kwargs)  # (B, T + new)
            new = out[:, enc["input_ids"].shape[1] :]
            outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = old_side
    return outputs
