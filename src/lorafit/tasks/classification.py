"""Sequence classification: text -> one of a set of labels, with a freshly initialised head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.data import ClassificationCollator, build_classification_examples
from lorafit.tasks.base import Task, eval_batches, register_task
from lorafit.tasks.metrics import accuracy, macro_f1
from lorafit.tuner.config import PEFT_SEQ_CLS_HEADS

LABELS_FILE = "labels.json"  # label names of a trained classifier, in head order


@register_task
class Classification(Task):
    name = "classification"
    peft_task_type = "SEQ_CLS"
    head = "classification"
    metrics = {"loss": "minimize", "accuracy": "maximize", "macro_f1": "maximize"}
    marker_files = (LABELS_FILE,)
    needs_labels_before_model = True

    def build_examples(self, records, tokenizer, data, labels=None):
        if not records:
            return [], labels
        return build_classification_examples(records, tokenizer, data.max_length, labels=labels)

    def collator(self, tokenizer):
        return ClassificationCollator(tokenizer.pad_token_id)

    def trained_heads(self, model: nn.Module) -> list[str]:
        return [n for n in PEFT_SEQ_CLS_HEADS if hasattr(model, n)]

    def target_count(self, batch):
        return int(batch["labels"].numel())

    @torch.no_grad()
    def evaluate(self, model, examples, collator, batch_size=8, chunk=2048, max_batches=None):
        if not examples:
            return {}
        total_loss, preds, golds = 0.0, [], []
        for batch in eval_batches(model, examples, collator, batch_size, max_batches):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits.float()  # (B, C)
            total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            preds += logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
        return {
            "loss": total_loss / max(len(golds), 1),
            "accuracy": accuracy(preds, golds),
            "macro_f1": macro_f1(preds, golds),
        }

    def infer(self, model, tokenizer, inputs, **options):
        return classify(model, tokenizer, inputs, **options)


def set_label_names(model: nn.Module, names: list[str]) -> None:
    """Name the head's outputs in the model config (saved with it, used by `classify`)."""
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


@torch.no_grad()
def classify(
    model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 512
) -> list[str]:
    """The predicted label name of each text."""
    device = next(model.parameters()).device
    labels = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        ).to(device)
        ids = model(**enc).logits.argmax(-1).tolist()  # (B,)
        labels += [model.config.id2label.get(i, str(i)) for i in ids]
    return labels
