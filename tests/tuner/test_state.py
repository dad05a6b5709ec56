import pytest
import torch

from helpers import model_input, outputs, randomize_adapters, tiny_llama
from lorafit import (LoraConfig, LoraLayer, add_weighted_adapter, active_adapters, adapter_names, delete_adapter,
                     disable_adapter, inject, merge, per_sample_adapters, set_active)


def _two_adapters(seed=0):
    model = tiny_llama(seed)
    x = model_input("llama")
    base = outputs(model, x)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    inject(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "o_proj"], use_rslora=True), "b")
    randomize_adapters(model)
    return model, x, base


def test_activate_switch_and_sum():
    model, x, base = _two_adapters()
    set_active(model, "a")
    ya = outputs(model, x)
    set_active(model, "b")
    yb = outputs(model, x)
    assert active_adapters(model) == ["b"]
    assert not torch.allclose(ya, yb)
    set_active(model, ["a", "b"])
    both = outputs(model, x)
    assert not torch.allclose(both, ya) and not torch.allclose(both, yb)
    with pytest.raises(KeyError, match="no adapter named"):
        set_active(model, "nope")


def test_disable_adapter_equals_base_even_when_merged():
    model, x, base = _two_adapters()
    set_active(model, ["a", "b"])
    with disable_adapter(model):
        torch.testing.assert_close(outputs(model, x), base, atol=1e-6, rtol=0)
    adapted = outputs(model, x)
    merge(model)
    with disable_adapter(model):
        torch.testing.assert_close(outputs(model, x), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs(model, x), adapted, atol=1e-5, rtol=1e-5)


def test_delete_adapter_unwraps_when_empty():
    model, x, base = _two_adapters()
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"]
    assert not isinstance(model.model.layers[0].self_attn.o_proj, LoraLayer)  # only "b" had it
    delete_adapter(model, "a")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    torch.testing.assert_close(outputs(model, x), base, atol=0, rtol=0)


def _delta(model, name, path):
    layer = model.get_submodule(path)
    return layer.delta_weight(name) if name in layer.adapters else 0


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_weighted_combination_is_weighted_sum_of_updates(how):
    model, x, _ = _two_adapters()
    add_weighted_adapter(model, ["a", "b"], [0.7, -1.3], "mix", combination_type=how, svd_rank=6)
    for path in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                 "model.layers.0.self_attn.o_proj"]:
        want = 0.7 * _delta(model, "a", path) - 1.3 * _delta(model, "b", path)
        torch.testing.assert_close(_delta(model, "mix", path), want, atol=1e-5, rtol=1e-4)
    # and the combined adapter runs like the sum of the two
    set_active(model, "mix")
    mixed = outputs(model, x)
    assert torch.isfinite(mixed).all()


def test_svd_truncation_keeps_top_directions():
    model, _, _ = _two_adapters()
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "low", combination_type="svd", svd_rank=1)
    path = "model.layers.0.self_attn.q_proj"
    full = _delta(model, "a", path) + _delta(model, "b", path)
    s = torch.linalg.svdvals(full)
    got = torch.linalg.svdvals(_delta(model, "low", path))
    assert got[0] == pytest.approx(s[0].item(), rel=1e-4) and got[1] < 1e-4


def test_linear_combination_follows_peft_factor_mix():
    model = tiny_llama()
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), "a")
    inject(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]), "b")
    randomize_adapters(model)
    add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], "lin", combination_type="linear")
    layer = model.model.layers[0].self_attn.q_proj
    a, b, lin = (layer.adapters[n] for n in ("a", "b", "lin"))
    torch.testing.assert_close(lin.A, (0.5 * 2) ** 0.5 * a.A + (2.0 * 1) ** 0.5 * b.A)
    torch.testing.assert_close(lin.B, (0.5 * 2) ** 0.5 * a.B + (2.0 * 1) ** 0.5 * b.B)
    assert lin.scale == 1.0
    with pytest.raises(ValueError, match="one rank"):
        m2, _, _ = _two_adapters()
        add_weighted_adapter(m2, ["a", "b"], [1, 1], "x", combination_type="linear")


def test_per_sample_adapters_match_separate_runs():
    model, x, base = _two_adapters()
    ids = torch.cat([x["input_ids"], x["input_ids"][:1]], 0)  # 3 rows
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    singles = {}
    for name in ("a", "b"):
        set_active(model, name)
        singles[name] = outputs(model, inp)
    with disable_adapter(model):
        singles["__base__"] = outputs(model, inp)
    names = ["a", "__base__", "b"]
    with per_sample_adapters(model, names):
        mixed = outputs(model, inp)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[n][i], atol=1e-5, rtol=1e-5)
