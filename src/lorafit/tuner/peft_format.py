"""Adapter folders in PEFT's layout: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's (`base_model.model.<module path>.lora_A.weight`, `.lora_embedding_A`,
`.lora_magnitude_vector`, `<modules_to_save path>.<param>`, biases), so an adapter written here
loads in PEFT and one written by PEFT loads here. Only safetensors is ever read: no unpickling.
Loading checks everything (files, config, module names, shapes) before the model is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorafit.atomic import write_files
from lorafit.tuner.config import LoraConfig, lora_scale
from lorafit.tuner.inject import inject
from lorafit.tuner.kinds import kind_of, registered_kinds
from lorafit.tuner.layer import LoraLayer
from lorafit.tuner.state import (
    adapter_configs,
    check_new_adapter_name,
    lora_layers,
    mark_trainable,
    plain_modules,
    set_active,
)
from lorafit.tuner.trained_copy import TrainedCopy
from lorafit.tuner.variants import registered_variants, update_variant, variants_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BASE_FILE = "lorafit_base.json"  # the base's identity: local folder, source file, sha256, hub id
PREFIX = "base_model.model."
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
"""Suffixes of weight files that only unpickling reads (torch.save); lorafit never loads them."""
PEFT_FORMAT_VERSION = "0.21.2"
"""The PEFT release whose adapter format this module writes (its `peft_version` field)."""
_CONDENSE_AT = 20  # PEFT shortens a target list this long to the fewest distinguishing suffixes


class AdapterFileError(ValueError):
    """An adapter folder that cannot be used with this model; nothing was changed."""


def _suffixes() -> dict[str, str]:
    """PEFT key suffix -> role ("A", "B", or a variant's extra tensor) over every registered kind
    and variant."""
    out = {}
    for kind in registered_kinds():
        out[f".{kind.peft_keys[0]}"], out[f".{kind.peft_keys[1]}"] = "A", "B"
    for variant in registered_variants():
        out.update({f".{suffix}": role for role, suffix in variant.file_keys.items()})
    return out


# --- writing --------------------------------------------------------------------------------------
def adapter_state_dict(
    model: nn.Module, name: str = "default"
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """(PEFT-keyed tensors, config as it must be written) for adapter `name`."""
    if name not in adapter_configs(model):
        raise KeyError(f"no adapter named {name!r}; this model has {list(adapter_configs(model))}")
    config = adapter_configs(model)[name]
    tensors: dict[str, torch.Tensor] = {}
    extra_keys = {role: sfx for v in registered_variants() for role, sfx in v.file_keys.items()}
    for path, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        ad = layer.adapters[name]
        parts = {"A": ad.A.detach(), "B": ad.B.detach()}
        for variant in ad.variants:
            parts = variant.to_file(layer, ad, parts)
        key_a, key_b = layer.kind.peft_keys
        tensors[f"{PREFIX}{path}.{key_a}"] = parts.pop("A")
        tensors[f"{PREFIX}{path}.{key_b}"] = parts.pop("B")
        for role, value in parts.items():
            tensors[f"{PREFIX}{path}.{extra_keys[role]}"] = value
    for path, module in plain_modules(model):
        if isinstance(module, TrainedCopy) and name in module.copies:
            for key, value in module.copies[name].state_dict().items():
                tensors[f"{PREFIX}{path}.{key}"] = value
    if config.bias != "none":
        for key, p in model.named_parameters():
            if not key.endswith("bias") or ".original_module." in key or ".copies." in key:
                continue
            if config.bias == "all" or ".base_layer." in key:
                tensors[PREFIX + key] = p.detach()
    for variant in variants_for(vars(config)):
        config = variant.file_config(config)
    if config.target_modules == "all-linear":
        paths = [p for p, layer in lora_layers(model) if name in layer.adapters]
        config = dataclasses.replace(config, target_modules=resolved_targets(model, paths))
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, config


def resolved_targets(model: nn.Module, paths: list[str]) -> list[str]:
    """target_modules as PEFT writes them once "all-linear" is resolved: the module paths, or,
    for 20 or more, the fewest dot-suffixes that match them and no other module of the model.

    PEFT keeps, per target, its shortest suffix that no other module's path ends with; a target
    already ending in a kept suffix adds nothing (the result does not depend on the order). The
    paths are the modules actually wrapped: PEFT lists every linear layer before it applies
    exclude_modules, which loads the same since exclude_modules is written too."""
    paths = sorted(set(paths))
    if len(paths) < _CONDENSE_AT:
        return paths
    targets = set(paths)
    taken: set[str] = set()  # every dot-suffix of every module that is not a target
    for path, _ in plain_modules(model):
        if path not in targets:
            parts = path.split(".")
            taken.update(".".join(parts[i:]) for i in range(len(parts)))
    kept: set[str] = set()
    for path in paths:
        parts = path.split(".")
        suffixes = [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]  # shortest first
        if any(path == k or path.endswith("." + k) for k in kept):
            continue
        kept.add(next((s for s in suffixes if s not in taken), path))
    return sorted(kept) if len(kept) < len(paths) else paths


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    name: str = "default",
    edit: Callable[[dict[str, torch.Tensor], LoraConfig], tuple[dict, LoraConfig]] | None = None,
) -> Path:
    """Write adapter `name` to `folder` (created if needed; other files in it are left alone).

    The weights, lorafit_base.json and adapter_config.json are first written complete under
    temporary names, then renamed into place in that order, the config last, so whoever finds
    the new config finds the new weights beside it. If anything fails, the folder is as before:
    a failed rename puts the previous files back. A model without `lorafit_base` removes a
    lorafit_base.json left by an earlier adapter (it would name the wrong base). `edit` may
    rewrite the PEFT-keyed tensors and config before they are written (ReLoRA's sum of updates)."""
    tensors, config = adapter_state_dict(model, name)
    if edit is not None:
        tensors, config = edit(tensors, config)
    folder = Path(folder)
    data = config.to_dict()
    data["peft_version"] = PEFT_FORMAT_VERSION  # the format written is this PEFT release's
    if data.get("base_model_name_or_path") is None:
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        data["base_model_name_or_path"] = name_or_path or None
    if data.get("auto_mapping") is None and hasattr(model, "config"):
        data["auto_mapping"] = {
            "base_model_class": type(model).__name__,
            "parent_library": type(model).__module__,
        }
    base = model.__dict__.get("lorafit_base")  # set by lorafit.models.load_model
    metadata = {"format": "pt"}
    writers = {WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata=metadata)}
    if base:  # beside PEFT's files (PEFT warns on unknown config keys): which base, exactly
        text = json.dumps(base, indent=2, sort_keys=True) + "\n"
        writers[BASE_FILE] = lambda p: p.write_text(text, encoding="utf-8")
    config_text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    writers[CONFIG_NAME] = lambda p: p.write_text(config_text, encoding="utf-8")
    write_files(folder, writers, remove=[] if base else [BASE_FILE])
    return folder


# --- reading --------------------------------------------------------------------------------------
def read_adapter(folder: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter folder without touching any model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterFileError(
            f"adapter folder {folder} does not exist (expected {CONFIG_NAME} + {WEIGHTS_NAME})"
        )
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES]
        if pickled:
            raise AdapterFileError(
                f"{folder} holds only pickled weights ({', '.join(pickled)}); lorafit never "
                "unpickles files. Convert it once in a trusted environment: "
                "`from safetensors.torch import save_file; "
                f"save_file(torch.load('{pickled[0]}', weights_only=True), '{WEIGHTS_NAME}')`."
            )
        raise AdapterFileError(f"{folder} has no {WEIGHTS_NAME}")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFileError(f"{folder} has no {CONFIG_NAME}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{cfg_path} must hold a JSON object")
    try:
        config = LoraConfig.from_dict(raw, source=str(cfg_path))
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(str(exc)) from None
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(
            f"{weights} is not a readable safetensors file ({exc}); re-save or re-download it"
        ) from None
    return config, tensors


def _group(tensors: dict[str, torch.Tensor], source: Path) -> tuple[dict, dict]:
    """Split PEFT keys into {module path: {role: tensor}} (A, B, variant roles) and {param path:
    tensor} (everything else)."""
    lora, other = {}, {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(
                f"{source}: key {key!r} does not start with {PREFIX!r}; not a PEFT LoRA file"
            )
        key = key[len(PREFIX) :]
        for suffix, role in _suffixes().items():
            if key.endswith(suffix):
                lora.setdefault(key[: -len(suffix)], {})[role] = value
                break
        else:
            other[key] = value
    return lora, other


def _check_lora_parts(folder, path, module, parts, config, model, hint) -> None:
    """One module's A, B (and variant tensors) against the model and the config."""
    if module is None:
        raise AdapterFileError(
            f"{folder}: module {path!r} does not exist in {type(model).__name__}; "
            f"this adapter is for another base model.{hint}"
        )
    base = module.base_layer if isinstance(module, LoraLayer) else module
    kind = kind_of(base)
    if kind is None:
        raise AdapterFileError(
            f"{folder}: {path!r} is a {type(base).__name__}, which LoRA cannot wrap.{hint}"
        )
    if "A" not in parts or "B" not in parts:
        raise AdapterFileError(
            f"{folder}: {path!r} has only {sorted(parts)}; both lora_A and lora_B are needed"
        )
    fan_in, fan_out = kind.fan_dims(base)
    r = parts["A"].shape[0]
    want = dict(zip(("A", "B"), kind.adapter_shapes(base, r)))
    for role in ("A", "B"):
        if tuple(parts[role].shape) != want[role]:
            raise AdapterFileError(
                f"{folder}: {path}.lora_{role} has shape {tuple(parts[role].shape)} but the "
                f"model's {type(base).__name__} ({fan_in} -> {fan_out}) needs {want[role]}.{hint}"
            )
    if r != config.rank_for(path):
        raise AdapterFileError(
            f"{folder}: {path} has rank {r} but the config says {config.rank_for(path)}"
        )
    for variant in registered_variants():
        problem = variant.check_file(kind, base, parts, config)
        if problem:
            raise AdapterFileError(f"{folder}: {path}: {problem}.{hint}")


def _place_other_tensors(folder, other, lora, modules, config, model, hint):
    """Where each non-LoRA tensor goes: ([(bias parameter, value)], {saved module: state dict}).
    Raises AdapterFileError for anything that fits nowhere."""
    params = {k.replace(".base_layer.", "."): p for k, p in model.named_parameters()}
    biases: list[tuple[nn.Parameter, torch.Tensor]] = []
    copies: dict[str, dict[str, torch.Tensor]] = {}
    saved = config.modules_to_save or []
    for key, value in other.items():
        if ".original_module." in key:
            continue  # PEFT with bias="all" also writes the frozen original's bias; never needed
        owner_path = key.removesuffix(".base_layer.weight")
        if owner_path != key and owner_path in lora:
            # PEFT saves the base embedding next to an embedding adapter (for resized vocabularies).
            current = modules[owner_path]
            current = current.base_layer if isinstance(current, LoraLayer) else current
            w = current.weight.detach()
            if w.shape != value.shape or not torch.allclose(w.float(), value.float(), atol=1e-6):
                raise AdapterFileError(
                    f"{folder}: the adapter carries its own base weight for {key!r} (a resized or "
                    "retrained embedding) that differs from this model's; load the model it was "
                    f"trained with.{hint}"
                )
            continue
        key = key.replace(".modules_to_save.", ".")
        owner = next(
            (
                p
                for p in modules
                if any(p == m or p.endswith("." + m) for m in saved) and key.startswith(p + ".")
            ),
            None,
        )
        target = params.get(key.replace(".base_layer.", "."))
        if owner is not None:
            copies.setdefault(owner, {})[key[len(owner) + 1 :]] = value
        elif key.endswith("bias") and target is not None and target.shape == value.shape:
            biases.append((target, value))  # applied once everything fits
        else:
            raise AdapterFileError(
                f"{folder}: tensor {key!r} matches nothing in {type(model).__name__}.{hint}"
            )
    for owner, state in copies.items():
        module = modules[owner]
        template = module.original_module if isinstance(module, TrainedCopy) else module
        expected = template.state_dict()
        if set(state) != set(expected) or any(
            expected[k].shape != v.shape for k, v in state.items()
        ):
            raise AdapterFileError(
                f"{folder}: saved module {owner!r} does not fit: file has "
                f"{ {k: tuple(v.shape) for k, v in state.items()} }, model has "
                f"{ {k: tuple(v.shape) for k, v in expected.items()} }.{hint}"
            )
    return biases, copies


def load_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    name: str = "default",
    trainable: bool = False,
    activate: bool = True,
) -> LoraConfig:
    """Add the adapter in `folder` to `model` as `name`. On any error the model is unchanged."""
    check_new_adapter_name(model, name)
    folder = Path(folder)
    config, tensors = read_adapter(folder)
    lora, other = _group(tensors, folder / WEIGHTS_NAME)
    modules = dict(plain_modules(model))
    hint = (
        f" The adapter was trained on {config.base_model_name_or_path!r}."
        if config.base_model_name_or_path
        else ""
    )
    for path, parts in lora.items():
        _check_lora_parts(folder, path, modules.get(path), parts, config, model, hint)
    biases, copies = _place_other_tensors(folder, other, lora, modules, config, model, hint)

    # Everything fits: change the model.
    load_config = dataclasses.replace(
        config,
        target_modules=sorted(lora) or None,
        layers_to_transform=None,
        layers_pattern=None,
        init_lora_weights=True,
    )
    inject(model, load_config, name, activate=False, trainable=False)
    adapter_configs(model)[name] = config
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if path in lora and name in layer.adapters:
                ad = layer.adapters[name]
                ad.A.copy_(lora[path]["A"])
                ad.B.copy_(lora[path]["B"])
                for variant in ad.variants:
                    variant.from_file(ad, lora[path])
        for path, module in plain_modules(model):
            if isinstance(module, TrainedCopy) and path in copies:
                module.copies[name].load_state_dict(copies[path])
        for param, value in biases:
            param.copy_(value)
    if trainable:
        mark_trainable(model, name)
    else:  # loaded for inference, as PEFT does: nothing trains
        model.requires_grad_(False)
    if activate:
        set_active(model, name)
    return config


def describe_adapter(folder: str | os.PathLike) -> dict:
    """What an adapter is: base model, targets, ranks, parameters, size (for `lorafit inspect`)."""
    config, tensors = read_adapter(folder)
    lora, other = _group(tensors, Path(folder) / WEIGHTS_NAME)
    ranks = {path: int(parts["A"].shape[0]) for path, parts in lora.items() if "A" in parts}
    variant = ("rs" if config.use_rslora else "") + update_variant(variants_for(vars(config))).label
    scale = lora_scale(config.lora_alpha, config.r, config.use_rslora)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return {
        "base_model": config.base_model_name_or_path,
        "task_type": config.task_type,
        "variant": variant,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "scale": scale,
        "modules": sorted(lora),
        "target_names": sorted({p.rsplit(".", 1)[-1] for p in lora}),
        "ranks": ranks,
        "modules_to_save": config.modules_to_save or [],
        "parameters": sum(t.numel() for t in tensors.values()),
        "dtype": ", ".join(dtypes),
        "bytes": (Path(folder) / WEIGHTS_NAME).stat().st_size,
        "other_tensors": sorted(other),
    }
