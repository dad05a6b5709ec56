"""Adapter configuration: the fields of a PEFT `adapter_config.json`, validated.

`LoraConfig` is what `inject()` consumes and what `peft_format.save_adapter()` writes. Its field
names and meanings are PEFT's (0.21), so a config written here loads in PEFT and one written by
PEFT loads here. PEFT fields for features lorafit does not implement are accepted only at their
"off" value; anything else is refused with a message, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any

# PEFT config fields lorafit does not implement, with the value(s) that mean "feature off".
_UNSUPPORTED_OFF: dict[str, tuple] = {
    "megatron_config": (None,),
    "trainable_token_indices": (None,),
    "loftq_config": ({}, None),
    "eva_config": (None,),
    "corda_config": (None,),
    "lora_ga_config": (None,),
    "velora_config": (None,),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False,),
    "monteclora_config": (None,),
    "layer_replication": (None,),
    "lora_bias": (False,),
    "target_parameters": (None, []),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "kasa_config": (None,),
}
# PEFT fields that carry no meaning for the adapter's maths; accepted and passed through.
_PASSTHROUGH = {
    "auto_mapping": None,
    "peft_version": None,
    "megatron_core": "megatron.core",
    "qalora_group_size": 16,
    "runtime_config": None,
    "ensure_weight_tying": False,
}
INIT_CHOICES = (True, False, "gaussian", "pissa")
BIAS_CHOICES = ("none", "all", "lora_only")
PEFT_SEQ_CLS_HEADS = ("classifier", "score")
"""The names transformers gives the head of a *ForSequenceClassification model. PEFT adds both
to modules_to_save of every SEQ_CLS adapter, whatever the model calls its head, so a
modules_to_save entry with one of these names that matches no module is not an error."""


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """The factor of the update B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def pattern_regex(key: str) -> str:
    """The regex a rank_pattern / alpha_pattern key stands for (PEFT's rule): the key matches a
    dot-aligned end of the module path."""
    return rf"(.*\.)?({key})$"


def layers_regex(layers_pattern: str) -> str:
    """The regex that finds the layer index after a layers_pattern entry (e.g. "layers")."""
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def _check_regex(field_name: str, regex: str, shown: str | None = None) -> None:
    try:
        re.compile(regex)
    except re.error as exc:
        raise ValueError(
            f"{field_name}: {shown if shown is not None else regex!r} is not a valid regular "
            f"expression ({exc})"
        ) from None


def _check_names(field_name: str, value: Any, regex_allowed: bool) -> Any:
    """A list of non-empty strings (a tuple or set becomes a list), or with `regex_allowed` one
    string, compiled here so a bad regex fails when the config is made, not when it is used."""
    if isinstance(value, str):
        if not regex_allowed:
            raise ValueError(f"{field_name} must be a list of module names, got {value!r}")
        if not value:
            raise ValueError(f"{field_name} must not be an empty string")
        _check_regex(field_name, value)
        return value
    if not isinstance(value, (list, tuple, set, frozenset)):
        what = "a list of non-empty strings" + (" or a regex string" if regex_allowed else "")
        raise ValueError(f"{field_name} must be {what}, got {value!r}")
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(
            f"{field_name} must hold only non-empty strings (module names), got {bad[0]!r}"
        )
    return sorted(value) if isinstance(value, (set, frozenset)) else list(value)


@dataclass
class LoraConfig:
    """One adapter's hyper-parameters, in PEFT's `LoraConfig` vocabulary."""

    r: int = 8
    """Rank of the update B A."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or / sqrt(r) with rsLoRA)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input (not applied to Embedding targets, as in PEFT)."""
    target_modules: list[str] | str | None = None
    """Module-name suffixes, a regex (full match on the module path), or "all-linear" (saved as
    the resolved list of modules, as PEFT does)."""
    exclude_modules: list[str] | str | None = None
    """Names (suffixes) or a regex of modules never to wrap, even if targeted."""
    fan_in_fan_out: bool = False
    """True when the base weight is stored (in, out), as in GPT-2's Conv1D (set automatically)."""
    bias: str = "none"
    """Which biases train: "none", "all" (every bias in the model) or "lora_only" (wrapped
    modules)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a classification head)."""
    init_lora_weights: bool | str = True
    """True: A Kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r); "pissa" (or "pissa_niter_N"):
    top-r SVD of W0; False: random B."""
    layers_to_transform: list[int] | int | None = None
    """Only wrap modules inside these layer indices."""
    layers_pattern: list[str] | str | None = None
    """Name of the layer list ("layers", "h") used with layers_to_transform."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: {regex matched against the module path's end: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha, like rank_pattern."""
    use_dora: bool = False
    """Weight-decomposed LoRA: a trained per-output magnitude vector."""
    base_model_name_or_path: str | None = None
    """Identifier of the base model the adapter was trained on."""
    revision: str | None = None
    """Base model revision, kept for PEFT compatibility."""
    task_type: str | None = None
    """PEFT task type (e.g. CAUSAL_LM, SEQ_CLS); informational."""
    inference_mode: bool = False
    """PEFT's flag for adapters loaded for inference only."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Pass-through PEFT fields (auto_mapping, ...), written back unchanged (peft_version is
    always written as the PEFT release whose format lorafit writes)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}.")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}.")
        init = self.init_lora_weights
        if init not in INIT_CHOICES and not (
            isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init)
        ):
            raise ValueError(
                f"init_lora_weights={init!r} is not supported; "
                "use one of True, False, 'gaussian', 'pissa'."
            )
        for name, pattern in (
            ("rank_pattern", self.rank_pattern),
            ("alpha_pattern", self.alpha_pattern),
        ):
            if not isinstance(pattern, dict):
                raise ValueError(f"{name} must be a mapping {{regex: value}}, got {pattern!r}")
            for key, value in pattern.items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"{name} keys must be non-empty regex strings, got {key!r}")
                _check_regex(f"{name} key", pattern_regex(key), shown=repr(key))
                if not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"{name}[{key!r}] must be a positive number, got {value!r}.")
                if name == "rank_pattern" and not isinstance(value, int):
                    raise ValueError(
                        f"rank_pattern[{key!r}] must be an integer rank, got {value!r}."
                    )
        if self.target_modules is None and not self.modules_to_save:
            raise ValueError(
                "target_modules is not set: give module-name suffixes (e.g. ['q_proj', 'v_proj']), "
                "a regex, or 'all-linear'."
            )
        if self.target_modules is not None:
            self.target_modules = _check_names("target_modules", self.target_modules, True)
            if isinstance(self.target_modules, list):
                self.target_modules = sorted(set(self.target_modules))
        if self.exclude_modules is not None:
            self.exclude_modules = _check_names("exclude_modules", self.exclude_modules, True)
        if self.modules_to_save is not None:
            self.modules_to_save = _check_names("modules_to_save", self.modules_to_save, False)
        if self.layers_pattern is not None:
            patterns = _check_names("layers_pattern", self.layers_pattern, True)
            for p in [patterns] if isinstance(patterns, str) else patterns:
                _check_regex("layers_pattern", layers_regex(p), shown=repr(p))
            self.layers_pattern = patterns
        if isinstance(self.layers_to_transform, int) and not isinstance(
            self.layers_to_transform, bool
        ):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            if not isinstance(layers, (list, tuple)) or any(
                not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers
            ):
                raise ValueError(
                    f"layers_to_transform must be a layer index or a list of them, got {layers!r}"
                )
            self.layers_to_transform = list(layers)

    # --- per-module values -------------------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_path, self.r))

    def alpha_for(self, module_path: str) -> float:
        return _pattern_value(self.alpha_pattern, module_path, self.lora_alpha)

    # --- PEFT json -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT 0.21 writes as adapter_config.json (every field present)."""
        out: dict[str, Any] = {k: v for k, v in _PASSTHROUGH.items() if k != "runtime_config"}
        out.update({k: vals[0] for k, vals in _UNSUPPORTED_OFF.items()})
        out.update(
            {k: v for k, v in self.extra.items() if k != "runtime_config"}
        )  # PEFT never writes it
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["peft_type"] = "LORA"
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> "LoraConfig":
        """Build from a PEFT-style dict; unknown fields and unsupported features are errors."""
        data = dict(data)
        peft_type = data.pop("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(
                f"{source}: peft_type is {peft_type!r}; lorafit reads only LoRA adapters (LORA)."
            )
        own = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = own | set(_UNSUPPORTED_OFF) | set(_PASSTHROUGH)
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, sorted(known), n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"{source}: unknown field(s) {', '.join(hints)}.")
        for key, off_values in _UNSUPPORTED_OFF.items():
            if key in data and data[key] not in off_values:
                raise ValueError(
                    f"{source}: {key}={data[key]!r} asks for a PEFT feature lorafit does not "
                    "implement; "
                    f"remove it or set it to {off_values[0]!r}."
                )
        extra = {k: data[k] for k in _PASSTHROUGH if k in data}
        kwargs = {k: v for k, v in data.items() if k in own}
        kwargs["rank_pattern"] = dict(kwargs.get("rank_pattern") or {})
        kwargs["alpha_pattern"] = dict(kwargs.get("alpha_pattern") or {})
        try:
            return cls(**kwargs, extra=extra)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    # PEFT's rule: a pattern key matches when it matches a dot-aligned end of the module path.
    for key, value in patterns.items():
        if re.match(pattern_regex(key), module_path):
            return value
    return default
