"""Image classification: image -> one of a set of labels, a CNN with a freshly initialised head.

Examples hold each image once, resized to `data.image_size` (default: the model's) as uint8
(C, S, S); a batch is normalised as the model expects by the model's image processor. The head
trains in full (modules_to_save), LoRA goes on the convolutions the config targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafit.data import label_set, resolve_image
from lorafit.data.records import record_location
from lorafit.tasks.base import eval_batches, register_task
from lorafit.tasks.classification import LABELS_FILE, Classification
from lorafit.tasks.metrics import accuracy, macro_f1

PREPROCESSING_FILE = "image_preprocessing.json"
"""Beside a trained image adapter or model: the size and normalisation its images had."""


def _open_image(image, where: str):
    if not isinstance(image, Path):
        return image  # an array (IDX)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            im.load()
            return im
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"{where}: cannot read image {image} ({exc})") from None


@register_task
class ImageClassification(Classification):
    """Classification's head, targets and metrics; images instead of text."""

    name = "image-classification"
    peft_task_type = None  # PEFT has no image task type: its image recipes leave it unset
    head = "image-classification"
    marker_files = (PREPROCESSING_FILE, LABELS_FILE)

    def build_examples(self, records, processor, data, labels=None):
        if not records:
            return [], labels
        processor = processor.resized(getattr(data, "image_size", None))
        source = getattr(records, "path", None)
        names = []
        for i, record in enumerate(records):
            if "image" not in record or "label" not in record:
                where = record_location(records, i)
                raise ValueError(f"{where}: expected an image + label record, got {sorted(record)}")
            names.append(str(record["label"]).strip())
        labels = label_set(names, labels)
        index = {name: k for k, name in enumerate(labels)}
        examples = []
        for i, (record, name) in enumerate(zip(records, names)):
            where = record_location(records, i)
            if name not in index:
                raise ValueError(f"{where}: unknown label {name!r}; known labels: {labels}")
            try:
                pixels = processor.to_uint8(
                    _open_image(resolve_image(record["image"], source), where)
                )
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            examples.append({"pixels": pixels, "label": index[name]})
        return examples, labels

    def collator(self, processor):
        def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
            channels = max(e["pixels"].shape[0] for e in examples)
            pixels = torch.stack([e["pixels"].expand(channels, -1, -1) for e in examples])
            return {
                "pixel_values": processor.normalise(pixels),  # (N, 3, S, S)
                "labels": torch.tensor([e["label"] for e in examples]),
            }

        return collate

    @torch.no_grad()
    def predictions(self, model, examples, collator, batch_size=64, max_batches=None):
        """(total loss, predicted ids, gold ids) over the examples."""
        total, preds, golds = 0.0, [], []
        for batch in eval_batches(model, examples, collator, batch_size, max_batches):
            logits = model(pixel_values=batch["pixel_values"]).logits.float()  # (N, C)
            total += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            preds += logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
        return total, preds, golds

    @torch.no_grad()
    def evaluate(self, model, examples, collator, batch_size=8, chunk=2048, max_batches=None):
        if not examples:
            return {}
        total, preds, golds = self.predictions(
            model, examples, collator, max(batch_size, 32), max_batches
        )
        return {
            "loss": total / max(len(golds), 1),
            "accuracy": accuracy(preds, golds),
            "macro_f1": macro_f1(preds, golds),
        }

    def write_report(self, model, examples, collator, folder: Path, batch_size: int = 32) -> list:
        """confusion_matrix.png and confusion_matrix.json (rows: true class, columns: predicted)."""
        from lorafit.atomic import write_json

        _, preds, golds = self.predictions(model, examples, collator, max(batch_size, 32))
        names = [model.config.id2label.get(i, str(i)) for i in range(model.config.num_labels)]
        matrix = confusion_matrix(preds, golds, len(names))
        title = f"accuracy {accuracy(preds, golds):.4f}, macro-F1 {macro_f1(preds, golds):.4f}"
        png = write_confusion_png(matrix, names, Path(folder) / "confusion_matrix.png", title)
        js = write_json(
            Path(folder) / "confusion_matrix.json", {"labels": names, "matrix": matrix.tolist()}
        )
        return [png, js]

    def product_files(self, data, processor) -> dict[str, str]:
        p = processor.resized(getattr(data, "image_size", None))
        return {
            PREPROCESSING_FILE: json.dumps({"size": p.size, "mean": p.mean, "std": p.std}) + "\n"
        }

    def read_product_files(self, folder: Path, processor):
        try:
            saved = json.loads((Path(folder) / PREPROCESSING_FILE).read_text())
            return processor.resized(int(saved["size"]))
        except (OSError, ValueError, KeyError, TypeError):
            return processor

    def infer(self, model, processor, inputs, **options):
        """Predicted label names of images (paths or arrays)."""
        examples = [
            {"pixels": processor.to_uint8(_open_image(resolve_image(x, None), str(x))), "label": 0}
            for x in inputs
        ]
        _, preds, _ = self.predictions(model, examples, self.collator(processor))
        return [model.config.id2label.get(i, str(i)) for i in preds]


def confusion_matrix(preds: list[int], golds: list[int], n: int) -> torch.Tensor:
    """(n, n) counts: row = true class, column = predicted class."""
    pairs = torch.tensor(golds) * n + torch.tensor(preds)
    return torch.bincount(pairs, minlength=n * n).view(n, n)


def write_confusion_png(matrix: torch.Tensor, names: list[str], png: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorafit.atomic import write_file

    n = len(names)
    rates = matrix.float() / matrix.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n), dpi=110)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                str(int(matrix[i, j])),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        write_file(png, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return png
