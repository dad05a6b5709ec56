"""Projections that read one input (q / k / v, gate / up) as one op: `join_shared_input` makes their
frozen weights row blocks of one tensor, `shared_input_forward` computes every layer's output and
gradients as the layers would one by one, and falls back (None) wherever one layer is not a base
op plus one plain branch."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from helpers import TINY_DECODER, randomize_adapters
from lorafit import LoraConfig, inject
from lorafit.ops import lean_blocks
from lorafit.ops.lm_loss import causal_lm_loss
from lorafit.tuner.layer import join_shared_input, shared_input_forward

try:
    from transformers import Qwen3Config, Qwen3ForCausalLM
except ImportError:  # an older transformers
    Qwen3Config = Qwen3ForCausalLM = None


def _model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**TINY_DECODER))
    if family == "qwen2":  # q / k / v with biases
        return Qwen2ForCausalLM(Qwen2Config(**TINY_DECODER))
    if Qwen3ForCausalLM is None:
        pytest.skip("this transformers has no Qwen3")
    return Qwen3ForCausalLM(Qwen3Config(head_dim=8, **TINY_DECODER))  # q_norm / k_norm


def _lora(family: str, dtype=torch.float32, **config):
    model = _model(family)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **config))
    randomize_adapters(model)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def _loss_and_grads(model, autocast=False):
    model.train()
    ids = torch.tensor([[5, 9, 3, 7, 11, 2, 4, 8], [1, 6, 10, 12, 14, 3, 3, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = causal_lm_loss(model, batch, 64)[0]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def _count_grouped(monkeypatch) -> list:
    """Calls of shared_input_forward through the patched blocks that took the one-op form."""
    taken = []

    def spy(layers, x):
        out = shared_input_forward(layers, x)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(lean_blocks, "shared_input_forward", spy)
    return taken


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_patched_blocks_give_the_layer_by_layer_loss_and_gradients(family, monkeypatch):
    taken = _count_grouped(monkeypatch)
    plain = _loss_and_grads(_lora(family))
    model = _lora(family)
    lean_blocks.patch_model(model)
    grouped = _loss_and_grads(model)
    assert taken and all(taken) and len(taken) == 2 * 2  # attention + MLP of both layers
    assert grouped[0] == pytest.approx(plain[0], rel=1e-6)
    for name, g in plain[1].items():
        torch.testing.assert_close(grouped[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_base_under_autocast_is_as_close_to_fp32_as_layer_by_layer(monkeypatch):
    exact = _loss_and_grads(_lora("llama"))
    runs = {}
    for grouped in (False, True):
        model = _lora("llama", torch.bfloat16)
        taken = _count_grouped(monkeypatch)
        if not grouped:
            monkeypatch.setattr(lean_blocks, "shared_input_forward", lambda layers, x: None)
        lean_blocks.patch_model(model)
        runs[grouped] = _loss_and_grads(model, autocast=True)
        assert all(taken) and taken if grouped else not taken
        monkeypatch.undo()
    errors = {  # relative error of each gradient: (grouped, layer by layer)
        n: tuple(float((runs[k][1][n] - g).norm() / g.norm()) for k in (True, False))
        for n, g in exact[1].items()
    }
    mean = [sum(e[i] for e in errors.values()) / len(errors) for i in (0, 1)]
    assert mean[0] <= 1.25 * mean[1]
    assert all(a <= 2 * b + 2e-3 for a, b in errors.values()), errors
    assert runs[True][0] == pytest.approx(exact[0], rel=1e-2)


def test_join_makes_views_and_changes_no_weight():
    model = _lora("qwen2")
    attn = model.model.layers[0].self_attn
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    assert join_shared_input(layers)
    bases = [m.base_layer for m in layers]
    weight, bias, sizes = bases[0]._lorafit_joined
    assert weight.shape == (sum(sizes), 32) and bias.shape == (sum(sizes),)
    assert all(b.weight.untyped_storage().data_ptr() == weight.data_ptr() for b in bases)
    for n, p in model.state_dict().items():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_falls_back_where_one_layer_is_not_one_plain_branch():
    model = _lora("llama", lora_dropout=0.1)
    mlp = model.model.layers[0].mlp
    layers = (mlp.gate_proj, mlp.up_proj)
    assert join_shared_input(layers)
    x = torch.randn(2, 3, 32)
    model.train()
    assert shared_input_forward(layers, x) is None  # dropout in training
    model.eval()
    assert shared_input_forward(layers, x) is not None
    layers[0].disabled = True
    assert shared_input_forward(layers, x) is None
    layers[0].disabled = False
    for m in layers:  # a weight replaced after the join (e.g. cast): no longer one tensor
        m.base_layer.weight.data = m.base_layer.weight.data.clone()
    assert shared_input_forward(layers, x) is None
    outs = [m(x) for m in layers]  # each layer still computes its own output
    assert all(o.shape == (2, 3, 64) for o in outs)


def test_grouped_outputs_equal_each_layer_and_train_only_what_reaches_the_loss():
    """An output the loss does not use gets no gradient through the group: its adapter's B
    gradient is zero, as when that layer's output is unused."""
    model = _lora("llama")
    attn = model.model.layers[0].self_attn
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(2, 5, 32, requires_grad=True)
    expected = [m(x) for m in layers]
    assert join_shared_input(layers)
    q, k, v = shared_input_forward(layers, x)
    for got, want in zip((q, k, v), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (q.square().sum() + v.sum()).backward()
    assert float(attn.k_proj.adapters["default"].B.grad.abs().max()) == 0.0
    assert float(attn.q_proj.adapters["default"].B.grad.abs().max()) > 0.0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_dora_groups_give_doras_own_loss_and_gradients(family, monkeypatch):
    """DoRA's per-output scale c = m / ||W + sBA|| applied to each block of the group (in place)
    equals DoRA's `forward` layer by layer, magnitudes included; a magnitude of exactly 0 (its
    output scaled by 2^-60 instead) still gets its gradient (zero where gate and up both are)."""
    from lorafit.tuner.variants.dora import DORA

    def dora():
        model = _lora(family, use_dora=True)
        with torch.no_grad():  # magnitudes away from the row norms, one of them exactly zero
            for n, p in model.named_parameters():
                if n.endswith("magnitude"):
                    p.mul_(torch.linspace(0.5, 1.5, p.numel()).reshape(p.shape))
                    p.view(-1)[1] = 0.0
        return model

    with monkeypatch.context() as m:
        m.setattr(type(DORA), "one_op", lambda self, layer, ad: None)
        reference = _loss_and_grads(dora())
    taken = _count_grouped(monkeypatch)
    model = dora()
    lean_blocks.patch_model(model)
    grouped = _loss_and_grads(model)
    assert taken and all(taken) and len(taken) == 2 * 2
    assert grouped[0] == pytest.approx(reference[0], rel=1e-6)
    zero_rows = [g.view(-1)[1] for n, g in reference[1].items() if n.endswith("magnitude")]
    assert sum(float(g.abs()) > 0 for g in zero_rows) >= len(zero_rows) // 2
    for name, g in reference[1].items():
        torch.testing.assert_close(grouped[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dora", [False, True])
def test_group_keeps_its_joined_output_only_for_doras_scale(dora):
    """Plain LoRA's group keeps no (tokens, sum out) output for backward (the consumers keep what
    they need); DoRA's keeps the scaled output once, in place of an unscaled copy."""
    model = _lora("llama", use_dora=dora)
    attn = model.model.layers[0].self_attn
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    assert join_shared_input(layers)
    x = torch.randn(2, 5, 32, requires_grad=True)
    sizes = sum(m.base_layer.out_features for m in layers)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        outs = shared_input_forward(layers, x)
    assert outs is not None
    full = [s for s in saved if tuple(s) == (10, sizes)]
    assert len(full) == (1 if dora else 0), saved


def test_mlp_group_reads_swiglus_gradients_without_a_copy(monkeypatch):
    """SwiGLU's backward writes d gate | d up into one buffer; the gate / up group's backward
    reads it as its (tokens, 2 I) gradient (`_side_by_side`) instead of concatenating, and the
    gradients stay those of layer by layer (the patched-blocks test above)."""
    from lorafit.tuner.kinds import linear

    found = []
    real = linear._side_by_side
    monkeypatch.setattr(linear, "_side_by_side", lambda b: found.append(real(b)) or found[-1])
    model = _lora("llama")
    lean_blocks.patch_model(model)
    _loss_and_grads(model)
    widths = [g.shape[1] for g in found if g is not None]
    assert widths.count(2 * 64) == 2, widths  # both layers' MLP
    a, b = torch.randn(6, 3), torch.randn(6, 5)
    assert real([a, b]) is None  # separate tensors: concatenated as before
    both = torch.randn(6, 8)
    torch.testing.assert_close(real(list(both.split([3, 5], 1))), both, rtol=0, atol=0)
