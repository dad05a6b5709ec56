"""What happens around the optimizer steps, as callback objects the loop calls in order.

Hooks (each receives the `Trainer`, unannotated: trainer.py builds on this module; every one
is optional):

    on_fit_start(trainer)                   before the first step (also on resume)
    after_backward(trainer, out)            gradients are ready, the optimizer has not stepped
    on_step_end(trainer, out)               after the optimizer step; trainer.state is updated
    on_evaluate(trainer, metrics, improved) after each validation pass of the loop
    on_fit_end(trainer)                     always, also when a step raised (close files here)

A callback with a `state_key` keeps state in checkpoints: `state_dict()` goes into the
checkpoint's trainer state, and `load_state_dict(trainer, state)` gets it back on resume (after
the model, optimizer and progress are restored). `edit_adapter(trainer)` may return a function that
rewrites the saved adapter's tensors and config (ReLoRA saves the sum of its updates).

A callback whose `main_process_only` is True only runs on the process that writes (rank 0 under
torch.distributed); the others run everywhere, so every rank takes the same decisions.
To stop training, a callback calls `trainer.stop(reason)`; the loop ends after that step's
callbacks (the checkpoint callback saves a stopped run).
"""

from __future__ import annotations

import lorafit.train.checkpoints as ckpt
from lorafit.train.run_log import MetricsLog
from lorafit.train.state import StepOutput


class TrainingStopped(RuntimeError):
    """Training stopped on bad numbers; the message says where the last good checkpoint is."""


class Callback:
    main_process_only = False
    state_key: str | None = None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, trainer, state: dict) -> None:
        pass

    def edit_adapter(self, trainer):
        return None

    def on_fit_start(self, trainer) -> None:
        pass

    def after_backward(self, trainer, out: StepOutput) -> None:
        pass

    def on_step_end(self, trainer, out: StepOutput) -> None:
        pass

    def on_evaluate(self, trainer, metrics: dict[str, float], improved: bool) -> None:
        pass

    def on_fit_end(self, trainer) -> None:
        pass


class NanGuard(Callback):
    """Stop before a non-finite loss or gradient reaches the weights."""

    def after_backward(self, trainer, out):
        if out.finite:
            return
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.state.stopped = "nan"
        good = ckpt.list_checkpoints(trainer.out)
        raise TrainingStopped(
            f"step {trainer.state.step + 1}: loss {out.loss} / grad norm {float(out.grad_norm)} "
            "is not finite; training stopped. Last good checkpoint: "
            f"{good[-1] if good else 'none (no checkpoint yet)'}. "
            "Try a lower train.lr, train.precision=fp32, or train.max_grad_norm."
        )


class MetricsLogger(Callback):
    """Training rows every train.log_every steps and validation rows to metrics.jsonl (+ TensorBoard)."""

    main_process_only = True

    def __init__(self):
        self.log: MetricsLog | None = None

    def on_fit_start(self, trainer):
        t = trainer.cfg.train
        self.log = MetricsLog(
            trainer.out, truncate_after=trainer.state.step, tensorboard=t.tensorboard
        )

    def on_step_end(self, trainer, out):
        step = trainer.state.step
        if step % trainer.cfg.train.log_every == 0 or step == trainer.total_steps:
            row = {
                "step": step,
                "epoch": out.epoch,
                "loss": out.loss,
                "lr": out.lr,
                "grad_norm": float(out.grad_norm),
                "tokens_per_s": out.tokens_per_s,
            }
            self.log.write(row)

    def on_evaluate(self, trainer, metrics, improved):
        self.log.write({"step": trainer.state.step, **{f"val_{k}": v for k, v in metrics.items()}})

    def on_fit_end(self, trainer):
        if self.log is not None:
            self.log.close()
            self.log = None


class ProgressBar(Callback):
    """A tqdm bar with the loss and throughput."""

    main_process_only = True

    def __init__(self):
        self.bar = None

    def on_fit_start(self, trainer):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=trainer.total_steps,
            initial=trainer.state.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )

    def on_step_end(self, trainer, out):
        self.bar.set_postfix(loss=f"{out.loss:.4f}", tok_s=f"{out.tokens_per_s:.0f}")
        self.bar.update(1)

    def on_fit_end(self, trainer):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Evaluation(Callback):
    """Validate every train.eval_every steps and at the last step; keep the best loss.

    Runs on every process (the best loss and the early-stopping count must agree everywhere).
    Without validation data it does nothing."""

    def on_step_end(self, trainer, out):
        if not trainer.data.val:
            return
        step, every = trainer.state.step, trainer.cfg.train.eval_every
        if (every and step % every == 0) or step == trainer.total_steps:
            metrics = trainer.evaluate()
            state = trainer.state
            improved = metrics["loss"] < state.best
            if improved:
                state.best, state.bad_evals = metrics["loss"], 0
            else:
                state.bad_evals += 1
            trainer.dispatch("on_evaluate", metrics, improved)


class BestAdapter(Callback):
    """Save the adapter (or model) of the lowest validation loss as best_adapter/ (best_model/).
    Runs on every rank: rank 0 writes, the others help gather FSDP-sharded weights."""

    def on_evaluate(self, trainer, metrics, improved):
        if improved:
            trainer.save_product(trainer.best_dir)


class EarlyStopping(Callback):
    """Stop when validation loss has not improved for train.early_stopping_patience evaluations."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_evaluate(self, trainer, metrics, improved):
        bad = trainer.state.bad_evals
        if bad >= self.patience:
            trainer.stop(f"early stop: no validation improvement in {bad} evaluations")


class Checkpoints(Callback):
    """A checkpoint every train.save_every steps, at the last step and when training stops early.
    Runs on every rank: rank 0 writes, the others help gather FSDP-sharded state."""

    def on_step_end(self, trainer, out):
        step, every = trainer.state.step, trainer.cfg.train.save_every
        if (every and step % every == 0) or step == trainer.total_steps or trainer.state.stopped:
            trainer.save_checkpoint()


def default_callbacks(trainer, progress: bool, extra: list[Callback] = ()) -> list[Callback]:
    """The callbacks of a run per its config, in the order they must run; `extra` ones (e.g.
    ReLoRA's restarts) run after evaluation and before the checkpoint."""
    t = trainer.cfg.train
    callbacks: list[Callback] = [NanGuard(), MetricsLogger()]
    if progress:
        callbacks.append(ProgressBar())
    callbacks += [Evaluation(), BestAdapter()]  # on_evaluate runs in list order: log, best, stop
    if t.early_stopping_patience:
        callbacks.append(EarlyStopping(t.early_stopping_patience))
    callbacks += list(extra)
    callbacks.append(Checkpoints())  # last: it saves the state the others left
    return callbacks
