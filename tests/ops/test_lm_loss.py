import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import model_input, randomize_adapters, tiny_llama
from lorafit import LoraConfig, inject
from lorafit.ops.lm_loss import causal_lm_loss, linear_cross_entropy


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [3, 7, 32, 64, 100])
def test_linear_cross_entropy_equals_reference_loss_and_grads(bias, chunk):
    """Chunks of a multiple of 32 pad the rows (to 64 here: two chunks of 32, or one of 64):
    the padding adds nothing to the loss or any gradient."""
    torch.manual_seed(0)
    head = nn.Linear(6, 11, bias=bias).double()
    h = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (40,))
    ref = F.cross_entropy(head(h), t, reduction="sum")
    got = linear_cross_entropy(h, head, t, chunk)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    params = [h, *head.parameters()]
    want = torch.autograd.grad(2.5 * ref, params)
    have = torch.autograd.grad(
        2.5 * got, params
    )  # an upstream factor (loss weighting) scales every grad
    for w, g in zip(want, have):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_gradcheck():
    torch.manual_seed(0)
    head = nn.Linear(4, 5).double()
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    torch.autograd.gradcheck(
        lambda x, w, b: linear_cross_entropy(x, _Lin(w, b), t, 4), (h, head.weight, head.bias)
    )


class _Lin(nn.Linear):
    def __init__(self, w, b):
        nn.Module.__init__(self)
        self.weight, self.bias = w, b


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_head_loss_matches_full_logits_loss_on_a_lora_model(autocast):
    """The training loss (fused head, frozen tied weight) equals the plain full-logits loss, and so do
    the adapter gradients; with bf16 autocast within bf16 rounding."""
    model = tiny_llama()
    inject(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    ids = model_input("llama")["input_ids"]
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt: no loss there
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for fused in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss = causal_lm_loss(model, batch, chunk=5)[0]
            else:
                logits = (
                    model(input_ids=ids, attention_mask=batch["attention_mask"])
                    .logits[:, :-1]
                    .float()
                )
                loss = F.cross_entropy(
                    logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
                )
        loss.backward()
        results.append(
            (
                loss.item(),
                {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
            )
        )
    tol = 2e-2 if autocast else 1e-5
    assert results[0][0] == pytest.approx(results[1][0], rel=tol / 10)
    for name, g in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], g, atol=tol, rtol=tol)


def test_trained_head_gets_its_gradient():
    """Full fine-tuning trains the (tied) head weight: its gradient through the fused loss matches."""
    model = tiny_llama()
    ids = model_input("llama")["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    grads = []
    for fused in (True, False):
        model.zero_grad()
        if fused:
            causal_lm_loss(model, batch, chunk=4)[0].backward()
        else:
            model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, atol=1e-5, rtol=1e-5)
