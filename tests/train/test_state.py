"""TrainState and the checkpoint payload."""

import math
import random

import torch

from lorafit.train.state import PAYLOAD_KEYS, StepOutput, TrainState


def test_progress_round_trips_and_tolerates_older_checkpoints():
    state = TrainState(step=7, epoch=1, index=3, best=0.5, bad_evals=2, tokens=900, stopped="x")
    assert TrainState.from_dict(state.to_dict()) == state
    old = {"step": 4, "epoch": 0, "index": 4, "best": float("inf"), "bad_evals": 0, "tokens": 10}
    restored = TrainState.from_dict({**old, "some_future_field": 1})
    assert restored.step == 4 and restored.stopped == "" and math.isinf(restored.best)


def test_payload_restores_optimizer_scheduler_and_rng():
    def fresh():
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))

    model, opt, sched = fresh()
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    sched.step()
    payload = TrainState(step=1).to_payload(opt, sched, {"train": {}})
    assert set(payload) == set(PAYLOAD_KEYS)
    expected = (torch.rand(3), random.random())

    _, opt2, sched2 = fresh()
    torch.manual_seed(123)
    state = TrainState.restore(payload, opt2, sched2)
    assert state.step == 1 and sched2.last_epoch == 1
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_step_output_flags_bad_numbers():
    ok = StepOutput(1.0, torch.tensor(2.0), tokens=100, seconds=0.5)
    assert ok.finite and ok.tokens_per_s == 200
    assert not StepOutput(float("nan"), torch.tensor(2.0), tokens=1).finite
    assert not StepOutput(1.0, torch.tensor(float("inf")), tokens=1).finite
