"""The CPU attention-kernel choice: the math kernel for small score tensors gives the flash
kernel's loss and gradients (also under gradient checkpointing, whose recompute must pick the same
kernel), and large score tensors keep torch's own choice."""

import contextlib

import pytest
import torch

from helpers import TINY_DECODER, tiny_llama
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


# ----------------------------------------------------------------------------- padding-free --
def _examples(lengths=(5, 9, 12, 7), document=False):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(1, 96, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids if document else [-100, -100] + ids[2:]})
    return out


def _grads(make_model, batch, precision="fp32", checkpointing=False, varlen=True):
    model = make_model()
    inject(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    prepare_for_training(model, precision, gradient_checkpointing=checkpointing)
    if varlen:
        assert attention.enable_lorafit_attention(model)
    model.train()
    loss, _ = forward_backward(model, [batch], "causal-lm", precision)
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, tol):
    assert a[0] == pytest.approx(b[0], rel=tol)
    for k, g in b[1].items():
        torch.testing.assert_close(a[1][k], g, rtol=tol, atol=tol * g.abs().max().item())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_padding_free_batch_gives_the_padded_batchs_loss_and_gradients(precision, checkpointing):
    """fp32: the same numbers. bf16 (where padding-free rows run `causal_attention`, padded ones
    SDPA's math kernel): as close to the fp32 gradients as the padded batch's, tensor by tensor."""
    examples = _examples()
    padded = _grads(tiny_llama, CausalLMCollator(0)(examples), precision, checkpointing)
    flat = CausalLMCollator(0, padding_free=True)(examples)
    assert flat["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    flat = _grads(tiny_llama, flat, precision, checkpointing)
    if precision == "fp32":
        _assert_same(flat, padded, 1e-5)
        return
    exact = _grads(tiny_llama, CausalLMCollator(0)(examples), "fp32", checkpointing)
    assert flat[0] == pytest.approx(exact[0], rel=1e-3)
    errors = {  # relative error of each gradient: (padding-free, padded)
        k: tuple(float((run[1][k] - g).norm() / g.norm()) for run in (flat, padded))
        for k, g in exact[1].items()
    }
    # flash's forward rounds the probabilities to bf16 before P V (as GPU flash kernels do), the
    # math kernel keeps them fp32: measured mean 0.024 vs 0.0195 here, single tensors up to 2.2x;
    # a wrong or missing term is off by its own size (errors near 1)
    mean_flat, mean_padded = (sum(e[i] for e in errors.values()) / len(errors) for i in (0, 1))
    assert mean_flat <= 1.5 * mean_padded
    assert all(f <= 3 * p + 1e-3 for f, p in errors.values()), errors


def test_padding_free_row_keeps_documents_apart():
    """A document's loss does not change with the documents laid before it in the row."""
    examples = _examples()
    model = tiny_llama()
    attention.enable_lorafit_attention(model)
    from lorafit.ops.lm_loss import causal_lm_loss

    together = CausalLMCollator(0, padding_free=True)(examples)
    with torch.no_grad():
        loss_all, n_all, _ = causal_lm_loss(model, together)
        rest = CausalLMCollator(0, padding_free=True)(examples[:2] + examples[3:])
        loss_rest, n_rest, _ = causal_lm_loss(model, rest)
        one = CausalLMCollator(0, padding_free=True)([examples[2]])
        loss_one, n_one, _ = causal_lm_loss(model, one)
    assert n_all == n_rest + n_one
    assert loss_all * n_all == pytest.approx(loss_rest * n_rest + loss_one * n_one, rel=1e-5)


def test_padding_free_without_lorafit_attention_is_still_correct():
    """transformers' own mask from the position ids (what a model we cannot patch runs)."""
    examples = _examples()
    padded = _grads(tiny_llama, CausalLMCollator(0)(examples), varlen=False)
    flat = _grads(tiny_llama, CausalLMCollator(0, padding_free=True)(examples), varlen=False)
    _assert_same(flat, padded, 1e-5)


def test_padding_free_packed_rows_match_their_block_diagonal_masks():
    from lorafit.data.batching import pack_examples

    packs = pack_examples(_examples((5, 9, 12, 7, 3, 10), document=True), 20)
    hf_mask = _grads(tiny_llama, CausalLMCollator(0)(packs), varlen=False)
    flat = _grads(tiny_llama, CausalLMCollator(0, padding_free=True)(packs))
    _assert_same(flat, hf_mask, 1e-5)


def test_generation_with_lorafit_attention_is_unchanged():
    model = tiny_llama()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert attention.enable_lorafit_attention(model)
    torch.testing.assert_close(model.generate(input_ids=ids, attention_mask=mask, **kw), before)


def test_models_outside_the_attention_interface_are_left_alone():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    assert not attention.enable_lorafit_attention(model)
    assert model.config._attn_implementation == "eager"


def _tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(head_dim=8, **TINY_DECODER)).eval()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("make_model", [tiny_llama, _tiny_qwen3], ids=["llama", "qwen3"])
def test_padding_free_attention_pads_q_k_v_once_with_the_same_numbers(
    make_model, precision, monkeypatch
):
    """The lean attention of a padding-free row (`lean_blocks._documents_attention`: one gather of
    q | k | v and of the rotary angles, rotary and q_norm / k_norm on the padded layout) gives the
    loss and gradients of padding q, k and v one by one after rotary (transformers' path)."""
    from lorafit.ops import lean_blocks

    if make_model is _tiny_qwen3:
        pytest.importorskip("transformers.models.qwen3")
    flat = CausalLMCollator(0, padding_free=True)(_examples())
    taken = []
    real = lean_blocks._documents_attention
    monkeypatch.setattr(
        lean_blocks,
        "_documents_attention",
        lambda *a: (lambda out: taken.append(out is not None) or out)(real(*a)),
    )
    fast = _grads(make_model, flat, precision)
    assert taken and all(taken) and len(taken) == 2  # both layers
    monkeypatch.setattr(lean_blocks, "Documents", type("NotDocuments", (), {}))  # the old path
    slow = _grads(make_model, flat, precision)
    _assert_same(fast, slow, 1e-5 if precision == "fp32" else 1e-2)
