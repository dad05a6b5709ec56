import pytest
import torch

from helpers import model_input, randomize_adapters, tiny_llama
from lorafit import LoraConfig, inject
from lorafit.ops.lean_blocks import patch_model, rms_norm, swiglu
from lorafit.ops.lm_loss import causal_lm_loss


def test_rms_norm_matches_reference_values_and_grads():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))


def test_the_projections_after_a_norm_keep_its_input_not_its_output(monkeypatch):
    """The decoder layers' RMSNorm outputs feed one-op projections, which keep the norm's input,
    1 / rms and weight instead (`input_for_grad`): autograd saves none of those outputs for
    backward, and the adapter gradients agree, in fp64 to rounding, with the projections keeping
    the output itself (the mark switched off)."""
    import lorafit.ops.lean_blocks as lean_blocks

    def run(mark: bool):
        outputs = []
        real = lean_blocks.rms_norm

        def recording(x, weight, eps):
            y = real(x, weight, eps)
            if not mark:
                y.__dict__.pop("_lorafit_input_for_grad", None)
            outputs.append(y)
            return y

        monkeypatch.setattr(lean_blocks, "rms_norm", recording)
        model = tiny_llama().double()
        inject(model, LoraConfig(r=4, target_modules="all-linear"))
        randomize_adapters(model)
        patch_model(model)
        ids = model_input("llama")["input_ids"]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        saved = set()

        def pack(t):
            saved.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = causal_lm_loss(model, batch, 64)[0]
        layer_norms = outputs[:-1]  # 2 layers x 2 norms; the final norm's output goes to the loss
        kept = sum(y.untyped_storage().data_ptr() in saved for y in layer_norms)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return kept, len(outputs), grads

    kept, norms, grads = run(True)
    kept_plain, _, grads_plain = run(False)
    assert norms == 5 and kept == 0 and kept_plain == 4
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_plain[name], rtol=1e-9, atol=1e-12)


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
            # 2 norms + 1 MLP + 1 attention (q / k / v as one op) per layer, and the final norm
            assert patch_model(model) == 2 * 2 + 2 + 2 + 1
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


def _run(recompute: bool, dropout: float, monkeypatch):
    """(SwiGLU outputs still alive after forward, loss, adapter grads) for a LoRA tiny Llama."""
    import weakref

    import lorafit.ops.lean_blocks as lean_blocks

    outputs = []
    real = lean_blocks.swiglu

    def recording(gate, up, **kwargs):
        h = real(gate, up, **kwargs)
        outputs.append(weakref.ref(h))
        return h

    monkeypatch.setattr(lean_blocks, "swiglu", recording)
    model = tiny_llama()
    inject(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))
    randomize_adapters(model)
    patch_model(model, recompute_swiglu=recompute)
    ids = model_input("llama")["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    torch.manual_seed(0)
    loss = causal_lm_loss(model, batch, 64)[0]
    alive = sum(r() is not None for r in outputs)
    loss.backward()
    return alive, loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_swiglu_recompute_frees_the_output_and_changes_nothing(dropout, monkeypatch):
    """With recompute_swiglu the SwiGLU outputs are not kept for backward (recomputed from gate
    and up instead), and loss and adapter gradients stay bit-identical."""
    plain_alive, plain_loss, plain_grads = _run(False, dropout, monkeypatch)
    lean_alive, lean_loss, lean_grads = _run(True, dropout, monkeypatch)
    if (
        dropout == 0.0
    ):  # down_proj's LoRA A keeps the SwiGLU output itself (with dropout: its dropped copy)
        assert plain_alive == 2
    assert lean_alive == 0
    assert lean_loss == plain_loss
    for name, g in plain_grads.items():
        assert torch.equal(lean_grads[name], g), name


@pytest.mark.parametrize("also_read", [False, True])
def test_swiglu_gradient_made_in_down_projs_backward_is_used_only_when_it_is_the_whole_gradient(
    also_read, monkeypatch
):
    """With recompute, down_proj's backward makes SwiGLU's gradient in the pass that makes h
    again, and SwiGLU's backward takes it instead of computing its own. When h is read by
    something else too (its gradient is then a sum), SwiGLU computes its own: the gradients
    equal the plain path's either way."""
    from torch import nn

    from lorafit.ops import fused

    own = []
    real = fused.swiglu_backward
    monkeypatch.setattr(fused, "swiglu_backward", lambda *a: own.append(1) or real(*a))

    def run(recompute: bool):
        torch.manual_seed(0)
        down = nn.ModuleDict({"down": nn.Linear(12, 6)})
        inject(down, LoraConfig(r=2, target_modules=["down"]))
        randomize_adapters(down)
        gate = torch.randn(4, 3, 12, requires_grad=True)
        up = torch.randn(4, 3, 12, requires_grad=True)
        h = swiglu(gate, up, recompute=recompute)
        loss = down["down"](h).pow(2).sum() + (h.sum() * 3 if also_read else 0)
        loss.backward()
        grads = [gate.grad, up.grad] + [p.grad for p in down.parameters() if p.requires_grad]
        return grads

    plain = run(False)
    own.clear()
    lean = run(True)
    assert len(own) == (1 if also_read else 0)  # taken from down_proj's backward unless summed
    for a, b in zip(plain, lean, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_rotary_equals_transformers_and_its_gradient_checks():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from lorafit.ops.lean_blocks import rotary

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    angles = torch.randn(2, 5, 4, dtype=torch.float64, generator=g).repeat(1, 1, 2)
    cos, sin = angles.cos(), angles.sin()
    for got, want in zip(rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(got, want)
    torch.autograd.gradcheck(lambda a, b: rotary(a, b, cos, sin), (q, k))
    qb, kb, cb, sb = (t.detach().bfloat16() for t in (q, k, cos, sin))
    for got, want in zip(rotary(qb, kb, cb, sb), apply_rotary_pos_emb(qb, kb, cb, sb)):
        torch.testing.assert_close(got.double(), want.double(), rtol=2e-2, atol=2e-2)


def test_rotary_on_token_rows_equals_transformers_and_its_gradient_checks():
    """`rotary_rows` on (N, q | k | v) rows: q's and k's heads rotated as transformers does on the
    (1, heads, N, d) layout, v's columns unchanged; fp64 exact, gradcheck (v passes through)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from lorafit.ops.lean_blocks import rotary_rows

    g = torch.Generator().manual_seed(0)
    n, d, hq, hk = 7, 8, 4, 2
    y = torch.randn(n, (hq + 2 * hk) * d, dtype=torch.float64, generator=g, requires_grad=True)
    angles = torch.randn(n, d // 2, dtype=torch.float64, generator=g).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()
    out = rotary_rows(y, cos, sin, hq + hk, d)
    q, k = (t.view(1, n, -1, d).transpose(1, 2) for t in y.split([hq * d, hk * d, hk * d], 1)[:2])
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    got_q, got_k, got_v = out.split([hq * d, hk * d, hk * d], 1)
    torch.testing.assert_close(got_q, want_q.transpose(1, 2).reshape(n, -1))
    torch.testing.assert_close(got_k, want_k.transpose(1, 2).reshape(n, -1))
    torch.testing.assert_close(got_v, y[:, (hq + hk) * d :])
    torch.autograd.gradcheck(lambda a: rotary_rows(a, cos, sin, hq + hk, d), (y,))
