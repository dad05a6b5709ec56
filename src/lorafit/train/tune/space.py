"""`lorafit tune`'s search space: `tune.space` (or the method's default) as `Param`s, each bound
checked against the config before any trial runs, and a trial's values set into the raw config
(`lora.alpha_ratio` and `lora.targets` become `lora.lora_alpha` and `lora.target_modules`)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

from lorafit.models.loading import model_config
from lorafit.train.config import SECTIONS, RunConfig, build_run_config, field_docs, suggest

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
            return "{" + ", ".join(show(c) for c in self.choices) + "}"
        return f"[{show(self.low)}, {show(self.high)}]{' log' if self.log else ''}"

    def extremes(self) -> list[Any]:
        """The values that bound this parameter (checked against the config before searching)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def show(value: Any) -> str:
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
                raise ValueError(f"{where}: unknown option {key}{suggest(option, options)}")
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
                raise ValueError(f"tune.space.{p.key} = {show(value)}: {reason}") from None
