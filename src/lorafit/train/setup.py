"""A run's inputs made ready: records read and split, tokenized by the task, the base model loaded
with the task's head, the adapter added (or every weight made trainable), a checkpoint's weights
restored, and the lean training setup applied.

    records -> examples (task) -> model (+ LoRA | full) -> [checkpoint weights] -> lean setup
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafit.data.records import load_split_records
from lorafit.models.loading import load_model, load_tokenizer, pick_device
from lorafit.ops.attention import enable_lorafit_attention
from lorafit.ops.precision import resolve_precision
from lorafit.tasks import Task
import lorafit.train.checkpoints as ckpt
from lorafit.train.config import NO_VALIDATION_FILE, RunConfig, early_stopping_needs_validation
from lorafit.train.step import prepare_for_training
from lorafit.tuner.inject import inject
from lorafit.tuner.peft_format import load_adapter
from lorafit.tuner.state import delete_adapter

ADAPTER = "default"
"""The name of the adapter a LoRA run trains."""


@dataclass
class Prepared:
    """What `prepare` hands the trainer."""

    model: nn.Module
    tokenizer: Any
    task: Task
    train: list[dict]
    """Tokenized (and, when asked, packed) training examples."""
    val: list[dict]
    """Tokenized validation examples; empty when the run has no validation data."""
    collator: Callable[[list[dict]], dict[str, torch.Tensor]]
    precision: str
    """The resolved precision: fp32 or bf16."""
    label_names: list[str] | None = None
    no_validation: str = ""
    """Why there is no validation data ("" when there is)."""
    adapter: str | None = ADAPTER
    """The trained adapter's name; None for full fine-tuning."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def read_splits(cfg: RunConfig) -> tuple[list[dict], list[dict], str]:
    """(train records, validation records, why there is no validation: "" when there is).

    Early stopping without validation data is refused here, before any model is loaded."""
    d = cfg.data
    if not d.train:
        raise ValueError("data.train is not set: give a training file (jsonl/csv/tsv)")
    train, val = load_split_records(
        d.train, d.validation, d.val_fraction, cfg.train.seed, d.max_examples, d.columns
    )
    reason = "" if val else _no_validation_reason(cfg, len(train))
    _check_validation_needed(cfg, reason)
    return train, val, reason


def read_history(cfg: RunConfig) -> list:
    """The records of data.history's files (ids and context only, never trained on)."""
    from lorafit.data import read_records

    return [read_records(path, cfg.data.columns) for path in cfg.data.history or []]


def _train_heads_only(model: nn.Module, task: Task) -> None:
    heads = task.trained_heads(model)
    if not heads:
        raise ValueError(
            f"train.method: head trains only a task's fresh head, and task {task.name} has "
            "none; use train.method: lora or full"
        )
    model.requires_grad_(False)
    for name in heads:
        model.get_submodule(name).requires_grad_(True)


def _no_validation_reason(cfg: RunConfig, n_train: int) -> str:
    d = cfg.data
    if d.validation:
        return f"data.validation {d.validation} holds no usable example"
    if d.val_fraction == 0:
        return NO_VALIDATION_FILE
    return f"data.val_fraction {d.val_fraction} of {n_train} training rows leaves no example"


def _check_validation_needed(cfg: RunConfig, no_validation: str) -> None:
    if no_validation and cfg.train.early_stopping_patience:
        raise ValueError(early_stopping_needs_validation(no_validation))


def prepare(cfg: RunConfig, task: Task, weights_from: Path | None = None) -> Prepared:
    """Read and tokenize the data, load the model, add the adapter; with `weights_from` (a
    checkpoint folder) the trained weights are those of the checkpoint."""
    d, m, t = cfg.data, cfg.model, cfg.train
    train_rec, val_rec, no_validation = read_splits(cfg)  # a bad file fails before the model load
    history_rec = read_history(cfg)
    if m.name == "new":  # a model built from scratch, sized from the data
        torch.manual_seed(t.seed)
        model, tokenizer = task.fresh_model(m.init or {}, [train_rec, val_rec, *history_rec])
        model = model.to(pick_device(m.device))
        model.config._name_or_path = "new"
        model.__dict__["lorafit_base"] = {"requested": "new"}
        train, names = task.build_examples(train_rec, tokenizer, d)
    elif task.needs_labels_before_model:  # the label set decides the head's size
        tokenizer = load_tokenizer(m.name, m.cache_dir)
        train, names = task.build_examples(train_rec, tokenizer, d)
        model, tokenizer = _load(cfg, task, len(names))
    else:
        model, tokenizer = _load(cfg, task, None)
        train, names = task.build_examples(train_rec, tokenizer, d)
    val, _ = task.build_examples(val_rec, tokenizer, d, labels=names)
    if not train:
        raise ValueError(f"{d.train}: no training examples left after the validation split")
    if val_rec and not val:
        no_validation = _no_validation_reason(cfg, len(train_rec))
        _check_validation_needed(cfg, no_validation)
    if task.eval_needs_context:
        history = [e for recs in history_rec for e in task.build_examples(recs, tokenizer, d)[0]]
        val = task.eval_view(val, train + val + history)
    train = task.pack(train, d)
    torch.manual_seed(t.seed)  # the adapter's initial values
    adapter = ADAPTER if t.method == "lora" else None
    if t.method == "head":
        _train_heads_only(model, task)
    elif adapter is None:
        model.requires_grad_(True)
    else:
        try:
            inject(model, _adapter_config(cfg, task, model), adapter)
        except TypeError as exc:  # a targeted module LoRA cannot wrap: the config's fault
            raise ValueError(f"lora.target_modules: {exc}") from None
    if weights_from is not None:
        _restore_weights(model, weights_from, adapter)
    precision = resolve_precision(t.precision, next(model.parameters()).device)
    prepare_for_training(
        model,
        precision,
        t.gradient_checkpointing,
        t.recompute_mlp,
        t.fused_kernels,
        # ReLoRA: fp32 until its callback keeps fp32 masters; a linear probe saves the whole
        # model, whose frozen weights must stay as loaded
        frozen_bf16=t.relora is None and t.method != "head",
    )
    padding_free = d.padding_free and task.padding_free and enable_lorafit_attention(model)
    return Prepared(
        model,
        tokenizer,
        task,
        train,
        val,
        task.collator(tokenizer, padding_free=True) if padding_free else task.collator(tokenizer),
        precision,
        names,
        no_validation,
        adapter,
    )


def load_dtype_for(cfg: RunConfig, fresh_head: bool) -> str:
    """model.dtype, except that a bf16 LoRA run whose every loaded weight stays frozen streams
    its weights straight into bf16: prepare_for_training would cast them to exactly these values
    anyway, after a float32 load that briefly held the model at twice the size. Runs that train
    loaded weights (full fine-tuning, modules_to_save) or a fresh head keep them float32, and so
    does ReLoRA (its restarts merge updates into fp32 masters of the base; train/relora.py casts
    the model's copy to bf16 once the masters are taken)."""
    m, t = cfg.model, cfg.train
    if m.dtype != "auto" or t.method != "lora" or cfg.lora.modules_to_save or fresh_head:
        return m.dtype
    if t.relora is not None:  # every restart merges into the base: float32 keeps the updates
        return "float32"
    return "bfloat16" if resolve_precision(t.precision, pick_device(m.device)) == "bf16" else "auto"


def _load(cfg: RunConfig, task: Task, num_labels: int | None):
    m = cfg.model
    return load_model(
        m.name,
        head=task.head,
        num_labels=num_labels,
        dtype=load_dtype_for(cfg, num_labels is not None),
        device=m.device,
        cache_dir=m.cache_dir,
        quantize=m.quantize,
        quantize_backend=m.quantize_backend,
    )


def _adapter_config(cfg: RunConfig, task: Task, model: nn.Module):
    lora = cfg.lora
    heads = task.trained_heads(model)
    if heads and not lora.modules_to_save:  # a freshly initialised head must train
        lora = dataclasses.replace(lora, modules_to_save=heads)
    return dataclasses.replace(
        lora,
        base_model_name_or_path=model.config._name_or_path,
        task_type=task.peft_task_type,
    )


def _restore_weights(model: nn.Module, checkpoint: Path, adapter: str | None) -> None:
    if adapter is None:
        ckpt.load_weights(model, checkpoint)
    else:
        delete_adapter(model, adapter)
        load_adapter(model, checkpoint, adapter, trainable=True)
