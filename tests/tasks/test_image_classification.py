"""Image classification: examples, batches, LoRA on the convolutions (step-0 identity, PEFT
interop), depthwise convolutions refused with the reason."""

import numpy as np
import peft
import pytest
import torch

from helpers import randomize_adapters, tiny_cnn
from lorafit import LoraConfig, inject, save_adapter
from lorafit.data import RecordList
from lorafit.models.vision import ImageProcessor
from lorafit.tasks import get_task
from lorafit.tasks.image_classification import confusion_matrix, write_confusion_png
from lorafit.train.config import DataOptions

TASK = get_task("image-classification")
POINTWISE = ".*(_expand_conv|_project_conv|_conv_head|_conv_stem)"


def records(n=6):
    rng = np.random.default_rng(0)
    recs = [
        {"image": rng.integers(0, 255, (10, 12), dtype=np.uint8), "label": i % 3} for i in range(n)
    ]
    return RecordList(recs, "mem.idx", [f"row {i + 1}" for i in range(n)])


def test_examples_are_resized_uint8_and_labels_index_the_sorted_names():
    proc = ImageProcessor(16, [0.5] * 3, [0.5] * 3)
    examples, names = TASK.build_examples(records(), proc, DataOptions(image_size=8))
    assert names == ["0", "1", "2"]
    assert examples[0]["pixels"].shape == (1, 8, 8) and examples[0]["pixels"].dtype == torch.uint8
    assert [e["label"] for e in examples] == [0, 1, 2, 0, 1, 2]
    batch = TASK.collator(proc)(examples[:2])
    assert batch["pixel_values"].shape == (2, 3, 8, 8)  # greyscale expanded to RGB
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


def test_an_unknown_label_names_its_row():
    proc = ImageProcessor(8, [0.5] * 3, [0.5] * 3)
    with pytest.raises(ValueError, match="row 1: unknown label '0'"):
        TASK.build_examples(records(), proc, DataOptions(), labels=["1", "2"])


def test_lora_on_the_convolutions_is_the_base_model_at_step_0():
    model, ref = tiny_cnn(), tiny_cnn()
    inject(model, LoraConfig(r=4, target_modules=POINTWISE, modules_to_save=["classifier"]))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=0)


def test_conv_adapter_loads_in_peft_with_equal_logits(tmp_path):
    model = tiny_cnn()
    inject(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=POINTWISE, modules_to_save=["classifier"]),
    )
    randomize_adapters(model)
    save_adapter(model, tmp_path / "ad")
    theirs = peft.PeftModel.from_pretrained(tiny_cnn(), tmp_path / "ad").eval()
    x = torch.randn(2, 3, 16, 16)
    ours = model(x).logits
    assert not torch.allclose(ours, tiny_cnn()(x).logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(theirs(pixel_values=x).logits, ours, atol=1e-5, rtol=1e-5)


def test_depthwise_convolutions_are_refused_with_the_reason():
    with pytest.raises(TypeError, match="depthwise.*cannot merge"):
        inject(tiny_cnn(), LoraConfig(r=4, target_modules=".*_depthwise_conv"))


def test_confusion_matrix_rows_are_true_classes(tmp_path):
    m = confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    png = write_confusion_png(m, ["a", "b", "c"], tmp_path / "cm.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
