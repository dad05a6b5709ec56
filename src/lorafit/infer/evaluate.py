"""`lorafit eval`: score an adapter (default: the run's), a fine-tuned model or the base model.

Teacher-forced metrics come from the task (loss / perplexity / token accuracy, or accuracy /
macro-F1); `generate=True` also decodes answers and scores them against every reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.atomic import write_text
from lorafit.data import load_split_records, prompt_and_answer, read_records, with_system
from lorafit.infer.loading import load_for_inference
from lorafit.ops.precision import autocast_context, resolve_precision
from lorafit.tasks import get_task
from lorafit.tasks.causal_lm import generate as run_generation
from lorafit.tasks.metrics import generation_scores


def prompts_and_references(records: list[dict]) -> tuple[list[list[dict]], list[list[str]]]:
    """Group records by prompt: (one message list per distinct prompt, all reference answers).
    Data-to-text sets (E2E) have several human references per input; each output is scored
    against all of them, as their official scripts do."""
    grouped: dict[str, tuple[list[dict], list[str]]] = {}
    for rec in records:
        messages, answer = prompt_and_answer(rec)
        grouped.setdefault(repr(messages), (messages, []))[1].append(answer)
    return [m for m, _ in grouped.values()], [r for _, r in grouped.values()]


def _context(cfg, task, processor, labels) -> list[dict]:
    """Every example of the run's files (train, validation, history), for `Task.eval_view`."""
    d = cfg.data
    paths = [d.train, d.validation, *(d.history or [])]
    context = []
    for path in filter(None, paths):
        context += task.build_examples(read_records(path, d.columns), processor, d, labels)[0]
    return context


def evaluate_run(
    cfg,
    adapter: str | None = None,
    data: str | None = None,
    generate: bool = False,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    limit: int | None = None,
    predictions: str | None = None,
    loss: bool = True,
    report: str | None = None,
) -> dict[str, float]:
    """Metrics of an adapter folder (default: <output_dir>/adapter; "none": the base model) on
    `data` or the run's validation split. The teacher-forced pass runs under the run's precision;
    `loss=False` skips it (e.g. when only generation metrics are wanted on a large test set)."""
    task = get_task(cfg.model.task)
    # The run's product: an adapter, or with full fine-tuning a whole model folder.
    product = "model" if cfg.train.method != "lora" else "adapter"
    adapter = adapter or str(Path(cfg.train.output_dir) / product)
    use_adapter = adapter.lower() != "none"
    if use_adapter and not Path(adapter).is_dir():
        raise FileNotFoundError(
            f"{product} folder {adapter} does not exist; train first or pass --adapter"
        )
    if not use_adapter and task.needs_labels_before_model:
        raise ValueError(f"{task.name} eval needs a trained adapter (its head and label names)")
    d = cfg.data
    if data:
        records = read_records(data, d.columns)
    else:
        split = load_split_records(
            d.train, d.validation, d.val_fraction, cfg.train.seed, d.max_examples, d.columns
        )
        records = split[1]
    records = records[:limit] if limit else records
    if not records:
        raise ValueError(
            "no evaluation records: give --data FILE, data.validation, or data.val_fraction > 0"
        )
    model, tokenizer = load_for_inference(
        cfg.model.name if not use_adapter else None,
        adapter if use_adapter else None,
        cfg.model.device,
        cfg.model.dtype,
        cfg.model.cache_dir,
    )
    metrics: dict[str, float] = {}
    if loss or task.needs_labels_before_model:
        labels = list(model.config.id2label.values()) if task.needs_labels_before_model else None
        examples, _ = task.build_examples(records, tokenizer, d, labels=labels)
        if task.eval_needs_context:  # e.g. what a user already has: never recommended again
            examples = task.eval_view(examples, _context(cfg, task, tokenizer, labels))
        device = next(model.parameters()).device
        with autocast_context(resolve_precision(cfg.train.precision, device), device):
            metrics = task.evaluate(
                model,
                examples,
                task.collator(tokenizer),
                cfg.train.batch_size,
                cfg.train.loss_chunk,
            )
            if report:
                collate = task.collator(tokenizer)
                task.write_report(model, examples, collate, Path(report), cfg.train.batch_size)
    if generate:
        prompts, refs = prompts_and_references(records)
        prompts = [with_system(p, d.system_prompt) for p in prompts]
        hyps = run_generation(
            model,
            tokenizer,
            prompts,
            max_new_tokens,
            num_beams=num_beams,
            batch_size=cfg.train.batch_size,
        )
        metrics.update(generation_scores(hyps, refs))
        metrics["generated"] = len(hyps)
        if predictions:
            rows = [
                {"prompt": p[-1]["content"], "output": h, "references": r}
                for p, h, r in zip(prompts, hyps, refs)
            ]
            write_text(predictions, "".join(json.dumps(row) + "\n" for row in rows))
    return metrics
