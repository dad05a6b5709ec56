"""LoRA variants as hook objects: DoRA and PiSSA, alone and together, and the registry."""

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import model_input, outputs, randomize_adapters, tiny_llama
from lorafit import LoraConfig, add_weighted_adapter, inject, load_adapter, save_adapter
from lorafit.tuner.layer import LoraLayer
from lorafit.tuner.variants import (
    LORA,
    Variant,
    registered_variants,
    resumable,
    update_variant,
    variants_for,
)
from lorafit.tuner.variants import base as variants_base
from lorafit.tuner.variants.dora import DORA, weight_norm
from lorafit.tuner.variants.pissa import PISSA


def _randomize(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_selection_and_order():
    assert variants_for({"use_dora": False, "init_lora_weights": True}) == ()
    assert variants_for({"use_dora": True}) == (DORA,)
    both = variants_for(
        vars(LoraConfig(target_modules=["q"], use_dora=True, init_lora_weights="pissa_niter_4"))
    )
    assert both == (PISSA, DORA)  # PiSSA re-expresses W before DoRA measures it
    assert update_variant(both) is DORA and update_variant((PISSA,)) is LORA


def test_two_variants_owning_the_update_are_refused(monkeypatch):
    class Other(Variant):
        name = "other"
        owns_update = True

        def selected(self, settings):
            return True

    monkeypatch.setattr(variants_base, "_VARIANTS", [*variants_base._VARIANTS, Other()])
    with pytest.raises(ValueError, match="each replace the update"):
        variants_for({"use_dora": True})


def test_dora_norm_formula_matches_explicit():
    base = nn.Linear(10, 6)
    layer = LoraLayer(base)
    layer.add_adapter("d", r=3, alpha=5, variants=variants_for({"use_dora": True}))
    _randomize(layer)
    ad = layer.adapters["d"]
    explicit = (base.weight + ad.scale * ad.B @ ad.A).norm(dim=1)
    torch.testing.assert_close(weight_norm(layer, ad), explicit, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the cached ||W||^2 must follow in-place changes of the base weight
        base.weight.mul_(2)
    explicit = (base.weight + ad.scale * ad.B @ ad.A).norm(dim=1)
    torch.testing.assert_close(weight_norm(layer, ad), explicit, atol=1e-5, rtol=1e-5)


def test_dora_forward_is_the_decomposed_weight_also_with_dropout():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = LoraLayer(base)
    layer.add_adapter("d", r=3, alpha=5, variants=variants_for({"use_dora": True}), dropout=0.4)
    layer.active = ["d"]
    _randomize(layer)
    ad = layer.adapters["d"]
    x = torch.randn(4, 10)
    with torch.no_grad():
        delta = ad.scale * ad.B @ ad.A  # (out, in)
        W = base.weight + delta
        mscale = ad.magnitude / W.norm(dim=1)  # (out,)
        layer.eval()
        torch.testing.assert_close(layer(x), F.linear(x, mscale[:, None] * W, base.bias))
        layer.train()
        torch.manual_seed(9)
        got = layer(x)
        torch.manual_seed(9)
        xd = F.dropout(x, 0.4, training=True)  # the same mask the layer drew
        want = base(x) + (mscale - 1) * F.linear(xd, base.weight) + mscale * F.linear(xd, delta)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


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
    sv = torch.linalg.svdvals(ad.scale * ad.B @ ad.A)[:4]
    torch.testing.assert_close(sv, top, atol=1e-4, rtol=1e-4)
    # the residual left in the base has the top-r directions removed
    rest = torch.linalg.svdvals(base.weight.detach())[:8]
    torch.testing.assert_close(rest, torch.linalg.svdvals(W0)[4:12], atol=1e-4, rtol=1e-4)


def test_pissa_with_dora_saves_a_dora_file_on_the_original_weights(tmp_path):
    dora = True  # PiSSA alone: test_peft_format.py
    model = tiny_llama()
    x = model_input("llama")
    before = outputs(model, x)
    targets = ["q_proj", "v_proj", "embed_tokens"]
    inject(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa", use_dora=dora
        ),
    )
    torch.testing.assert_close(outputs(model, x), before, atol=1e-4, rtol=1e-4)
    randomize_adapters(model)
    want = outputs(model, x)
    save_adapter(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"], cfg["use_dora"]) == (
        8,
        16,
        True,
        dora,
    )
    fresh = tiny_llama()  # the original W0, not the PiSSA residual
    load_adapter(fresh, tmp_path / "p")
    torch.testing.assert_close(outputs(fresh, x), want, atol=1e-5, rtol=1e-5)


def test_pissa_on_a_convolution_is_refused_before_any_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))  # the linear one would be fine
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="linear layers only"):
        inject(model, LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights="pissa"))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_dora_adapters_do_not_combine():
    model = tiny_llama()
    inject(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "a")
    inject(model, LoraConfig(r=2, target_modules=["q_proj"]), "b")
    with pytest.raises(ValueError, match="combining DoRA adapters is not supported"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "mix", combination_type="cat")


def test_layer_has_no_variant_branches():
    """DoRA / PiSSA live in their hook objects: layer.py names neither them nor their tensors."""
    src = Path(__file__).resolve().parents[2] / "src" / "lorafit" / "tuner" / "layer.py"
    names = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.Name, ast.arg)):
            names.add(getattr(node, "id", None) or node.arg)
    words = {v.name for v in registered_variants()} | {"dora", "pissa", "magnitude"}
    odd = sorted(n for n in names if any(w in n.lower() for w in words))
    assert odd == [], odd


def test_add_adapter_takes_no_variant_specific_parameters():
    """The variants come from the registry (`variants=variants_for(...)`), never from a keyword
    per variant."""
    params = set(inspect.signature(LoraLayer.add_adapter).parameters)
    assert params == {"self", "name", "r", "alpha", "dropout", "rslora", "init", "variants"}
    layer = LoraLayer(nn.Linear(6, 4))
    layer.add_adapter("d", r=2, alpha=2, variants=variants_for({"use_dora": True}))
    layer.add_adapter("p", r=2, alpha=2, init="pissa")  # variants=None: what the arguments select
    assert layer.adapters["d"].variants == (DORA,) and layer.adapters["p"].variants == (PISSA,)


def test_resumable_names_the_variant_that_cannot_resume():
    assert LORA.resumable and DORA.resumable and not PISSA.resumable
    assert resumable(LoraConfig(target_modules=["q"])) is None
    assert resumable(LoraConfig(target_modules=["q"], use_dora=True)) is None
    assert resumable(LoraConfig(target_modules=["q"], init_lora_weights="pissa_niter_2")) == "PiSSA"
    assert resumable({"init_lora_weights": "pissa", "use_dora": True}) == "PiSSA"
