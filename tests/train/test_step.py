"""forward_backward (what the trainer and the benchmark run) and the micro-batch stream."""

import pytest
import torch

from helpers import tiny_llama
from lorafit.data.batching import CausalLMCollator
from lorafit.models import heap
from lorafit.quant import quantize_model
from lorafit.tasks import get_task
from lorafit.train.step import forward_backward, micro_batches, prepare_for_training
from lorafit.tuner.config import LoraConfig
from lorafit.tuner.inject import inject


def _model():
    model = tiny_llama()
    inject(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model


def _examples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 96, (5 + i,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulated_micro_batches_equal_one_big_batch():
    collate = CausalLMCollator(pad_token_id=0)
    examples = _examples()
    one, two = _model(), _model()
    loss_one, _ = forward_backward(one, [collate(examples)], "causal-lm", "fp32")
    halves = [collate(examples[:2]), collate(examples[2:])]
    loss_two, _ = forward_backward(two, halves, get_task("causal-lm"), "fp32")
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    g1, g2 = _grads(one), _grads(two)
    assert all(torch.allclose(g1[k], g2[k], atol=1e-6) for k in g1)


def test_gradient_norm_is_reported_before_clipping():
    batch = CausalLMCollator(pad_token_id=0)(_examples())
    model = _model()
    _, norm = forward_backward(model, [batch], "causal-lm", "fp32", max_grad_norm=1e-3)
    clipped = torch.norm(torch.stack([g.norm() for g in _grads(model).values()]))
    assert norm > 1e-2 and clipped == pytest.approx(1e-3, rel=1e-3)


def test_prepare_for_training_keeps_trainable_weights_fp32_under_bf16():
    model = _model()
    prepare_for_training(model, "bf16")
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert model.config.use_cache is False


def test_micro_batches_resume_at_a_saved_position():
    def ids(x):
        return x["input_ids"].tolist()

    examples = [{"input_ids": [i], "labels": [i]} for i in range(10)]
    collate = CausalLMCollator(pad_token_id=0)
    stream = micro_batches(examples, 3, collate, seed=1)
    straight = [next(stream) for _ in range(9)]  # 4 batches per epoch: crosses two epochs
    epoch, index, _ = straight[4]
    resumed = micro_batches(examples, 3, collate, seed=1, epoch=epoch, index=index + 1)
    for (e, k, batch), (e2, k2, batch2) in zip(straight[5:], resumed):
        assert (e, k, ids(batch)) == (e2, k2, ids(batch2))
    assert [(e, k) for e, k, _ in straight[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    with pytest.raises(ValueError, match="training set is empty"):
        next(micro_batches([], 3, collate, seed=1))


def test_training_processes_bound_onednns_primitive_cache_unless_the_user_set_it():
    import os
    import subprocess
    import sys

    code = "import lorafit.train.step, os; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    run = lambda e: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    from lorafit.train.step import ONEDNN_CACHE

    assert run(env) == ONEDNN_CACHE
    assert run({**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}) == "512"


def _step_at_threshold(monkeypatch, model, extra: int) -> None:
    """forward_backward with glibc's mmap cap set to the batch's widest activation + `extra` bytes:
    the tiny Llama's MLP (64 wide, fp32); its 96-wide head does not count (logits come in chunks)."""
    batch = CausalLMCollator(pad_token_id=0)(_examples())
    widest = batch["input_ids"].numel() * 64 * 4
    monkeypatch.setattr(heap, "MMAP_THRESHOLD_BYTES", widest + extra)
    forward_backward(model, [batch], "causal-lm", "fp32")


def test_a_step_whose_activations_reach_the_mmap_cap_keeps_large_blocks(libc, monkeypatch):
    """Such a step's activations would be fresh mmaps faulting their pages in on every use."""
    model = _model()
    prepare_for_training(model, "fp32")
    _step_at_threshold(monkeypatch, model, 1)
    assert heap.mode() == "capped" and not libc.calls  # one byte short: nothing changes
    _step_at_threshold(monkeypatch, model, 0)
    assert heap.mode() == "keep"
    assert (heap.M_MMAP_THRESHOLD, heap.KEEP_MMAP_THRESHOLD_BYTES) in libc.calls
    assert (heap.M_TRIM_THRESHOLD, heap.KEEP_TRIM_THRESHOLD_BYTES) in libc.calls


def test_quantized_bases_keep_the_mmap_cap(libc, monkeypatch):
    """Their dequantized weights are large freed blocks too; the cap was measured there."""
    model = _model()
    quantize_model(model, "nf4", keep={"lm_head", "model.layers.0.mlp"})  # some stay nn.Linear
    prepare_for_training(model, "fp32")
    _step_at_threshold(monkeypatch, model, -(1 << 20))
    assert heap.mode() == "capped" and not libc.calls
