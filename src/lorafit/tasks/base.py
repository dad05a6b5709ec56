"""The task interface: what training, evaluation and inference need to know about a kind of task.

A task turns records into examples, batches them, computes the training loss, evaluates and runs
inference. `train/`, `infer/` and `cli/` only talk to this interface, so a new task (image
classification, recommendation) is one new file registered with `register_task`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lorafit.data import batches


class Task:
    """One kind of task. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    """The `model.task` value that selects this task."""
    peft_task_type: ClassVar[str]
    """PEFT's task_type written into adapter_config.json (CAUSAL_LM, SEQ_CLS, ...)."""
    head: ClassVar[str]
    """The model head `lorafit.models.load_model` builds for this task."""
    generative: ClassVar[bool] = False
    """True when outputs are generated text (interactive chat makes sense)."""
    marker_files: ClassVar[tuple[str, ...]] = ()
    """Files that mark a trained adapter or model folder as this task's (e.g. labels.json)."""
    needs_labels_before_model: ClassVar[bool] = False
    """True when the label set (read from the data) decides the model's head size."""
    metrics: ClassVar[dict[str, str]] = {"loss": "minimize"}
    """The validation metrics `evaluate` returns, each with its better direction (maximize /
    minimize): what `lorafit tune` may optimise."""

    def build_examples(
        self, records: Sequence[dict], tokenizer, data, labels: list[str] | None = None
    ) -> tuple[list[dict], list[str] | None]:
        """(tokenized examples, label names or None). `data` is the run's data options."""
        raise NotImplementedError

    def pack(self, examples: list[dict], data) -> list[dict]:
        """Training examples as the loop sees them (a task may pack several into one sequence)."""
        return examples

    padding_free = False
    """Whether `collator(tokenizer, padding_free=True)` lays a batch out without padding."""

    def collator(self, tokenizer) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def trained_heads(self, model: nn.Module) -> list[str]:
        """Modules that must train in full with the adapter (a freshly initialised head)."""
        return []

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss targets a batch holds (micro-batches are weighted by it)."""
        raise NotImplementedError

    def input_count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the throughput counts in a batch: its tokens (input_ids), else its examples."""
        if "input_ids" in batch:
            return int(batch["input_ids"].numel())
        return self.target_count(batch)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
        """Mean loss over the batch's targets, with a graph for backward. Default: the loss the
        model computes itself from the batch (its labels / ratings)."""
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        examples: list[dict],
        collator: Callable,
        batch_size: int = 8,
        chunk: int = 2048,
        max_batches: int | None = None,
    ) -> dict[str, float]:
        """Validation metrics over tokenized examples, in a fixed order. Empty examples: {}."""
        raise NotImplementedError

    def infer(self, model: nn.Module, tokenizer, inputs: list[Any], **options) -> list[str]:
        """Outputs for user inputs (generated text, predicted labels)."""
        raise NotImplementedError

    eval_needs_context: ClassVar[bool] = False
    """True when evaluation needs the run's other examples (`eval_view`)."""

    def eval_view(self, examples: list[dict], context: list[dict]) -> list[dict]:
        """What `evaluate` reads for held-out `examples`, given every example of the run
        (`context`: train, validation and history). Default: the examples themselves."""
        return examples

    def fresh_model(self, options: dict, records_lists, dtype=torch.float32):
        """(model, processor) for `model.name: new`: a model built from scratch, sized from the
        records (train, validation, history). Only tasks whose models lorafit defines can."""
        raise ValueError(
            f"model.name: new (a fresh model) is not available for task {self.name}; give a "
            "pretrained model"
        )

    def write_report(self, model, examples, collator, folder: Path, batch_size: int = 32) -> list:
        """Figures of an evaluation written into `folder` (`lorafit eval --report`); the paths."""
        return []

    def product_files(self, data, processor) -> dict[str, str]:
        """Files saved beside a trained adapter or model (name -> text): what inference needs
        to read inputs as training did. They include the task's marker file."""
        return {}

    def read_product_files(self, folder: Path, processor):
        """The processor inference uses, given a trained folder's product files."""
        return processor


def eval_batches(
    model: nn.Module,
    examples: list[dict],
    collator: Callable,
    batch_size: int,
    max_batches: int | None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in file order on the model's device, with the model in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        order = batches(examples, batch_size, collator, seed=0, epoch=0, shuffle=False)
        for i, batch in enumerate(order):
            if max_batches is not None and i >= max_batches:
                break
            yield {k: v.to(device) for k, v in batch.items()}
    finally:
        model.train(was_training)


_TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` selectable as `model.task: <cls.name>`."""
    _TASKS[cls.name] = cls()
    return cls


DEFAULT_TASK = "causal-lm"  # what `model.task` defaults to, and what an unmarked adapter is


def task_of_folder(folder: Path | None, peft_task_type: str | None = None) -> Task:
    """The task an adapter or model folder was trained for: the one with the most of its marker
    files there (an image classifier's labels.json and image_preprocessing.json beat a text
    classifier's labels.json alone), else the one writing its PEFT task_type, else the default."""
    tasks = [_TASKS[n] for n in task_names()]
    if folder is not None:
        held = [sum((Path(folder) / f).is_file() for f in t.marker_files) for t in tasks]
        if max(held) > 0:
            return tasks[held.index(max(held))]
    for task in tasks:
        if peft_task_type and task.peft_task_type == peft_task_type:
            return task
    return _TASKS[DEFAULT_TASK]


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; choose one of: {', '.join(task_names())}"
        ) from None
