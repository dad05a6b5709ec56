"""A LoRA'd nn.Linear with one plain adapter computes base + branch as one autograd op
(`LinearKind.with_branch`): the same outputs and gradients as the base layer's output plus the
branch, in fp32 and under bf16 autocast, and the layer falls back wherever that form does not
apply."""

import pytest
import torch
from torch import nn

from helpers import randomize_adapters, tiny_llama
from lorafit import LoraConfig, inject
from lorafit.tuner.kinds import linear as linear_kind
from lorafit.tuner.layer import LoraLayer


def _unfused(monkeypatch):
    monkeypatch.setattr(linear_kind.LinearKind, "with_branch", lambda self, *a: None)


def _counting(monkeypatch):
    calls = []
    real = linear_kind._LinearWithBranch.apply

    def apply(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(linear_kind._LinearWithBranch, "apply", apply)
    return calls


def _layer(bias: bool, dtype=torch.float32, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 40, bias=bias).to(dtype))
    inject(model, LoraConfig(r=4, lora_alpha=12, target_modules=["0"], lora_dropout=dropout))
    randomize_adapters(model, seed=seed, scale=0.5)
    return model


def _run(model, x, dtype=None):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(g)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [True, False])
def test_fp32_outputs_and_gradients_equal_base_plus_branch(bias, monkeypatch):
    x = torch.randn(3, 5, 24)
    calls = _counting(monkeypatch)
    got = _run(_layer(bias), x)
    assert calls  # the fused op ran
    _unfused(monkeypatch)
    want = _run(_layer(bias), x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert got[2].keys() == want[2].keys() and len(got[2]) == 2  # A and B
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-6)
        assert got[2][name].dtype == torch.float32


def test_bf16_base_under_autocast_matches_within_bf16_rounding(monkeypatch):
    """The training path: a bf16 frozen base, fp32 A / B, bf16 activations under autocast."""
    x = torch.randn(4, 7, 24).to(torch.bfloat16)
    calls = _counting(monkeypatch)
    got = _run(_layer(True, torch.bfloat16), x, torch.bfloat16)
    assert calls
    _unfused(monkeypatch)
    want = _run(_layer(True, torch.bfloat16), x, torch.bfloat16)
    for a, b in [(got[0], want[0]), (got[1], want[1]), *zip(got[2].values(), want[2].values())]:
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max())


def test_a_frozen_input_gets_no_gradient_and_adapter_gradients_still_flow(monkeypatch):
    model = _layer(False)
    x = torch.randn(2, 24)  # no requires_grad: the layer's input gradient is skipped
    model(x).sum().backward()
    lora = next(m for m in model.modules() if isinstance(m, LoraLayer))
    ad = lora.adapters["default"]
    assert ad.A.grad is not None and ad.B.grad is not None and ad.A.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "case",
    ["dropout in training", "two active adapters", "dora", "hook", "subclass", "disabled"],
)
def test_falls_back_where_the_one_op_form_does_not_apply(case, monkeypatch):
    from lorafit import set_active

    model = _layer(True, dropout=0.1 if case == "dropout in training" else 0.0)
    lora = next(m for m in model.modules() if isinstance(m, LoraLayer))
    if case == "two active adapters":
        inject(model, LoraConfig(r=2, target_modules=["0"]), "other")
        set_active(model, ["default", "other"])
    elif case == "dora":
        model = nn.Sequential(nn.Linear(24, 40))
        inject(model, LoraConfig(r=4, target_modules=["0"], use_dora=True))
        lora = model[0]
    elif case == "hook":
        lora.base_layer.register_forward_hook(lambda m, i, o: o * 2)
    elif case == "subclass":

        class Doubled(nn.Linear):
            def forward(self, x):
                return super().forward(x) * 2

        model = nn.Sequential(Doubled(24, 40))
        inject(model, LoraConfig(r=4, target_modules=["0"]))
        randomize_adapters(model, seed=0, scale=0.5)
        lora = model[0]
    elif case == "disabled":
        lora.disabled = True
    model.train()
    calls = _counting(monkeypatch)
    x = torch.randn(2, 24)
    y = model(x)
    assert not calls
    if case == "subclass":  # the subclass's own forward, plus the branch
        ad = lora.adapters["default"]
        want = lora.base_layer(x) + (x @ ad.A.T) @ (ad.B * ad.scale).T
        torch.testing.assert_close(y, want)


def test_a_model_trains_to_the_same_loss_and_gradients(monkeypatch):
    """A tiny Llama with all-linear LoRA: loss and every adapter gradient as without the op."""
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))

    def run():
        model = tiny_llama(seed=0)
        inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_adapters(model, seed=3, scale=0.3)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return out.loss.detach(), grads

    calls = _counting(monkeypatch)
    loss, grads = run()
    assert len(calls) == 2 * 7  # every projection of both layers
    _unfused(monkeypatch)
    want_loss, want_grads = run()
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)


def test_fp32_weights_under_bf16_autocast_keep_autocasts_casts(monkeypatch):
    """An fp32 base trained under bf16 autocast: F.linear casts to bf16 there, so the layer keeps
    the separate form (same dtypes and values as without the one-op form)."""
    x = torch.randn(3, 24)
    calls = _counting(monkeypatch)
    got = _run(_layer(True), x, torch.bfloat16)
    assert not calls and got[0].dtype == torch.bfloat16
    _unfused(monkeypatch)
    want = _run(_layer(True), x, torch.bfloat16)
    torch.testing.assert_close(got[0], want[0])


def test_an_input_marked_with_how_to_get_its_product_is_not_kept_and_gives_the_same_gradients():
    """`input_for_grad`: x marked with tensors and a function for gt^T x. The one-op form (alone
    and grouped) keeps those tensors instead of x (x is freed after the forward) and its A
    gradient is the function's; here x = 2 * x0, so (2 gt)^T x0 is the same product."""
    import gc
    import weakref

    from lorafit.tuner.kinds.base import input_for_grad
    from lorafit.tuner.layer import shared_input_forward

    def t_mm(gt, gx, x0):
        assert gx is not None and gx.shape == x0.shape  # x's gradient, computed just before
        return (2 * gt).T.mm(x0.reshape(gt.shape[0], -1))

    def run(mark: bool, grouped: bool, written: bool = False):
        torch.manual_seed(0)
        model = nn.ModuleDict({"q": nn.Linear(24, 40), "k": nn.Linear(24, 8)})
        inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k"]))
        randomize_adapters(model, seed=0, scale=0.5)
        x0 = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2), requires_grad=True)
        x = x0 * 2
        if mark:
            input_for_grad(x, t_mm, x0.detach())
        if written:  # in place after the mark: the mark no longer describes x
            x.mul_(3)
        alive = weakref.ref(x)
        if grouped:
            from lorafit.tuner.layer import join_shared_input

            assert join_shared_input((model["q"], model["k"]))
            outs = shared_input_forward((model["q"], model["k"]), x)
            assert outs is not None
        else:
            outs = (model["q"](x), model["k"](x))
        del x
        gc.collect()
        kept = alive() is not None
        sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return kept, x0.grad, grads

    for grouped in (False, True):
        kept, gx, grads = run(True, grouped)
        kept_plain, gx_plain, grads_plain = run(False, grouped)
        assert kept_plain and not kept
        torch.testing.assert_close(gx, gx_plain)
        assert grads.keys() == grads_plain.keys() and len(grads) == 4
        for name, g in grads.items():
            torch.testing.assert_close(g, grads_plain[name], rtol=1e-5, atol=1e-6)
        kept, _, grads = run(True, grouped, written=True)
        _, _, grads_plain = run(False, grouped, written=True)
        assert kept  # x itself
        for name, g in grads.items():
            torch.testing.assert_close(g, grads_plain[name], rtol=1e-5, atol=1e-6)
