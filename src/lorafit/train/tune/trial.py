"""One `lorafit tune` trial in its own process: `run_trial` (the parent's side) starts `child`
from a fork server that imported torch and lorafit once, waits for it and stops it at the budget's
end; also `python -m lorafit.train.tune.trial SPEC.json`.

The spec (written by `run_trial`) holds the trial's whole run config and, for a search trial, where
its Optuna study lives. The run is an ordinary training run (`Trainer`, the same callbacks as
`lorafit train` but no checkpoints: a trial is never resumed, it is rerun), plus `Report`: each
validation result goes to the study, and when the pruner says so the run stops after that step.
The result (the final validation metrics, or the error) is written last, atomically, beside
the spec; the parent reads it after the process ends. A process of its own per trial means a
crash, a leak or an out-of-memory kill ends that trial only, and the end of the budget can stop
it at any moment.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from lorafit import atomic
from lorafit.train.callbacks import BestAdapter, Callback, Checkpoints
from lorafit.train.config import RunConfig, build_run_config
from lorafit.train.trainer import Trainer

PRUNED = "pruned"
SPEC_FILE = "trial.json"
RESULT_FILE = "trial_result.json"
"""What a trial process leaves in its folder for the parent (written last, atomically)."""
GRACE_S = 10.0
"""Seconds a trial process gets to exit after SIGTERM at the end of the budget before SIGKILL."""


class Report(Callback):
    """Each validation result of `metric` to the Optuna trial; stop when it is to be pruned."""

    main_process_only = True

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_evaluate(self, trainer, metrics, improved):
        step = trainer.state.step
        self.trial.report(float(metrics[self.metric]), step)
        if step < trainer.total_steps and self.trial.should_prune():
            trainer.stop(f"{PRUNED} at step {step} of {trainer.total_steps}")


def import_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def make_pruner(name: str, cfg: RunConfig, startup: int):
    optuna = import_optuna()
    every = max(1, cfg.train.eval_every or cfg.train.max_steps or 1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=every, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, startup), n_warmup_steps=every)
    return optuna.pruners.NopPruner()


def _study_trial(report: dict):
    optuna = import_optuna()
    study = optuna.load_study(study_name=report["study"], storage=report["storage"])
    return study, optuna.trial.Trial(study, report["trial_id"])


def run(spec_path: str | Path) -> int:
    spec_path = Path(spec_path)
    result_path = spec_path.parent / RESULT_FILE
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    try:
        cfg = build_run_config(spec["config"], spec.get("source", str(spec_path)))
        trainer = Trainer(cfg, progress=False)
        trainer.callbacks = [
            c for c in trainer.callbacks if not isinstance(c, (Checkpoints, BestAdapter))
        ]
        report = spec.get("report")
        if report:
            study, trial = _study_trial(report)
            study.pruner = make_pruner(report["pruner"], cfg, cfg.tune.startup_trials)
            trainer.callbacks.append(Report(trial, report["metric"]))
        trainer.setup()
        trainer.fit()
        res = trainer.save()
    except Exception as exc:
        traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        atomic.write_json(result_path, {"error": first[:500]})
        return 1
    metric = spec.get("metric", cfg.tune.metric)
    atomic.write_json(
        result_path,
        {
            "value": res.final.get(f"val_{metric}"),
            "final": res.final,
            "steps": res.steps,
            "stopped": res.stopped,
            "pruned": res.stopped.startswith(PRUNED),
            "seconds": res.wall_time_s,
            "trainable_params": res.trainable_params,
            "adapter_dir": str(res.adapter_dir),
        },
    )
    return 0


def child(spec_path: str, log_path: str) -> None:
    """A trial process's entry (multiprocessing target): output to `log_path`, then `run`."""
    import os

    with open(log_path, "w", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", closefd=False)
    code = run(spec_path)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


# --- the parent's side ---
_CONTEXT = None


def processes():
    """Trials start from a fork server that imported torch, transformers and lorafit once:
    each trial is a fresh process without paying ~5 s of imports again."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing
        from multiprocessing import forkserver

        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["lorafit.train.tune.trial"])
        forkserver.ensure_running()  # it imports while the parent prepares the study
    return _CONTEXT


def run_trial(
    spec: dict[str, Any], folder: Path, deadline: float | None
) -> tuple[dict[str, Any], bool]:
    """Train one config in its own process in `folder`; (its result, whether the budget's end
    stopped it). The process is stopped at `deadline` (SIGTERM, then SIGKILL)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_json(folder / SPEC_FILE, spec)
    (folder / RESULT_FILE).unlink(missing_ok=True)
    proc = processes().Process(
        target=child, args=(str(folder / SPEC_FILE), str(folder / "train.log")), daemon=True
    )
    proc.start()
    cut = False
    try:
        proc.join(None if deadline is None else max(0.0, deadline - time.time()))
        if proc.is_alive():
            cut = True
            proc.terminate()
            proc.join(GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
    except BaseException:  # Ctrl-C: no trial keeps running behind the tune
        proc.kill()
        proc.join()
        raise
    result_file = folder / RESULT_FILE
    if result_file.is_file() and not cut:
        return json.loads(result_file.read_text(encoding="utf-8")), False
    if cut:
        return {"error": "stopped at the end of the budget"}, True
    tail = _last_line(folder / "train.log")
    return {"error": f"the trial process exited with code {proc.exitcode}: {tail}"}, False


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:200] if lines else "no output"


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
