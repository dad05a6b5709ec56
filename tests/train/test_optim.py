"""AdamW groups (LoRA+) and the learning-rate schedule."""

import math

import pytest
import torch

from helpers import tiny_llama
from lorafit.train.config import TrainOptions
from lorafit.train.optim import build_optimizer, build_schedule, lr_factor
from lorafit.tuner.config import LoraConfig
from lorafit.tuner.inject import inject


def _lora_model():
    model = tiny_llama()
    inject(model, LoraConfig(r=4, target_modules="all-linear"))
    return model


def test_lora_plus_gives_b_a_larger_learning_rate():
    model = _lora_model()
    opt = build_optimizer(model, TrainOptions(lr=1e-2, lora_plus_ratio=16))
    assert sorted(g["lr"] for g in opt.param_groups) == [pytest.approx(1e-2), pytest.approx(0.16)]
    b_params = {id(p) for n, p in model.named_parameters() if n.endswith(".B")}
    fast = max(opt.param_groups, key=lambda g: g["lr"])
    assert b_params and {id(p) for p in fast["params"]} == b_params
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable


def test_without_lora_plus_every_parameter_has_the_same_rate():
    opt = build_optimizer(_lora_model(), TrainOptions(lr=3e-4, weight_decay=0.1))
    assert {g["lr"] for g in opt.param_groups} == {3e-4}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1}


def test_plain_cpu_tensors_get_the_fused_adamw_which_steps_as_the_default_one():
    model = _lora_model()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt = build_optimizer(model, TrainOptions(lr=1e-2, weight_decay=0.1))
    assert all(g["fused"] for g in opt.param_groups)
    params = [p for p in model.parameters() if p.requires_grad]
    copies = [p.detach().clone().requires_grad_() for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    plain = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        opt.step()
        plain.step()
    for c, p in zip(copies, params):
        torch.testing.assert_close(p, c, rtol=1e-5, atol=1e-6)


def test_nothing_to_train_is_an_error():
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(tiny_llama().requires_grad_(False), TrainOptions())


def test_warmup_then_decay():
    total, warmup = 100, 10
    ramp = [lr_factor(s, total, warmup, "cosine") for s in range(warmup)]
    assert ramp == sorted(ramp) and ramp[0] == pytest.approx(1 / 11) and ramp[-1] < 1
    assert lr_factor(warmup, total, warmup, "cosine") == 1.0
    assert lr_factor(55, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_factor(total, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(55, total, warmup, "linear") == pytest.approx(0.5)
    assert lr_factor(total + 5, total, warmup, "linear") == 0.0
    assert lr_factor(99, total, warmup, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, total, warmup, "exp")


def test_schedule_drives_the_optimizer_and_resumes_from_its_state():
    def fresh():
        model = torch.nn.Linear(2, 2)
        options = TrainOptions(lr=1.0, warmup_ratio=0.1, schedule="linear")
        opt = build_optimizer(model, options)
        return opt, build_schedule(opt, options, total=20)

    opt, sched = fresh()
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1 / 3) and seen[2] == 1.0 and seen[11] == pytest.approx(0.5)
    opt2, sched2 = fresh()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()
    sched.step()
    sched2.step()
    assert math.isclose(opt2.param_groups[0]["lr"], opt.param_groups[0]["lr"])
