"""`lorafit tune`'s search: the Optuna study in SQLite (created, or reopened after checking it
searches the same config and space), the wall-clock budget, and the loop that asks for a trial, runs
it in its own process and tells the study how it ended."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from lorafit.tasks import get_task
from lorafit.train.config import RunConfig, build_run_config, read_raw_config
from lorafit.train.tune.report import TuneResult, clock, finish
from lorafit.train.tune.space import Param, apply, check_space, parse_space, show
from lorafit.train.tune.trial import import_optuna, make_pruner, processes, run_trial

STUDY_NAME = "lorafit"
STUDY_FILE = "study.db"


def parse_duration(text: str) -> float:
    """'30m', '1h30m', '90s', '2h' -> seconds."""
    text = str(text).strip().lower()
    parts = re.fullmatch(
        r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?", text
    )
    if not text or parts is None or not any(parts.groups()):
        raise ValueError(f"--budget {text!r}: give a duration with a unit, e.g. 30m, 1h30m, 90s")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    seconds = 3600 * h + 60 * m + s
    if seconds <= 0:
        raise ValueError(f"--budget {text!r} must be longer than 0")
    return seconds


def direction_of(cfg: RunConfig) -> str:
    u = cfg.tune
    if u.direction != "auto":
        return u.direction
    return get_task(cfg.model.task).metrics[u.metric]


def storage_url(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / STUDY_FILE).resolve()}"


def _open_study(study_dir: Path, raw: dict, cfg: RunConfig, params: list[Param], log):
    """Create the study, or reopen it after checking it searches the same config and space."""
    optuna = import_optuna()
    db = study_dir / STUDY_FILE
    identity = {"config": raw, "space": [dataclasses.asdict(p) for p in params]}
    identity = json.loads(json.dumps(identity, default=str))
    if not db.exists():
        if study_dir.exists() and any(study_dir.iterdir()):
            raise FileExistsError(
                f"{study_dir} exists and holds no lorafit study ({STUDY_FILE}); choose another "
                "--study folder"
            )
        study_dir.mkdir(parents=True, exist_ok=True)
    existing = db.exists() and optuna.study.get_all_study_names(storage_url(study_dir))
    study = optuna.create_study(
        storage=storage_url(study_dir),
        study_name=STUDY_NAME,
        direction=direction_of(cfg),
        load_if_exists=True,
    )
    if existing:
        before = study.user_attrs.get("identity")
        if before != identity:
            changed = _changed(before or {}, identity)
            raise ValueError(
                f"--study {study_dir} searches another config or space (changed: "
                f"{', '.join(changed) or 'unknown'}); use another --study folder"
            )
        log(f"continuing the study in {study_dir}: {len(study.trials)} trials so far")
    else:
        study.set_user_attr("identity", identity)
        study.set_user_attr("spent_s", 0.0)
    return study


def _changed(before: dict, now: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(before) | set(now))
    out = []
    for k in keys:
        a, b = before.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}".removeprefix("config."))
    return out


def _close_interrupted(study, log) -> None:
    """Trials left RUNNING by an interrupted tune are failed (their process is gone)."""
    optuna = import_optuna()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted (tune stopped)")
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        log(f"trial {t.number}: left running by an interrupted tune, recorded as failed")


def tune(
    config: str | None,
    overrides: list[str] = (),
    budget_s: float | None = None,
    trials: int | None = None,
    study_dir: str | os.PathLike | None = None,
    seeds: int = 0,
    log: Callable[[str], None] = print,
) -> TuneResult:
    """Search the config's tune.space for `budget_s` seconds of wall clock and/or `trials`
    trials (the study's totals, counted across continued runs); see the module docstring."""
    optuna = import_optuna()
    processes()
    raw, source = read_raw_config(config, overrides)
    cfg = build_run_config(raw, source)
    raw = json.loads(json.dumps(raw))  # plain JSON types (the identity stored in the study)
    if trials is not None and trials < 0:
        raise ValueError(f"--trials must be >= 0, got {trials}")
    if seeds < 0:
        raise ValueError(f"--seeds must be >= 0, got {seeds}")
    if not cfg.data.validation and cfg.data.val_fraction == 0:
        raise ValueError(
            "lorafit tune optimises a validation metric, but this config has no validation "
            "data: set data.validation or data.val_fraction > 0"
        )
    params = parse_space(raw, cfg)
    check_space(raw, params, cfg, source)
    study_dir = Path(study_dir) if study_dir else Path(f"{cfg.train.output_dir}-tune")
    study = _open_study(study_dir, raw, cfg, params, log)
    _close_interrupted(study, log)
    stored = study.user_attrs.get("budget_s")
    if budget_s is None:
        budget_s = stored
    elif stored is not None and budget_s != stored:
        log(f"budget changed from {clock(stored)} to {clock(budget_s)}")
    if budget_s is None and trials is None:
        raise ValueError("give --budget (e.g. 30m) or --trials N: the search needs an end")
    if budget_s is not None:
        study.set_user_attr("budget_s", budget_s)
    metric, direction = cfg.tune.metric, direction_of(cfg)
    log(
        f"tune: val {metric} ({direction}) over {len(params)} options: "
        + "; ".join(f"{p.key} {p.describe()}" for p in params)
    )
    spent_before = float(study.user_attrs.get("spent_s", 0.0))
    started = time.time()
    deadline = None if budget_s is None else started + (budget_s - spent_before)
    sampler = optuna.samplers.TPESampler(
        seed=cfg.train.seed + len(study.trials),  # a continued study draws new startup trials
        n_startup_trials=cfg.tune.startup_trials,
    )
    study.sampler = sampler
    study.pruner = make_pruner(cfg.tune.pruner, cfg, cfg.tune.startup_trials)

    def spent() -> float:
        return spent_before + time.time() - started

    try:
        with _sigterm_as_interrupt():
            _search(
                study, params, raw, cfg, source, study_dir, trials, deadline, budget_s, spent, log
            )
    finally:  # also when interrupted: a continued study knows the time already spent
        study.set_user_attr("spent_s", spent())
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise _no_result(study, budget_s)
    return finish(study, study_dir, raw, cfg, params, seeds, log, source)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the tune like Ctrl-C: the running trial's process is killed with it."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _search(study, params, raw, cfg, source, study_dir, trials, deadline, budget_s, spent, log):
    """Trials until `trials` are finished or the budget's end (see `tune`)."""
    optuna = import_optuna()
    metric = cfg.tune.metric
    while True:
        finished = [t for t in study.trials if t.state.is_finished()]
        if trials is not None and len(finished) >= trials:
            break
        if deadline is not None:
            left = deadline - time.time()
            durations = [
                t.user_attrs.get("seconds", 0.0)
                for t in finished
                if t.state == optuna.trial.TrialState.COMPLETE
            ]
            if left <= 0 or (durations and left < 0.5 * statistics.median(durations)):
                if left > 0:
                    log(f"{clock(left)} left: less than half a trial; the search ends here")
                break
        trial = study.ask()
        values = {p.key: p.suggest(trial) for p in params}
        number = trial.number
        folder = study_dir / "trials" / f"{number:04d}"
        trial_raw = apply(raw, values, cfg)
        trial_raw["train"]["output_dir"] = str(folder / "run")
        trial.set_user_attr("dir", str(folder))
        total = "" if trials is None else f"/{trials}"
        log(f"trial {number + 1}{total}: " + ", ".join(f"{k}={show(v)}" for k, v in values.items()))
        try:
            build_run_config(trial_raw, source)
        except ValueError as exc:
            _fail(study, trial, str(exc), 0.0)
            log(f"  failed: {exc}")
            continue
        spec = {
            "config": trial_raw,
            "source": f"{source} (trial {number})",
            "report": {
                "storage": storage_url(study_dir),
                "study": STUDY_NAME,
                "trial_id": trial._trial_id,
                "metric": metric,
                "pruner": cfg.tune.pruner,
            },
        }
        t0 = time.time()
        result, cut = run_trial(spec, folder, deadline)
        seconds = time.time() - t0
        latest = study._storage.get_trial(trial._trial_id)
        reached = max(latest.intermediate_values, default=0)  # a stopped trial's last report
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("steps", result.get("steps", reached))
        study.set_user_attr("spent_s", spent())
        if cut:
            trial.set_user_attr("budget_cut", True)
            if latest.intermediate_values:
                trial.set_user_attr("stopped", "the end of the budget")
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                log(f"  stopped at the end of the budget after {clock(seconds)}")
            else:
                _fail(study, trial, result["error"], seconds)
                log(f"  stopped at the end of the budget after {clock(seconds)}, no report yet")
        elif "error" in result:
            _fail(study, trial, result["error"], seconds)
            log(f"  failed: {result['error']} (log: {folder / 'train.log'})")
        elif result.get("pruned") and latest.intermediate_values:
            trial.set_user_attr("stopped", result.get("stopped", "pruned"))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            log(f"  {result.get('stopped', 'pruned')} ({clock(seconds)})")
        elif result.get("value") is None or not math.isfinite(result["value"]):
            _fail(study, trial, f"no finite val_{metric} ({result.get('value')})", seconds)
            log(f"  failed: no finite val_{metric}")
        else:
            study.tell(trial, float(result["value"]))
            log(f"  val_{metric} {result['value']:.4f} in {clock(seconds)}")
        log("  " + _standing(study, budget_s, spent()))


def _fail(study, trial, error: str, seconds: float) -> None:
    optuna = import_optuna()
    trial.set_user_attr("error", error[:500])
    trial.set_user_attr("seconds", seconds)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)


def _standing(study, budget_s: float | None, spent: float) -> str:
    optuna = import_optuna()
    states = [t.state for t in study.trials]
    counts = {s.name.lower(): states.count(s) for s in optuna.trial.TrialState if s in states}
    text = ", ".join(f"{n} {k}" for k, n in counts.items())
    try:
        best = study.best_trial
        text += f" | best {best.value:.4f} (trial {best.number + 1})"
    except ValueError:
        text += " | no complete trial yet"
    if budget_s is not None:
        text += f" | {clock(spent)} spent, {clock(budget_s - spent)} left"
    return text


def _no_result(study, budget_s: float | None) -> ValueError:
    errors = [t.user_attrs.get("error") for t in study.trials if t.user_attrs.get("error")]
    cut = [t for t in study.trials if t.user_attrs.get("budget_cut")]
    if cut and budget_s is not None and len(cut) == len(study.trials):
        first = study.trials[0]
        return ValueError(
            f"--budget {clock(budget_s)} is shorter than one trial: trial 1 was stopped after "
            f"{clock(first.user_attrs.get('seconds', 0))} at step "
            f"{first.user_attrs.get('steps', 0)}"
            "; raise --budget or shorten the run (train.max_steps)"
        )
    if errors:
        return ValueError(
            f"no trial completed ({len(errors)} failed); the first error: {errors[0]}"
        )
    return ValueError("no trial completed: raise --budget or --trials")
