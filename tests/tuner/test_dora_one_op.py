"""DoRA's one-op form (`DoRA.one_op`: the kind's base + branch op with one per-output scale, alone
or for projections that read one input as one group) gives the output and the gradients of its
`forward` added to the base output."""

import pytest
import torch

from helpers import randomize_adapters, tiny_llama
from lorafit import LoraConfig, inject
from lorafit.tuner.variants.dora import DORA


def _run(monkeypatch, one_op: bool, dtype=torch.float32):
    if not one_op:
        monkeypatch.setattr(type(DORA), "one_op", lambda self, layer, ad: None)
    model = tiny_llama()
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    randomize_adapters(model)
    with torch.no_grad():  # magnitudes away from the row norms, so the scale matters
        for n, p in model.named_parameters():
            if n.endswith("magnitude"):
                p.mul_(torch.linspace(0.5, 1.5, p.numel()).reshape(p.shape))
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    model.train()
    ids = torch.tensor([[5, 9, 3, 7, 11, 2], [1, 6, 10, 12, 14, 3]])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    monkeypatch.undo()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_one_op_dora_equals_its_forward(monkeypatch):
    calls = []
    real = type(DORA).one_op
    monkeypatch.setattr(type(DORA), "one_op", lambda *a: calls.append(1) or real(*a), raising=True)
    fast = _run(monkeypatch, True)
    assert calls, "the one-op form was not used"
    slow = _run(monkeypatch, False)
    assert fast[0] == pytest.approx(slow[0], rel=1e-6)
    assert any(n.endswith("magnitude") for n in fast[1])
    for n, g in slow[1].items():
        torch.testing.assert_close(fast[1][n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_one_op_dora_on_a_bf16_base_matches_within_rounding(monkeypatch):
    fast = _run(monkeypatch, True, torch.bfloat16)
    slow = _run(monkeypatch, False, torch.bfloat16)
    assert fast[0] == pytest.approx(slow[0], rel=1e-2)
    for n, g in slow[1].items():
        assert float((fast[1][n] - g).norm() / g.norm()) < 5e-2, n


def test_a_linear_with_a_bias_keeps_the_separate_form():
    from torch import nn

    from lorafit.tuner.layer import LoraLayer

    layer = LoraLayer(nn.Linear(8, 6, bias=True))
    layer.add_adapter("a", 2, 4, variants=[DORA])
    ad = layer.adapters["a"]
    assert DORA.one_op(layer, ad) is None and layer.one_branch() is None


def test_a_kind_without_the_one_op_form_computes_the_norm_once(monkeypatch):
    """The per-output scale is handed to the kind as a function, called only when the kind runs
    the one-op form: a conv (which has none) pays for DoRA's weight norm once per forward (a
    quantized base's norm dequantizes its weight)."""
    from torch import nn

    from lorafit.tuner.layer import LoraLayer
    from lorafit.tuner.variants import dora

    layer = LoraLayer(nn.Conv2d(3, 4, 3, bias=False))
    layer.add_adapter("a", 2, 4, variants=[DORA])
    layer.active = ["a"]
    calls = []
    real = dora.weight_norm
    monkeypatch.setattr(dora, "weight_norm", lambda *a: calls.append(1) or real(*a))
    layer(torch.randn(1, 3, 6, 6))
    assert len(calls) == 1
