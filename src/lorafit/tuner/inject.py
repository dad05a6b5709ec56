"""Put LoRA layers into a model: find targets, wrap them, freeze everything else.

`inject(model, config, name)` checks every target before it changes anything, so a bad config
leaves the model exactly as it was. The model keeps its own class (no wrapper model): each
targeted submodule is replaced in place by a `LoraLayer` holding the original as `base_layer`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from dataclasses import dataclass

from torch import nn

from lorafit.quant import quantized_modules
from lorafit.tuner.config import PEFT_SEQ_CLS_HEADS, LoraConfig, layers_regex
from lorafit.tuner.kinds import kind_of, registered_kinds
from lorafit.tuner.layer import LoraLayer
from lorafit.tuner.state import (
    adapter_configs,
    check_new_adapter_name,
    mark_trainable,
    plain_modules,
    set_active,
    set_submodule,
)
from lorafit.tuner.trained_copy import TrainedCopy
from lorafit.tuner.variants import variants_for


@dataclass
class ParamReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}"
        )


def parameter_report(model: nn.Module) -> ParamReport:
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    # Quantized weights are buffers, not parameters; they are still the model's weights.
    total += sum(m.in_features * m.out_features for _, m in quantized_modules(model))
    return ParamReport(trainable, total)


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head ("all-linear" leaves it alone, as PEFT does)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    head = _base(head)
    return {p.removesuffix(".base_layer") for p, m in model.named_modules() if m is head}


def _matches_names(path: str, names) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith("." + n) for n in names)


def _layer_index_ok(path: str, config: LoraConfig) -> bool:
    if not config.layers_to_transform:
        return True
    patterns = config.layers_pattern
    patterns = [patterns] if isinstance(patterns, str) else (patterns or [])
    regexes = [layers_regex(p) for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for rx in regexes:
        m = re.match(rx, path)
        if m:
            return int(m.group("idx")) in config.layers_to_transform
    return False


def _is_saved_module(path: str, config: LoraConfig) -> bool:
    saved = config.modules_to_save or []
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in saved)


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The modules `config` selects, or an error that names the problem and the close names."""
    heads = output_head_names(model)
    found, wrong_type = [], []
    for path, module in plain_modules(model):
        if not path or _is_saved_module(path, config):
            continue
        if config.exclude_modules and _matches_names(path, config.exclude_modules):
            continue
        base = _base(module)
        if config.target_modules == "all-linear":
            kind = kind_of(base)
            hit = kind is not None and kind.all_linear and path not in heads
        elif config.target_modules is None:
            hit = False
        else:
            hit = _matches_names(path, config.target_modules)
        if not hit or not _layer_index_ok(path, config):
            continue
        if kind_of(base) is None:
            wrong_type.append(f"{path} ({type(base).__name__})")
        else:
            found.append((path, module))
    if wrong_type:
        supported = ", ".join(k.label for k in registered_kinds())
        raise ValueError(
            f"target_modules selects modules lorafit cannot wrap: {', '.join(wrong_type[:5])}. "
            f"Supported: {supported}; name the linear layers inside them instead (e.g. 'q_proj')."
        )
    if not found and config.target_modules is not None:
        leaf_names = sorted(
            {p.rsplit(".", 1)[-1] for p, m in plain_modules(model) if kind_of(m) is not None}
        )
        wanted = config.target_modules
        wanted = [wanted] if isinstance(wanted, str) else wanted
        close = sorted(
            {c for w in wanted for c in difflib.get_close_matches(w, leaf_names, n=3, cutoff=0.5)}
        )
        layers = config.layers_to_transform
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module of {type(model).__name__}"
            + (f" (with layers_to_transform={layers})" if layers else "")
            + f". Close names: {close or 'none'}. Wrappable layer names in this model: "
            f"{leaf_names[:20]}."
        )
    return found


def _warn_rank_above_dims(targets: list[tuple[str, nn.Module]], config: LoraConfig) -> None:
    """B A (d_out x r)(r x d_in) cannot have rank above min(d_in, d_out): a larger r only adds
    parameters that cannot help. PEFT accepts it silently; one warning lists every such module."""
    over = []
    for path, module in targets:
        base = _base(module)
        kind, r = kind_of(base), config.rank_for(path)
        if r > kind.max_rank(base):
            d_in, d_out = kind.fan_dims(base)
            over.append(f"{path} (r={r}, d_in={d_in}, d_out={d_out})")
    if over:
        warnings.warn(
            f"LoRA rank above min(d_in, d_out) for {len(over)} module(s): {', '.join(over)}. "
            "The update B A cannot have rank above min(d_in, d_out), so the extra rank only adds "
            "parameters; lower r (or set rank_pattern) for these modules.",
            UserWarning,
            stacklevel=3,
        )


def inject(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    activate: bool = True,
    trainable: bool = True,
) -> ParamReport:
    """Add adapter `adapter_name` to `model` in place; returns the trainable-parameter report."""
    check_new_adapter_name(model, adapter_name)
    targets = find_targets(model, config)
    variants = variants_for(vars(config))
    for _, module in targets:
        base = _base(module)
        kind = kind_of(base)
        kind.check(base)
        for variant in variants:
            variant.check(kind, base)
    _warn_rank_above_dims(targets, config)
    # Written to the file for PEFT; lorafit itself goes by each module's kind.
    gpt2_style = any(kind_of(_base(m)).fan_in_fan_out for _, m in targets)
    if targets and gpt2_style != config.fan_in_fan_out:
        config = dataclasses.replace(config, fan_in_fan_out=gpt2_style)
    saved = []
    for m in config.modules_to_save or []:
        hits = [(p, mod) for p, mod in plain_modules(model) if p == m or p.endswith("." + m)]
        if not hits and m not in PEFT_SEQ_CLS_HEADS:
            raise ValueError(
                f"modules_to_save entry {m!r} matches no module of {type(model).__name__}"
            )
        saved += hits
    # Everything is checked; from here on we change the model.
    for path, module in targets:
        layer = module if isinstance(module, LoraLayer) else LoraLayer(module)
        layer.add_adapter(
            adapter_name,
            config.rank_for(path),
            config.alpha_for(path),
            config.lora_dropout,
            config.use_rslora,
            init=config.init_lora_weights,
            variants=variants,
        )
        if layer is not module:
            set_submodule(model, path, layer)
    for path, module in saved:
        holder = module if isinstance(module, TrainedCopy) else TrainedCopy(module)
        holder.add_copy(adapter_name)
        if holder is not module:
            set_submodule(model, path, holder)
    adapter_configs(model)[adapter_name] = config
    if activate:
        set_active(model, adapter_name)
    if trainable:
        mark_trainable(model, adapter_name)
    return parameter_report(model)
