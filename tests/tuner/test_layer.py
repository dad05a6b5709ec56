"""LoraLayer's own logic, written once for every kind: scale, init, dropout, several adapters,
merge bookkeeping, fp32 adapters on a half-precision base, per-row adapters."""

import copy
import math

import pytest
import torch
from torch import nn

from lorafit.tuner.layer import LoraLayer
from lorafit.tuner.rows import rows_context
from lorafit.tuner.variants import variants_for


def _randomize(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _two(base=None, dora_b=True):
    torch.manual_seed(0)
    layer = LoraLayer(base or nn.Linear(8, 6))
    layer.add_adapter("a", r=2, alpha=4)
    layer.add_adapter("b", r=3, alpha=3, variants=variants_for({"use_dora": dora_b}))
    _randomize(layer)
    return layer


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
    layer.add_adapter("f", r=8, alpha=8, init=False)
    assert torch.all(layer.adapters["k"].B == 0) and torch.all(layer.adapters["g"].B == 0)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.adapters["k"].A.abs().max() <= bound
    assert layer.adapters["g"].A.std().item() == pytest.approx(1 / 8, rel=0.15)
    assert layer.adapters["f"].B.abs().min() > 0  # PEFT's non-identity init: B random too


def test_active_adapters_sum_and_merged_ones_are_not_added_twice():
    layer = _two(dora_b=False)  # plain updates add; a DoRA one rescales what is below it
    x = torch.randn(4, 8)
    base = layer.base_layer(x)
    outs = {}
    for names in (["a"], ["b"], ["a", "b"]):
        layer.active = names
        outs["+".join(names)] = layer(x)
    torch.testing.assert_close(outs["a+b"] - base, (outs["a"] - base) + (outs["b"] - base))
    layer.merge(["a"])
    layer.merge(["a"])  # idempotent
    assert layer.merged == ["a"]
    torch.testing.assert_close(layer(x), outs["a+b"], atol=1e-5, rtol=1e-5)
    layer.merge(["b"])
    torch.testing.assert_close(layer(x), outs["a+b"], atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert layer.merged == [] and all(ad.merge_state is None for ad in layer.adapters.values())
    torch.testing.assert_close(layer(x), outs["a+b"], atol=1e-5, rtol=1e-5)


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
    assert y.dtype == torch.bfloat16
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


def test_rows_pick_an_adapter_per_row():
    layer = _two()
    x = torch.randn(3, 5, 8)  # (B, T, in)
    singles = {}
    for name in ("a", "b"):
        layer.active = [name]
        singles[name] = layer(x)
    singles["__base__"] = layer.base_layer(x)
    layer.active = ["a", "b"]  # ignored while rows are given
    names = ["b", "__base__", "a"]
    with rows_context(names):
        mixed = layer(x)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[n][i], atol=1e-6, rtol=1e-6)
    assert not hasattr(layer, "sample_adapters")  # the choice is per call, never module state
    with (
        rows_context(["a", "b"]),
        pytest.raises(ValueError, match="2 adapter names for a batch of 3"),
    ):
        layer(x)
    layer.merge(["a"])
    with rows_context(names), pytest.raises(RuntimeError, match="unmerge"):
        layer(x)


@pytest.mark.parametrize("grad", [False, True])
def test_rows_sorted_by_adapter_add_each_update_to_its_slice(grad):
    # A batch sorted by adapter (the server's decoding batches) takes the in-place slice path
    # under no_grad; with autograd on it keeps the gather path. Both equal each adapter alone.
    layer = _two()
    x = torch.randn(5, 3, 8)
    singles = {}
    for name in ("a", "b"):
        layer.active = [name]
        singles[name] = layer(x).detach()
    singles["__base__"] = layer.base_layer(x).detach()
    names = ["__base__", "a", "a", "b", "b"]
    with torch.set_grad_enabled(grad), rows_context(names):
        mixed = layer(x)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[n][i], atol=1e-6, rtol=1e-6)
    if grad:
        mixed.sum().backward()
        assert layer.adapters["a"].B.grad is not None


def test_deepcopy_shares_kind_and_variants_and_runs():
    layer = _two(nn.Conv2d(3, 4, 3, padding=1))
    layer.active = ["a", "b"]
    clone = copy.deepcopy(layer)
    assert clone.kind is layer.kind and clone.adapters["b"].variants == layer.adapters["b"].variants
    assert clone.adapters["a"].A.data_ptr() != layer.adapters["a"].A.data_ptr()
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(clone(x), layer(x), atol=0, rtol=0)
