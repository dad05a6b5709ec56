"""A run config built from its raw YAML dict and checked: each value against its option's type,
then the rules between options (every error names the option and what to do)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from lorafit.ops.precision import PRECISIONS
from lorafit.quant.backends import SCHEMES
from lorafit.train.config.options import (
    METHODS,
    NO_VALIDATION_FILE,
    RELORA_RESETS,
    RUN_LORA_DEFAULTS,
    SCHEDULES,
    SECTIONS,
    TUNE_DIRECTIONS,
    TUNE_PRUNERS,
    ReloraOptions,
    RunConfig,
    early_stopping_needs_validation,
    one_of,
)
from lorafit.tuner.config import LoraConfig


def coerce(value: Any, annotation: str, where: str) -> Any:
    """Check (and gently convert) a YAML value against a field's annotation string."""
    allowed = [a.strip() for a in annotation.split("|")]
    if value is None:
        if "None" in allowed:
            return None
        raise ValueError(f"{where} cannot be null")
    for a in allowed:
        if a == "bool" and isinstance(value, bool):
            return value
        if a == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if a == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if a == "str" and isinstance(value, str):
            return value
        if a.startswith("list") and isinstance(value, list):
            return value
        if a.startswith("dict") and isinstance(value, dict):
            return value
    if "float" in allowed and isinstance(value, str):  # YAML reads 2e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"{where} must be {annotation}, got {value!r} ({type(value).__name__})")


def suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"


def build_run_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """A RunConfig from a nested dict; unknown sections or keys are errors with a suggestion."""
    if not isinstance(raw, dict):
        raise ValueError(
            f"{source}: the top level must be a mapping with sections {sorted(SECTIONS)}"
        )
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise ValueError(f"{source}: unknown section {unknown[0]!r}{suggest(unknown[0], SECTIONS)}")
    built = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name)
        if values is None:  # absent, or a section written with no body (`lora:`)
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping, got {values!r}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        for key in values:
            if key not in fields:
                raise ValueError(f"{source}: unknown option {name}.{key}{suggest(key, fields)}")
        kwargs = {
            k: coerce(v, str(fields[k].type), f"{source}: {name}.{k}") for k, v in values.items()
        }
        if cls is LoraConfig:
            kwargs = {**RUN_LORA_DEFAULTS, **kwargs}
        try:
            built[name] = cls(**kwargs)
        except (ValueError, TypeError) as exc:  # TypeError: e.g. a list of the wrong elements
            raise ValueError(f"{source}: {name}: {exc}") from None
    cfg = RunConfig(**built)
    _validate_run(cfg, source)
    return cfg


def _validate_run(cfg: RunConfig, source: str) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    from lorafit.tasks import task_names  # here, not at import: the CLI's --help stays light

    tasks = task_names()
    no_validation = not d.validation and d.val_fraction == 0
    checks = [
        (m.task in tasks, f"model.task must be one of {', '.join(tasks)}; got {m.task!r}"),
        (
            t.schedule in SCHEDULES,
            f"train.schedule must be {one_of(SCHEDULES)}, got {t.schedule!r}",
        ),
        (
            t.method in METHODS,
            f"train.method must be {one_of(METHODS)}, got {t.method!r}",
        ),
        (
            m.name != "new" or t.method == "full",
            "model.name: new builds a fresh model, which trains in full: set train.method: full",
        ),
        (m.init is None or m.name == "new", "model.init only applies to model.name: new"),
        (
            m.quantize in ("none", *SCHEMES),
            f"model.quantize must be {one_of(('none', *SCHEMES))}, got {m.quantize!r}",
        ),
        (
            m.quantize == "none" or t.method == "lora",
            f"a {m.quantize}-quantized base cannot be fully fine-tuned (its weights are frozen "
            "by construction); use train.method: lora, or model.quantize: none",
        ),
        (
            t.precision in PRECISIONS,
            f"train.precision must be {one_of(PRECISIONS)}, got {t.precision!r}",
        ),
        (
            t.batch_size >= 1 and t.grad_accum >= 1,
            "train.batch_size and train.grad_accum must be >= 1",
        ),
        (
            t.distributed in ("ddp", "fsdp"),
            f"train.distributed must be 'ddp' or 'fsdp', got {t.distributed!r}",
        ),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}"),
        (t.epochs > 0 or (t.max_steps or 0) > 0, "set train.epochs > 0 or train.max_steps > 0"),
        (t.max_steps is None or t.max_steps > 0, "train.max_steps must be > 0"),
        (t.keep_last >= 1, "train.keep_last must be >= 1"),
        (d.max_length >= 8, f"data.max_length must be >= 8, got {d.max_length}"),
        (0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {d.val_fraction}"),
        (t.lora_plus_ratio is None or t.lora_plus_ratio > 0, "train.lora_plus_ratio must be > 0"),
        (t.loss_chunk >= 16, "train.loss_chunk must be >= 16"),
        (
            not (t.early_stopping_patience and no_validation),
            early_stopping_needs_validation(NO_VALIDATION_FILE),
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{source}: {message}")
    if t.relora is not None:
        try:
            relora_options(t.relora)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        blocker = relora_blocker(cfg)
        if blocker:
            raise ValueError(f"{source}: {blocker}")
    _validate_tune(cfg, source)


def _validate_tune(cfg: RunConfig, source: str) -> None:
    from lorafit.tasks import get_task

    u = cfg.tune
    metrics = get_task(cfg.model.task).metrics
    checks = [
        (
            u.metric in metrics,
            f"tune.metric {u.metric!r} is not a validation metric of task {cfg.model.task} "
            f"(it reports {one_of(metrics)})",
        ),
        (
            u.direction in TUNE_DIRECTIONS,
            f"tune.direction must be {one_of(TUNE_DIRECTIONS)}, got {u.direction!r}",
        ),
        (u.pruner in TUNE_PRUNERS, f"tune.pruner must be {one_of(TUNE_PRUNERS)}, got {u.pruner!r}"),
        (u.startup_trials >= 0, "tune.startup_trials must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{source}: {message}")


def relora_options(raw: dict[str, Any] | None) -> ReloraOptions | None:
    """train.relora as ReloraOptions (None: off); a ValueError names the bad key."""
    if raw is None:
        return None
    known = {f.name: f for f in dataclasses.fields(ReloraOptions)}
    for key in raw:
        if key not in known:
            raise ValueError(f"unknown option train.relora.{key}{suggest(key, known)}")
    if "every" not in raw:
        raise ValueError("train.relora needs every: K (optimizer steps between restarts)")
    values = {k: coerce(v, str(known[k].type), f"train.relora.{k}") for k, v in raw.items()}
    opts = ReloraOptions(**values)
    if opts.warmup_steps is None and isinstance(opts.every, int):
        opts = dataclasses.replace(opts, warmup_steps=max(1, opts.every // 10))
    checks = [
        (opts.every >= 2, f"train.relora.every must be >= 2, got {opts.every}"),
        (
            opts.reset in RELORA_RESETS,
            f"train.relora.reset must be {one_of(RELORA_RESETS)}, got {opts.reset!r}",
        ),
        (0 <= opts.prune_ratio < 1, "train.relora.prune_ratio must be in [0, 1)"),
        (
            0 <= opts.warmup_steps < opts.every,
            f"train.relora.warmup_steps must be in [0, every={opts.every}), "
            f"got {opts.warmup_steps}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return opts


def relora_blocker(cfg: RunConfig) -> str | None:
    """Why this run cannot use ReLoRA exactly (None: it can)."""
    m, t, lora = cfg.model, cfg.train, cfg.lora
    if t.method != "lora":
        return "train.relora needs train.method: lora (full fine-tuning has no adapter to restart)"
    if m.quantize != "none":
        return (
            f"train.relora cannot merge into a {m.quantize}-quantized base exactly (merging and "
            "re-quantizing at every restart is not implemented); use model.quantize: none"
        )
    if m.dtype in ("bfloat16", "float16"):
        return (
            f"train.relora merges every restart into the base, and a {m.dtype} base would round "
            "the updates away; use model.dtype: auto or float32 (autocast still computes in bf16)"
        )
    if lora.use_dora or lora.init_lora_weights not in (True, "gaussian"):
        what = "DoRA" if lora.use_dora else f"init_lora_weights {lora.init_lora_weights!r}"
        return f"train.relora works with plain LoRA; {what} is not supported with it"
    if lora.rank_pattern or lora.alpha_pattern:
        return "train.relora needs one rank and alpha for every layer (no rank/alpha_pattern)"
    if t.distributed == "fsdp":
        return "train.relora is not supported with train.distributed: fsdp (use ddp)"
    return None
