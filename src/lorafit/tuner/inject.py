"""Put LoRA layers into a model: find targets, wrap them, freeze everything else.

`inject(model, config, name)` checks every target before it changes anything, so a bad config
leaves the model exactly as it was. The model keeps its own class (no wrapper model): each
targeted submodule is replaced in place by a `LoraLayer` holding the original as `base_layer`.
The configs of the adapters on a model live in `model.lorafit_configs` (name -> LoraConfig).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass

from torch import nn

from lorafit.tuner.config import LoraConfig
from lorafit.tuner.layer import LoraLayer, TrainedCopy, layer_kind


@dataclass
class ParamReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def parameter_report(model: nn.Module) -> ParamReport:
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParamReport(trainable, total)


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    return model.__dict__.setdefault("lorafit_configs", {})


def plain_modules(model: nn.Module):
    """(path, module) for the model's own modules, looking through lorafit wrappers."""
    for path, module in model.named_modules():
        if ".base_layer" in f".{path}" or ".adapters" in f".{path}" or ".copies" in f".{path}":
            continue
        if ".original_module" in f".{path}":
            continue
        yield path, module


def _output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head ("all-linear" leaves it alone, as PEFT does)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    head = head.base_layer if isinstance(head, LoraLayer) else head
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
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for rx in regexes:
        m = re.match(rx, path)
        if m:
            return int(m.group("idx")) in config.layers_to_transform
    return False


def _is_saved_module(path: str, config: LoraConfig) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in (config.modules_to_save or []))


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The modules `config` selects, or an error that names the problem and the close names."""
    heads = _output_head_names(model)
    found, wrong_type = [], []
    for path, module in plain_modules(model):
        if not path or _is_saved_module(path, config):
            continue
        if config.exclude_modules and _matches_names(path, config.exclude_modules):
            continue
        if config.target_modules == "all-linear":
            base = module.base_layer if isinstance(module, LoraLayer) else module
            hit = layer_kind(base) in ("linear", "conv1d_gpt2") and path not in heads
        elif config.target_modules is None:
            hit = False
        else:
            hit = _matches_names(path, config.target_modules)
        if not hit or not _layer_index_ok(path, config):
            continue
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if layer_kind(base) is None:
            wrong_type.append(f"{path} ({type(base).__name__})")
        else:
            found.append((path, module))
    if wrong_type:
        raise ValueError(
            f"target_modules selects modules lorafit cannot wrap: {', '.join(wrong_type[:5])}. "
            "Supported: nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d; "
            "name the linear layers inside them instead (e.g. 'q_proj')."
        )
    if not found and config.target_modules is not None:
        leaf_names = sorted({p.rsplit(".", 1)[-1] for p, m in plain_modules(model) if layer_kind(m)})
        wanted = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
        close = sorted({c for w in wanted for c in difflib.get_close_matches(w, leaf_names, n=3, cutoff=0.5)})
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module of {type(model).__name__}"
            + (f" (with layers_to_transform={config.layers_to_transform})" if config.layers_to_transform else "")
            + f". Close names: {close or 'none'}. Wrappable layer names in this model: {leaf_names[:20]}."
        )
    return found


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
           activate: bool = True, trainable: bool = True) -> ParamReport:
    """Add adapter `adapter_name` to `model` in place; returns the trainable-parameter report."""
    configs = adapter_configs(model)
    if not adapter_name or not isinstance(adapter_name, str) or "." in adapter_name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {adapter_name!r}")
    if adapter_name in configs:
        raise ValueError(f"model already has an adapter named {adapter_name!r}; delete it or pick another name")
    if adapter_name == "__base__":
        raise ValueError("'__base__' is reserved for 'no adapter' in per-sample batches")
    targets = find_targets(model, config)
    gpt2_style = any(layer_kind(m.base_layer if isinstance(m, LoraLayer) else m) == "conv1d_gpt2" for _, m in targets)
    if gpt2_style != config.fan_in_fan_out and targets:  # written to the file for PEFT; we go by module type
        config = dataclasses.replace(config, fan_in_fan_out=gpt2_style)
    saved = []
    for m in config.modules_to_save or []:
        hits = [(p, mod) for p, mod in plain_modules(model) if p == m or p.endswith("." + m)]
        if not hits and m not in ("classifier", "score"):  # PEFT adds these two for SEQ_CLS blindly
            raise ValueError(f"modules_to_save entry {m!r} matches no module of {type(model).__name__}")
        saved += hits
    # Everything is checked; from here on we change the model.
    for path, module in targets:
        layer = module if isinstance(module, LoraLayer) else LoraLayer(module)
        layer.add_adapter(adapter_name, config.rank_for(path), config.alpha_for(path), config.lora_dropout,
                          config.use_rslora, config.use_dora, config.init_lora_weights)
        if layer is not module:
            set_submodule(model, path, layer)
    for path, module in saved:
        holder = module if isinstance(module, TrainedCopy) else TrainedCopy(module)
        holder.add_copy(adapter_name)
        if holder is not module:
            set_submodule(model, path, holder)
    configs[adapter_name] = config
    if activate:
        from lorafit.tuner.state import set_active  # adapters.py builds on this module
        set_active(model, adapter_name)
    if trainable:
        mark_trainable(model, adapter_name)
    return parameter_report(model)


def mark_trainable(model: nn.Module, adapter_name: str) -> None:
    """Freeze everything, then unfreeze adapter `adapter_name` (and biases its config asks for)."""
    config = adapter_configs(model)[adapter_name]
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.adapters:
            for p in module.adapters[adapter_name].parameters():
                p.requires_grad_(True)
            if config.bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                module.base_layer.bias.requires_grad_(True)
        if isinstance(module, TrainedCopy) and adapter_name in module.copies:
            for p in module.copies[adapter_name].parameters():
                p.requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".original_module." not in name:
                p.requires_grad_(True)


def unwrap(model: nn.Module, only_empty: bool = False) -> nn.Module:
    """Replace lorafit wrappers by their base modules (no merge): all, or those with no adapter left."""
    for path, module in list(plain_modules(model)):
        if isinstance(module, LoraLayer) and not (only_empty and module.adapters):
            set_submodule(model, path, module.base_layer)
        elif isinstance(module, TrainedCopy) and not (only_empty and module.copies):
            set_submodule(model, path, module.original_module)
    if not only_empty:
        adapter_configs(model).clear()
    return model
