import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.tuner.layer import LoraLayer, TrainedCopy, layer_kind


def _bases():
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(12, 10), torch.randn(3, 5, 12)),
        "conv1d_gpt2": (Conv1D(10, 12), torch.randn(3, 5, 12)),
        "embedding": (nn.Embedding(20, 10, padding_idx=0), torch.randint(0, 20, (3, 5))),
        "conv2d": (nn.Conv2d(4, 6, 3, padding=1, stride=2), torch.randn(2, 4, 7, 7)),
        "conv1d": (nn.Conv1d(4, 6, 3), torch.randn(2, 4, 9)),
    }


def _randomize(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", list(_bases()))
@pytest.mark.parametrize("dora", [False, True])
def test_step0_identity(kind, dora):
    base, x = _bases()[kind]
    expected = base(x)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=4, alpha=8, dora=dora)
    layer.active = ["a"]
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "embedding", "conv2d"])
def test_forward_matches_dense_update(kind):
    """The low-rank branch equals running the base op with W + scale * B A."""
    base, x = _bases()[kind]
    layer = LoraLayer(base)
    layer.add_adapter("a", r=3, alpha=6)
    layer.active = ["a"]
    _randomize(layer)
    got = layer(x)
    layer.merge(["a"])
    torch.testing.assert_close(base(x), got, atol=1e-5, rtol=1e-5)


def test_scale_plain_and_rslora():
    layer = LoraLayer(nn.Linear(8, 8))
    layer.add_adapter("plain", r=16, alpha=32)
    layer.add_adapter("rs", r=16, alpha=32, rslora=True)
    assert layer.adapters["plain"].scale == 2.0
    assert layer.adapters["rs"].scale == pytest.approx(32 / math.sqrt(16))


def test_inits():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(64, 32))
    layer.add_adapter("k", r=8, alpha=8)
    layer.add_adapter("g", r=8, alpha=8, init="gaussian")
    assert torch.all(layer.adapters["k"].B == 0) and torch.all(layer.adapters["g"].B == 0)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.adapters["k"].A.abs().max() <= bound
    assert layer.adapters["g"].A.std().item() == pytest.approx(1 / 8, rel=0.15)


def test_pissa_keeps_output_and_takes_top_singular_directions():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    W0 = base.weight.detach().clone()
    x = torch.randn(4, 16)
    expected = base(x)
    layer = LoraLayer(base)
    layer.add_adapter("p", r=4, alpha=4, init="pissa")
    layer.active = ["p"]
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    ad = layer.adapters["p"]
    top = torch.linalg.svdvals(W0)[:4]
    torch.testing.assert_close(torch.linalg.svdvals(ad.scale * ad.B @ ad.A)[:4], top, atol=1e-4, rtol=1e-4)
    # the residual left in the base has the top-r directions removed
    torch.testing.assert_close(torch.linalg.svdvals(base.weight.detach())[:8], torch.linalg.svdvals(W0)[4:12],
                               atol=1e-4, rtol=1e-4)


def test_dora_norm_formula_matches_explicit():
    base = nn.Linear(10, 6)
    layer = LoraLayer(base)
    layer.add_adapter("d", r=3, alpha=5, dora=True)
    _randomize(layer)
    ad = layer.adapters["d"]
    explicit = (base.weight + ad.scale * ad.B @ ad.A).norm(dim=1)
    torch.testing.assert_close(layer.weight_norm(ad), explicit, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the cached ||W||^2 must follow in-place changes of the base weight
        base.weight.mul_(2)
    explicit = (base.weight + ad.scale * ad.B @ ad.A).norm(dim=1)
    torch.testing.assert_close(layer.weight_norm(ad), explicit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(_bases()))
@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_round_trip(kind, dora):
    base, x = _bases()[kind]
    W0 = base.weight.detach().clone()
    layer = LoraLayer(base)
    layer.add_adapter("a", r=4, alpha=8, dora=dora)
    layer.active = ["a"]
    _randomize(layer)
    unmerged = layer(x)
    layer.merge(["a"])
    layer.merge(["a"])  # idempotent
    assert layer.merged == ["a"]
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), W0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_refuses_nan_and_leaves_weight():
    base = nn.Linear(6, 6)
    W0 = base.weight.detach().clone()
    layer = LoraLayer(base)
    layer.add_adapter("a", r=2, alpha=2)
    with torch.no_grad():
        layer.adapters["a"].B.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        layer.merge(["a"])
    assert torch.equal(base.weight, W0) and layer.merged == []


def test_half_precision_base_merges_in_fp32():
    base = nn.Linear(32, 32).to(torch.bfloat16)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=4, alpha=4)
    layer.active = ["a"]
    assert layer.adapters["a"].A.dtype == torch.float32
    _randomize(layer)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    y = layer(x)
    layer.merge(["a"])
    assert base.weight.dtype == torch.bfloat16
    torch.testing.assert_close(base(x), y, atol=0.1, rtol=0.05)


def test_dropout_only_in_training_and_not_on_base():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=2, alpha=2, dropout=0.5)
    layer.active = ["a"]
    x = torch.randn(4, 8)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)  # B = 0: dropout never reaches the base path
    _randomize(layer)
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_unsupported_modules():
    assert layer_kind(nn.LayerNorm(4)) is None
    with pytest.raises(TypeError):
        LoraLayer(nn.LayerNorm(4))
    with pytest.raises(TypeError, match="grouped"):
        LoraLayer(nn.Conv2d(4, 4, 3, groups=2))


def test_trained_copy_switches_with_active():
    head = nn.Linear(4, 2)
    holder = TrainedCopy(head)
    holder.add_copy("a")
    with torch.no_grad():
        holder.copies["a"].weight.add_(1.0)
    x = torch.randn(3, 4)
    torch.testing.assert_close(holder(x), head(x))
    holder.active = ["a"]
    assert not torch.allclose(holder(x), head(x))
    assert not head.weight.requires_grad or head.weight is not holder.copies["a"].weight
