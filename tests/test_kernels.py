import pytest
import torch

from conftest import model_input, randomize_adapters, tiny_llama
from lorafit import LoraConfig, inject
from lorafit.kernels import patch_model, rms_norm, swiglu
from lorafit.loss import causal_lm_loss


def test_rms_norm_matches_reference_values_and_grads():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))


def test_swiglu_grads():
    torch.manual_seed(0)
    g = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(swiglu, (g, u))


@pytest.mark.parametrize("autocast", [False, True])
def test_patched_model_same_loss_and_adapter_grads(autocast):
    grads, losses = [], []
    for patch in (False, True):
        model = tiny_llama()
        inject(model, LoraConfig(r=4, target_modules="all-linear"))
        randomize_adapters(model)
        if patch:
            assert patch_model(model) == 2 * 2 + 1 + 2  # 2 norms + 1 MLP per layer, and the final norm
        model.train()
        ids = model_input("llama")["input_ids"]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = causal_lm_loss(model, batch, 64)[0]
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    tol = 2e-2 if autocast else 1e-5
    assert losses[0] == pytest.approx(losses[1], rel=tol / 10)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=tol, rtol=tol)
