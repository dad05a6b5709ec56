"""Callbacks on their own (a Trainer that was never set up, with scripted evaluations), and the
order in which a real run calls the hooks."""

import math
from types import SimpleNamespace

import pytest
import torch

from lorafit.train.callbacks import (
    BestAdapter,
    Callback,
    Checkpoints,
    EarlyStopping,
    Evaluation,
    MetricsLogger,
    NanGuard,
    TrainingStopped,
    default_callbacks,
)
from lorafit.train.state import StepOutput
from lorafit.train.trainer import Trainer


def _out(loss=1.0, grad_norm=1.0):
    return StepOutput(loss, torch.tensor(grad_norm), tokens=10, seconds=0.5)


@pytest.fixture
def bare(make_cfg, tmp_path):
    """bare(callbacks, val_losses, *overrides): a Trainer whose evaluate() returns the scripted
    losses and whose saves are recorded, not written."""

    def make(callbacks, val_losses=(), *extra, total=10):
        trainer = Trainer(make_cfg(tmp_path / "run", *extra), progress=False, callbacks=callbacks)
        trainer.total_steps = total
        trainer.data = SimpleNamespace(
            val=[{}] if val_losses is not None else [], adapter="default"
        )
        trainer.saved, trainer.products, trainer.evaluated = [], [], []
        losses = iter(val_losses or ())

        def evaluate():
            trainer.evaluated.append(trainer.state.step)
            return {"loss": next(losses)}

        trainer.evaluate = evaluate
        trainer.save_checkpoint = lambda: trainer.saved.append(trainer.state.step)
        trainer.save_product = lambda folder: trainer.products.append((trainer.state.step, folder))
        return trainer

    return make


def _run_steps(trainer, steps):
    for step in range(1, steps + 1):
        trainer.state.step = step
        trainer.dispatch("on_step_end", _out())
        if trainer.finished:
            break


def test_evaluation_runs_every_eval_every_steps_and_at_the_end(bare):
    trainer = bare([Evaluation()], [3.0, 2.0, 2.5, 1.0], "train.eval_every=3")
    _run_steps(trainer, 10)
    assert trainer.evaluated == [3, 6, 9, 10]
    assert trainer.state.best == 1.0 and trainer.state.bad_evals == 0


def test_evaluation_without_validation_data_never_evaluates(bare):
    trainer = bare([Evaluation(), BestAdapter()], None, "train.eval_every=1")
    _run_steps(trainer, 10)
    assert trainer.evaluated == [] and trainer.products == []
    assert trainer.state.best == math.inf


def test_best_adapter_saves_only_improvements(bare):
    trainer = bare([Evaluation(), BestAdapter()], [3.0, 2.0, 2.5, 1.0], "train.eval_every=3")
    _run_steps(trainer, 10)
    assert [step for step, _ in trainer.products] == [3, 6, 10]
    assert all(folder == trainer.out / "best_adapter" for _, folder in trainer.products)


def test_early_stopping_counts_evaluations_without_improvement(bare):
    callbacks = [Evaluation(), EarlyStopping(2), Checkpoints()]
    trainer = bare(callbacks, [3.0, 2.0, 2.5, 2.2, 1.0], "train.eval_every=1", "train.save_every=0")
    _run_steps(trainer, 10)
    assert trainer.evaluated == [1, 2, 3, 4]
    assert trainer.state.stopped == "early stop: no validation improvement in 2 evaluations"
    assert trainer.saved == [4]  # a stopped run is checkpointed where it stopped


def test_checkpoints_every_save_every_steps_and_at_the_end(bare):
    trainer = bare([Checkpoints()], None, "train.save_every=4")
    _run_steps(trainer, 10)
    assert trainer.saved == [4, 8, 10]


def test_nan_guard_stops_before_the_optimizer_step(bare):
    trainer = bare([NanGuard()], None)
    trainer.optimizer = SimpleNamespace(zero_grad=lambda set_to_none: None)
    trainer.dispatch("after_backward", _out())  # finite: nothing happens
    for bad in (_out(loss=float("nan")), _out(grad_norm=float("inf"))):
        with pytest.raises(
            TrainingStopped, match=r"step 1: .*not finite.*none \(no checkpoint yet\)"
        ):
            trainer.dispatch("after_backward", bad)
        assert trainer.state.stopped == "nan"


def test_only_the_writing_process_runs_main_process_only_callbacks(bare):
    calls = []

    class Writer(Callback):
        main_process_only = True

        def on_step_end(self, trainer, out):
            calls.append("writer")

    class Everyone(Callback):
        def on_step_end(self, trainer, out):
            calls.append("everyone")

    trainer = bare([Writer(), Everyone()], None)
    trainer.dispatch("on_step_end", _out())
    trainer.is_main = False
    trainer.dispatch("on_step_end", _out())
    assert calls == ["writer", "everyone", "everyone"]


def test_default_callbacks_follow_the_config(make_cfg, tmp_path):
    cfg = make_cfg(tmp_path, "train.early_stopping_patience=2")
    kinds = [type(c).__name__ for c in default_callbacks(Trainer(cfg), progress=False)]
    assert kinds == [
        "NanGuard",
        "MetricsLogger",
        "Evaluation",
        "BestAdapter",
        "EarlyStopping",
        "Checkpoints",
    ]
    with_bar = default_callbacks(Trainer(make_cfg(tmp_path)), progress=True)
    assert "ProgressBar" in [type(c).__name__ for c in with_bar]
    assert MetricsLogger.main_process_only and not Evaluation.main_process_only


def test_a_run_calls_the_hooks_in_order(make_cfg, tmp_path):
    calls = []

    class Recorder(Callback):
        def on_fit_start(self, trainer):
            calls.append(("start", trainer.state.step))

        def after_backward(self, trainer, out):
            assert out.finite and out.tokens > 0
            calls.append(("backward", trainer.state.step))

        def on_step_end(self, trainer, out):
            assert out.seconds > 0 and out.lr >= 0 and out.epoch > 0
            calls.append(("step", trainer.state.step))

        def on_evaluate(self, trainer, metrics, improved):
            calls.append(("evaluate", trainer.state.step))

        def on_fit_end(self, trainer):
            calls.append(("end", trainer.state.step))

    cfg = make_cfg(tmp_path / "run", "train.max_steps=3", "train.eval_every=2")
    trainer = Trainer(cfg, progress=False, log=lambda _: None)
    trainer.callbacks = [Recorder(), *trainer.callbacks]
    trainer.setup()
    trainer.fit()
    result = trainer.save()
    assert calls == [
        ("start", 0),
        ("backward", 0),
        ("step", 1),
        ("backward", 1),
        ("step", 2),
        ("evaluate", 2),
        ("backward", 2),
        ("step", 3),
        ("evaluate", 3),
        ("end", 3),
    ]
    assert result.steps == 3


def test_a_failing_step_still_closes_the_callbacks(make_cfg, tmp_path, monkeypatch):
    ended = []

    class Closer(Callback):
        def on_fit_end(self, trainer):
            ended.append(trainer.state.step)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("lorafit.train.trainer.forward_backward", broken)
    trainer = Trainer(make_cfg(tmp_path / "run", "train.max_steps=3"), progress=False)
    trainer.callbacks.append(Closer())
    trainer.setup()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert ended == [0]
