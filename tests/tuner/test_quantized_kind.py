"""The quantized-linear layer kind: LoRA over an NF4 / int8 base trains only A and B, starts as
the quantized base (B = 0), and refuses what would write the quantized weight."""

import pytest
import torch

from helpers import word_llama
from lorafit.quant import quantize_model
from lorafit.tuner import LoraConfig, MergeError, dequantize_base, inject, merge
from lorafit.tuner.layer import LoraLayer


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_gradients_flow_only_into_a_and_b(scheme):
    model = word_llama()
    quantize_model(model, scheme, keep={"lm_head"})
    model.to(torch.bfloat16)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    before = model(ids).logits
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.testing.assert_close(model(ids).logits, before)  # step 0 is the quantized base
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        torch.nn.init.normal_(layer.adapters["default"].B, std=0.1)
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith((".default.A", ".default.B")) for n in with_grad), with_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == with_grad
    assert all(b.grad is None for b in model.buffers())


def test_pissa_and_in_place_merge_are_refused_until_dequantized():
    model = word_llama()
    quantize_model(model, "nf4", keep={"lm_head"})
    with pytest.raises((TypeError, ValueError), match="quantized base"):
        inject(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    inject(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(MergeError, match="quantized"):
        merge(model)
    assert dequantize_base(model) > 0
    merge(model)  # now a float base: merges
