"""The CPU attention-kernel choice: the math kernel for small score tensors gives the flash
kernel's loss and gradients (also under gradient checkpointing, whose recompute must pick the same
kernel), and large score tensors keep torch's own choice."""

import contextlib

import pytest
import torch

from helpers import tiny_llama
from lorafit.data.batching import CausalLMCollator
from lorafit.ops import attention
from lorafit.train.step import forward_backward, prepare_for_training
from lorafit.tuner.config import LoraConfig
from lorafit.tuner.inject import inject


def _batch():
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 12, 7):
        ids = torch.randint(1, 96, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return CausalLMCollator(pad_token_id=0)(examples)  # padded: a real attention mask


def _trained(precision, checkpointing, max_scores, monkeypatch):
    monkeypatch.setattr(attention, "MATH_MAX_SCORES", max_scores)
    model = tiny_llama()
    inject(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    prepare_for_training(model, precision, gradient_checkpointing=checkpointing)
    model.train()
    loss, _ = forward_backward(model, [_batch()], "causal-lm", precision)
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_math_kernel_gives_the_flash_kernels_loss_and_gradients(
    precision, checkpointing, monkeypatch
):
    flash = _trained(precision, checkpointing, 0, monkeypatch)
    math = _trained(precision, checkpointing, attention.MATH_MAX_SCORES, monkeypatch)
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert math[0] == pytest.approx(flash[0], rel=tol)
    for k, g in flash[1].items():
        torch.testing.assert_close(math[1][k], g, rtol=tol, atol=tol * g.abs().max().item())


def test_kernel_choice_follows_the_size_of_the_scores():
    model = tiny_llama()  # 4 heads
    small = torch.zeros(8, 160, dtype=torch.long)
    large = torch.zeros(1, 1024, dtype=torch.long)
    assert not isinstance(attention.attention_kernel(model, small), contextlib.nullcontext)
    assert isinstance(attention.attention_kernel(model, large), contextlib.nullcontext)
    with attention.attention_kernel(model, small):
        assert torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
