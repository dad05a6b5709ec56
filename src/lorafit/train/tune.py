"""`lorafit tune`: a budgeted search over rank and hyperparameters with Optuna.

    config (tune: section) -> space -> [ask -> one `lorafit train` process -> tell]* -> report

Each trial is a real training run in its own process (`trial.py`), with the config the sampler
(TPE) picked; it reports the validation metric at every evaluation, and the pruner (Hyperband or
median) stops weak trials early. The wall-clock budget is the study's: a trial still running when
it ends is stopped (its process is killed) and recorded as pruned at its last report. The study
lives in SQLite (`<study>/study.db`), so an interrupted tune continues where it stopped, with the
budget it had left; a trial that crashes is recorded as failed with its error and the search goes
on. Products: `best.yaml` (a config `lorafit train` runs as is), `report.md` with the trial
table and Optuna's plots, and with `seeds` the best config rerun with fresh seeds (mean +- std).

The objective is a validation metric only: trials never see a test split.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import re
import signal
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit import atomic
from lorafit.models.loading import model_config
from lorafit.tasks import get_task
from lorafit.train.config import (
    SECTIONS,
    RunConfig,
    _suggest,
    build_run_config,
    field_docs,
    read_raw_config,
)
from lorafit.train.trial import import_optuna, child, make_pruner

STUDY_NAME = "lorafit"
STUDY_FILE = "study.db"
RESULT_FILE = "trial_result.json"
"""What a trial process leaves in its folder for the parent (written last, atomically)."""
SPEC_FILE = "trial.json"
GRACE_S = 10.0
"""Seconds a trial process gets to exit after SIGTERM at the end of the budget before SIGKILL."""

ALPHA_RATIO, TARGETS = "lora.alpha_ratio", "lora.targets"
DERIVED = {ALPHA_RATIO: "lora.lora_alpha", TARGETS: "lora.target_modules"}
"""Search keys that are not options themselves, and the option each one sets."""

TARGET_SETS: dict[str, dict[str, list[str] | str]] = {
    **{
        model_type: {
            "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "mlp": ["gate_proj", "up_proj", "down_proj"],
        }
        for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2")
    },
    "bert": {
        "attention": r".*\.attention\.(self\.(query|key|value)|output\.dense)",
        "mlp": r".*\.layer\.\d+\.(intermediate|output)\.dense",
    },
    "gpt2": {"attention": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},
}
"""lora.targets: the target_modules of "attention" and "mlp" per model type ("all-linear" is
every linear layer but the head, on any model)."""

DEFAULT_SPACES: dict[str, dict[str, Any]] = {
    "lora": {
        "lora.r": {"low": 4, "high": 64, "log": True},
        ALPHA_RATIO: [0.5, 1, 2, 4],
        "train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
        TARGETS: ["attention", "mlp", "all-linear"],
        "lora.lora_dropout": [0.0, 0.05, 0.1],
        "lora.init_lora_weights": [True, "pissa"],
        "lora.use_rslora": [False, True],
        "train.lora_plus_ratio": [None, 4, 16],
    },
    "full": {"train.lr": {"low": 1e-6, "high": 1e-3, "log": True}},
}
"""The space searched when tune.space is not given, per train.method."""


# --- the search space ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One searched option: categorical `choices`, or a range [low, high] (log-uniform if `log`)."""

    key: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return "{" + ", ".join(_show(c) for c in self.choices) + "}"
        return f"[{_show(self.low)}, {_show(self.high)}]{' log' if self.log else ''}"

    def extremes(self) -> list[Any]:
        """The values that bound this parameter (checked against the config before searching)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def _annotation(key: str) -> str:
    section, option = key.split(".", 1)
    fields = {f.name: str(f.type) for f in dataclasses.fields(SECTIONS[section])}
    return fields[option]


def parse_space(raw: dict[str, Any], cfg: RunConfig) -> list[Param]:
    """tune.space (or the method's default space) as Params; a ValueError names the bad entry."""
    space = raw.get("tune", {}).get("space") if isinstance(raw.get("tune"), dict) else None
    if space is None:
        space = DEFAULT_SPACES[cfg.train.method]
    if not isinstance(space, dict) or not space:
        raise ValueError(
            "tune.space is empty: give at least one option to search (e.g. train.lr: "
            "{low: 1e-4, high: 1e-2, log: true}), or drop tune.space for the default space"
        )
    params = []
    for key, spec in space.items():
        where = f"tune.space.{key}"
        section, _, option = str(key).partition(".")
        if key not in DERIVED:
            if section not in SECTIONS or section == "tune" or not option:
                known = [s for s in SECTIONS if s != "tune"]
                raise ValueError(
                    f"{where}: search keys are section.option with a section of "
                    f"{', '.join(known)} (or {ALPHA_RATIO}, {TARGETS})"
                )
            options = [n for n in field_docs(SECTIONS[section])]
            if option not in options:
                raise ValueError(f"{where}: unknown option {key}{_suggest(option, options)}")
        if key in ("train.method", "train.output_dir", "model.task"):
            raise ValueError(
                f"{where}: {key} cannot be searched (tune LoRA and full fine-tuning as two "
                "studies with the same budget, each with its own config)"
            )
        if section == "lora" and cfg.train.method != "lora":
            raise ValueError(
                f"{where}: train.method is {cfg.train.method}, which trains no adapter; drop "
                f"the lora.* keys from tune.space or set train.method: lora"
            )
        replaced = DERIVED.get(key)
        if replaced in space:
            raise ValueError(
                f"tune.space has both {key} and {replaced}: {key} sets {replaced}, keep one"
            )
        params.append(_param(key, spec, where))
    for p in params:
        if p.key == TARGETS:
            for choice in p.choices or ():
                if choice != "all-linear":
                    target_modules(cfg, choice)  # an unknown set or model type fails here
    return params


def _param(key: str, spec: Any, where: str) -> Param:
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"{where}: the list of choices is empty")
        if any(isinstance(c, (list, dict)) for c in spec):
            raise ValueError(f"{where}: choices must be single values (numbers, strings, null)")
        if len({json.dumps(c) for c in spec}) != len(spec):
            raise ValueError(f"{where}: the choices repeat a value")
        if key == TARGETS and any(c not in ("attention", "mlp", "all-linear") for c in spec):
            raise ValueError(f"{where}: choices are attention, mlp and all-linear")
        return Param(key, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise ValueError(
            f"{where}: give a list of choices or a range {{low, high, log}}, got {spec!r} "
            "(a fixed value belongs in its own section)"
        )
    unknown = set(spec) - {"low", "high", "log"}
    if unknown or "low" not in spec or "high" not in spec:
        raise ValueError(f"{where}: a range is {{low: L, high: H, log: true|false}}")
    if key in DERIVED and key != ALPHA_RATIO:
        raise ValueError(f"{where}: {key} takes a list of choices")
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: low and high must be numbers") from None
    log = bool(spec.get("log", False))
    if not low < high:
        raise ValueError(f"{where}: low ({low:g}) must be below high ({high:g})")
    if log and low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0")
    annotation = "float" if key == ALPHA_RATIO else _annotation(key)
    kinds = {a.strip() for a in annotation.split("|")}
    if not kinds & {"int", "float"}:
        raise ValueError(f"{where}: {key} is not numeric ({annotation}); list its choices")
    integer = "float" not in kinds
    if integer and not (low.is_integer() and high.is_integer()):
        raise ValueError(f"{where}: {key} is an integer option; give integer low and high")
    if integer:
        low, high = int(low), int(high)
    return Param(key, low=low, high=high, log=log, integer=integer)


@functools.lru_cache(maxsize=8)
def _model_type(name: str, cache_dir: str | None) -> str | None:
    return getattr(model_config(name, cache_dir), "model_type", None)


def target_modules(cfg: RunConfig, name: str) -> list[str] | str:
    """lora.targets `name` as target_modules for the run's base model."""
    if name == "all-linear":
        return "all-linear"
    model_type = _model_type(cfg.model.name, cfg.model.cache_dir)
    sets = TARGET_SETS.get(model_type)
    if sets is None:
        raise ValueError(
            f"tune.space.{TARGETS}: lorafit knows no attention / mlp split for model type "
            f"{model_type!r}; search lora.target_modules choices yourself, or use all-linear"
        )
    return sets[name]


def apply(raw: dict[str, Any], values: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """The raw config with the searched `values` set (derived keys turned into options)."""
    out = copy.deepcopy(raw)
    for section in ("model", "data", "lora", "train"):
        if not isinstance(out.get(section), dict):
            out[section] = {}
    for key, value in values.items():
        if key == TARGETS:
            out["lora"]["target_modules"] = target_modules(cfg, value)
        elif key != ALPHA_RATIO:
            section, option = key.split(".", 1)
            out[section][option] = value
    if ALPHA_RATIO in values:
        r = out["lora"].get("r", cfg.lora.r)
        out["lora"]["lora_alpha"] = float(values[ALPHA_RATIO]) * r
    return out


def check_space(raw: dict[str, Any], params: list[Param], cfg: RunConfig, source: str) -> None:
    """Every bound of every parameter gives a valid config (contradictions fail here, before
    any trial runs)."""
    for p in params:
        for value in p.extremes():
            try:
                build_run_config(apply(raw, {p.key: value}, cfg), source)
            except ValueError as exc:
                reason = str(exc).removeprefix(f"{source}: ")
                raise ValueError(f"tune.space.{p.key} = {_show(value)}: {reason}") from None


# --- budget ------------------------------------------------------------------------------------------
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


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# --- the study ---------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    study_dir: Path
    best_value: float
    best_trial: int
    best_config: Path
    report: Path
    trials: int
    spent_s: float
    seeds: list[float] = field(default_factory=list)


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


_CONTEXT = None


def _processes():
    """Trials start from a fork server that imported torch, transformers and lorafit once:
    each trial is a fresh process without paying ~5 s of imports again."""
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing
        from multiprocessing import forkserver

        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["lorafit.train.trial"])
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
    proc = _processes().Process(
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
    _processes()
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
    return _finish(study, study_dir, raw, cfg, params, seeds, log, source)


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
        log(
            f"trial {number + 1}{total}: " + ", ".join(f"{k}={_show(v)}" for k, v in values.items())
        )
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
            f"{clock(first.user_attrs.get('seconds', 0))} at step {first.user_attrs.get('steps', 0)}"
            "; raise --budget or shorten the run (train.max_steps)"
        )
    if errors:
        return ValueError(
            f"no trial completed ({len(errors)} failed); the first error: {errors[0]}"
        )
    return ValueError("no trial completed: raise --budget or --trials")


# --- products ----------------------------------------------------------------------------------------
def best_config(study, raw: dict, cfg: RunConfig) -> dict[str, Any]:
    """The config of the best trial, with the original output_dir: `lorafit train` runs it."""
    best = study.best_trial
    out = apply(raw, best.params, cfg)
    out["train"]["output_dir"] = cfg.train.output_dir
    return out


def _write_yaml(path: Path, data: dict, header: str) -> None:
    import yaml

    text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    atomic.write_text(path, text)


def run_seeds(
    best: dict, cfg: RunConfig, study_dir: Path, k: int, source: str, log
) -> list[dict[str, Any]]:
    """The best config rerun with seeds train.seed + 1 .. + k (fresh seeds: the search picked
    its config on train.seed, so that run's number is biased upward). Finished runs of the same
    config are reused."""
    out = []
    for i in range(1, k + 1):
        seed = cfg.train.seed + i
        run_raw = copy.deepcopy(best)
        folder = study_dir / "seeds" / f"seed-{seed}"
        run_raw["train"]["seed"] = seed
        run_raw["train"]["output_dir"] = str(folder / "run")
        result_file = folder / RESULT_FILE
        if result_file.is_file():
            spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
            result = json.loads(result_file.read_text(encoding="utf-8"))
            if spec.get("config") == run_raw and "error" not in result:
                out.append({"seed": seed, **result, "dir": str(folder)})
                log(f"seed {seed}: reused {folder}")
                continue
        if folder.exists():
            atomic.remove_dir(folder)
        log(f"seed {seed}: training the best config ({i}/{k})")
        spec = {"config": run_raw, "source": f"{source} (seed {seed})", "metric": cfg.tune.metric}
        result, _ = run_trial(spec, folder, None)
        if "error" in result:
            raise RuntimeError(f"seed {seed} failed: {result['error']} (log: {folder}/train.log)")
        out.append({"seed": seed, **result, "dir": str(folder)})
        log(f"  val_{cfg.tune.metric} {result['value']:.4f}")
    return out


def _finish(study, study_dir, raw, cfg, params, seeds, log, source) -> TuneResult:
    best = study.best_trial
    config = best_config(study, raw, cfg)
    header = (
        f"# lorafit tune: the best of {len(study.trials)} trials in {study_dir} (trial "
        f"{best.number + 1}, val_{cfg.tune.metric} {best.value:.4f}).\n"
        f"# Run it with: lorafit train {study_dir / 'best.yaml'}\n"
    )
    config.pop("tune", None)
    _write_yaml(study_dir / "best.yaml", config, header)
    seed_runs = run_seeds(config, cfg, study_dir, seeds, source, log) if seeds else []
    report = write_report(study, study_dir, cfg, params, seed_runs)
    log(f"best: trial {best.number + 1}, val_{cfg.tune.metric} {best.value:.4f}")
    log(f"config: {study_dir / 'best.yaml'}  report: {report}")
    values = [r["value"] for r in seed_runs]
    if values:
        log(f"seeds {[r['seed'] for r in seed_runs]}: {_mean_std(values)}")
    return TuneResult(
        study_dir,
        best.value,
        best.number,
        study_dir / "best.yaml",
        report,
        len(study.trials),
        float(study.user_attrs.get("spent_s", 0.0)),
        values,
    )


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} +- {std:.4f} (mean +- std of {len(values)})"


PLOTS = {
    "history.png": ("plot_optimization_history", "optimization history"),
    "importances.png": ("plot_param_importances", "parameter importances (PED-ANOVA)"),
    "parallel.png": ("plot_parallel_coordinate", "parallel coordinates"),
}


def _plots(study, study_dir: Path) -> dict[str, str]:
    """Optuna's matplotlib plots as PNGs; {file: "" when drawn, else why not}."""
    optuna = import_optuna()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    out = {}
    for name, (function, _) in PLOTS.items():
        kwargs = {}
        if function == "plot_param_importances":
            kwargs["evaluator"] = optuna.importance.PedAnovaImportanceEvaluator()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = getattr(vis, function)(study, **kwargs)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(9, 5)
                fig.tight_layout()
                atomic.write_file(study_dir / name, lambda p, f=fig: f.savefig(p, format="png"))
                plt.close(fig)
            out[name] = ""
        except Exception as exc:  # too few trials, one value only...: the report says so
            out[name] = f"not drawn: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            plt.close("all")
    return out


def write_report(study, study_dir: Path, cfg: RunConfig, params, seed_runs) -> Path:
    optuna = import_optuna()
    metric = f"val_{cfg.tune.metric}"
    plots = _plots(study, study_dir)
    best = study.best_trial
    spent = float(study.user_attrs.get("spent_s", 0.0))
    budget = study.user_attrs.get("budget_s")
    states = [t.state for t in study.trials]
    counts = ", ".join(
        f"{states.count(s)} {s.name.lower()}" for s in optuna.trial.TrialState if s in states
    )
    lines = [
        f"# lorafit tune: {cfg.model.name} {cfg.model.task}, train.method {cfg.train.method}",
        "",
        f"Objective: {metric} ({study.direction.name.lower()}), on the validation split only. "
        f"Sampler TPE ({cfg.tune.startup_trials} random startup trials), pruner "
        f"{cfg.tune.pruner}. Search time: {clock(spent)}"
        + (f" of a {clock(budget)} budget" if budget else "")
        + f"; {len(study.trials)} trials ({counts}).",
        "",
        "Space: " + "; ".join(f"`{p.key}` {p.describe()}" for p in params),
        "",
        f"**Best: trial {best.number + 1}, {metric} {best.value:.4f}** — "
        + ", ".join(f"`{k}`={_show(v)}" for k, v in best.params.items())
        + ". Config: `best.yaml`.",
        "",
    ]
    if seed_runs:
        values = [r["value"] for r in seed_runs]
        lines += [
            f"Best config rerun with fresh seeds {', '.join(str(r['seed']) for r in seed_runs)}: "
            f"{metric} {_mean_std(values)}; per seed "
            + ", ".join(f"{v:.4f}" for v in values)
            + f" (runs in `seeds/`; {clock(sum(r.get('seconds', 0) for r in seed_runs))}, "
            "outside the search budget).",
            "",
        ]
    keys = [p.key for p in params]
    lines += [
        "| trial | state | " + metric + " | steps | time | " + " | ".join(keys) + " | note |",
        "|---:|---|---:|---:|---:|" + "---|" * len(keys) + "---|",
    ]
    for t in study.trials:
        value = t.value
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        note = t.user_attrs.get("error") or t.user_attrs.get("stopped") or ""
        row = [
            str(t.number + 1),
            t.state.name.lower(),
            f"{value:.4f}" if value is not None else "",
            str(t.user_attrs.get("steps", "")),
            clock(t.user_attrs.get("seconds", 0.0)),
            *[_show(t.params[k]) if k in t.params else "" for k in keys],
            note.replace("|", "/").replace("\n", " ")[:120],
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for name, (_, title) in PLOTS.items():
        why = plots[name]
        lines.append(f"![{title}]({name})" if not why else f"{title}: {why}")
        lines.append("")
    path = study_dir / "report.md"
    atomic.write_text(path, "\n".join(lines))
    if seed_runs:
        atomic.write_json(study_dir / "seeds.json", seed_runs)
    return path
