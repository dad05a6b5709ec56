"""Evaluation: loss / perplexity / token accuracy (causal LM), accuracy / macro-F1 (classification)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.data.batching import batches
from lorafit.ops.lm_loss import causal_lm_loss
from lorafit.tasks.metrics import accuracy, macro_f1
from lorafit.ops.precision import autocast_context, resolve_precision


@torch.no_grad()
def evaluate_examples(model: nn.Module, examples: list[dict], collator: Callable, task: str, batch_size: int = 8,
                      chunk: int = 2048, max_batches: int | None = None) -> dict[str, float]:
    """Metrics over tokenized examples, in a fixed order (no shuffling)."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_n, total_correct = 0.0, 0, 0
    preds, golds = [], []
    for i, batch in enumerate(batches(examples, batch_size, collator, seed=0, epoch=0, shuffle=False)):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        if task == "classification":
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()  # (B, C)
            total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            total_n += batch["labels"].numel()
            preds += logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
        else:
            loss, n, correct = causal_lm_loss(model, batch, chunk, need_accuracy=True)
            total_loss += loss.item() * n
            total_n += n
            total_correct += int(correct)
    model.train(was_training)
    mean = total_loss / max(total_n, 1)
    if task == "classification":
        return {"loss": mean, "accuracy": accuracy(preds, golds), "macro_f1": macro_f1(preds, golds)}
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "token_accuracy": total_correct / max(total_n, 1)}


def prompts_and_references(records: list[dict]) -> tuple[list[list[dict]], list[list[str]]]:
    """Group records by prompt: (one message list per distinct prompt, all reference answers for it).
    Data-to-text sets (E2E) have several human references per input; each output is scored
    against all of them, as their official scripts do."""
    from lorafit.data.records import detect_format

    grouped: dict[str, tuple[list[dict], list[str]]] = {}
    for rec in records:
        fmt = detect_format(rec)
        if fmt == "prompt_completion":
            messages, answer = [{"role": "user", "content": rec["prompt"]}], rec["completion"]
        elif fmt == "alpaca":
            text = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
            messages, answer = [{"role": "user", "content": text}], rec["output"]
        elif fmt == "messages":
            msgs = rec["messages"]
            if msgs[-1]["role"] != "assistant":
                raise ValueError("generation scoring needs conversations that end with an assistant answer")
            messages, answer = msgs[:-1], msgs[-1]["content"]
        else:
            raise ValueError(f"generation scoring needs prompt/answer records, not {fmt!r} records")
        key = repr(messages)
        grouped.setdefault(key, (messages, []))[1].append(answer)
    return [m for m, _ in grouped.values()], [r for _, r in grouped.values()]


def evaluate_run(cfg, adapter: str | None = None, data: str | None = None, generate: bool = False,
                 max_new_tokens: int = 64, num_beams: int = 1, limit: int | None = None,
                 predictions: str | None = None, loss: bool = True) -> dict[str, float]:
    """`lorafit eval`: score an adapter (default: the run's) or the base model on validation data.
    The teacher-forced pass (loss, perplexity, token accuracy) runs under the run's precision;
    `loss=False` skips it (e.g. when only generation metrics are wanted on a large test set)."""
    import json
    from pathlib import Path

    from lorafit.data.batching import (CausalLMCollator, ClassificationCollator, build_causal_lm_examples,
                       build_classification_examples, with_system)
    from lorafit.data.records import load_split_records, read_records
    from lorafit.infer.generate import generate as run_generation
    from lorafit.infer.generate import load_for_inference

    adapter = adapter or str(Path(cfg.train.output_dir) / "adapter")
    use_adapter = adapter.lower() != "none"
    if use_adapter and not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter folder {adapter} does not exist; train first or pass --adapter")
    model, tokenizer = load_for_inference(cfg.model.name, adapter if use_adapter else None, cfg.model.device,
                                          cfg.model.dtype, cfg.model.cache_dir)
    if data:
        records = read_records(data, cfg.data.columns)
    else:
        records = load_split_records(cfg.data.train, cfg.data.validation, cfg.data.val_fraction, cfg.train.seed,
                                     cfg.data.max_examples, cfg.data.columns)[1]
    records = records[:limit] if limit else records
    if cfg.model.task == "classification":
        names = list(model.config.id2label.values()) if use_adapter else None
        if names is None:
            raise ValueError("classification eval needs a trained adapter (its head and labels.json)")
        examples = build_classification_examples(records, tokenizer, cfg.data.max_length, labels=names)[0]
        return evaluate_examples(model, examples, ClassificationCollator(tokenizer.pad_token_id), "classification",
                                 cfg.train.batch_size)
    metrics: dict[str, float] = {}
    if loss:
        examples = build_causal_lm_examples(records, tokenizer, cfg.data.max_length,
                                            train_on_prompt=cfg.data.train_on_prompt,
                                            system_prompt=cfg.data.system_prompt)
        device = next(model.parameters()).device
        with autocast_context(resolve_precision(cfg.train.precision, device), device):
            metrics = evaluate_examples(model, examples, CausalLMCollator(tokenizer.pad_token_id), "causal-lm",
                                        cfg.train.batch_size, cfg.train.loss_chunk)
    if generate:
        from lorafit.tasks.metrics import generation_scores

        prompts, refs = prompts_and_references(records)
        prompts = [with_system(p, cfg.data.system_prompt) for p in prompts]
        hyps = run_generation(model, tokenizer, prompts, max_new_tokens, num_beams=num_beams,
                              batch_size=cfg.train.batch_size)
        metrics.update(generation_scores(hyps, refs))
        metrics["generated"] = len(hyps)
        if predictions:
            with open(predictions, "w", encoding="utf-8") as f:
                for p, h, r in zip(prompts, hyps, refs):
                    f.write(json.dumps({"prompt": p[-1]["content"], "output": h, "references": r}) + "\n")
    return metrics
