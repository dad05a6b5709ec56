"""Adapter folders in PEFT's layout: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's (`base_model.model.<module path>.lora_A.weight`, `.lora_embedding_A`,
`.lora_magnitude_vector`, `<modules_to_save path>.<param>`, biases), so an adapter written here
loads in PEFT and one written by PEFT loads here. Only safetensors is ever read: no unpickling.
Loading checks everything (files, config, module names, shapes) before the model is touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorafit.tuner.state import lora_layers, set_active
from lorafit.tuner.config import LoraConfig
from lorafit.tuner.inject import adapter_configs, inject, mark_trainable, plain_modules
from lorafit.tuner.layer import LoraLayer, TrainedCopy, fan_dims, layer_kind

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A",
                  ".lora_embedding_B": "B", ".lora_magnitude_vector": "magnitude"}


class AdapterFileError(ValueError):
    """An adapter folder that cannot be used with this model; nothing was changed."""


# --- writing ---------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str = "default") -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """(PEFT-keyed tensors, config as it must be written) for adapter `name`."""
    if name not in adapter_configs(model):
        raise KeyError(f"no adapter named {name!r}; this model has {list(adapter_configs(model))}")
    config = adapter_configs(model)[name]
    tensors: dict[str, torch.Tensor] = {}
    pissa = False
    for path, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        ad = layer.adapters[name]
        A, B = ad.A.detach(), ad.B.detach()
        if ad.pissa_init is not None:  # express the update relative to the original W0, as PEFT does
            A0, B0 = ad.pissa_init
            A, B = torch.cat([A, A0.to(A)], 0), torch.cat([B, -B0.to(B)], 1)
            pissa = True
        emb = layer.kind == "embedding"
        tensors[f"{PREFIX}{path}.lora_{'embedding_A' if emb else 'A.weight'}"] = A
        tensors[f"{PREFIX}{path}.lora_{'embedding_B' if emb else 'B.weight'}"] = B
        if ad.magnitude is not None:
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = ad.magnitude.detach()
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
    if pissa:
        grow = 2 if not config.use_rslora else math.sqrt(2)
        config = dataclasses.replace(
            config, r=2 * config.r, lora_alpha=config.lora_alpha * grow, init_lora_weights=True,
            rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
            alpha_pattern={k: v * grow for k, v in config.alpha_pattern.items()})
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, config


def save_adapter(model: nn.Module, folder: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` to `folder`; each file appears atomically (never half-written)."""
    tensors, config = adapter_state_dict(model, name)
    folder = Path(folder)
    data = config.to_dict()
    if data.get("base_model_name_or_path") is None:
        data["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if data.get("auto_mapping") is None and hasattr(model, "config"):
        data["auto_mapping"] = {"base_model_class": type(model).__name__,
                                "parent_library": type(model).__module__}
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))
    return folder


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- reading ---------------------------------------------------------------------------------------
def read_adapter(folder: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter folder without touching any model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickled:
            raise AdapterFileError(
                f"{folder} holds only pickled weights ({', '.join(pickled)}); lorafit never unpickles files. "
                "Convert it once in a trusted environment: `from safetensors.torch import save_file; "
                f"save_file(torch.load('{pickled[0]}', weights_only=True), '{WEIGHTS_NAME}')`.")
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
        raise AdapterFileError(f"{weights} is not a readable safetensors file ({exc}); re-save or re-download it") from None
    return config, tensors


def _group(tensors: dict[str, torch.Tensor], source: Path) -> tuple[dict, dict]:
    """Split PEFT keys into {module path: {A, B, magnitude}} and {param path: tensor} (others)."""
    lora, other = {}, {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{source}: key {key!r} does not start with {PREFIX!r}; not a PEFT LoRA file")
        key = key[len(PREFIX):]
        for suffix, role in _LORA_SUFFIXES.items():
            if key.endswith(suffix):
                lora.setdefault(key[: -len(suffix)], {})[role] = value
                break
        else:
            other[key] = value
    return lora, other


def load_adapter(model: nn.Module, folder: str | os.PathLike, name: str = "default",
                 trainable: bool = False, activate: bool = True) -> LoraConfig:
    """Add the adapter in `folder` to `model` as `name`. On any error the model is unchanged."""
    folder = Path(folder)
    config, tensors = read_adapter(folder)
    if name in adapter_configs(model):
        raise ValueError(f"model already has an adapter named {name!r}")
    lora, other = _group(tensors, folder / WEIGHTS_NAME)
    modules = dict(plain_modules(model))
    hint = f" The adapter was trained on {config.base_model_name_or_path!r}." if config.base_model_name_or_path else ""
    for path, parts in lora.items():
        module = modules.get(path)
        if module is None:
            raise AdapterFileError(f"{folder}: module {path!r} does not exist in {type(model).__name__}; "
                                   f"this adapter is for another base model.{hint}")
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if layer_kind(base) is None:
            raise AdapterFileError(f"{folder}: {path!r} is a {type(base).__name__}, which LoRA cannot wrap.{hint}")
        if "A" not in parts or "B" not in parts:
            raise AdapterFileError(f"{folder}: {path!r} has only {sorted(parts)}; both lora_A and lora_B are needed")
        fan_in, fan_out = fan_dims(base)
        r = parts["A"].shape[0]
        kernel = tuple(base.weight.shape[2:]) if layer_kind(base) == "conv" else ()
        want = {"A": (r, fan_in, *kernel), "B": (fan_out, r, *(1,) * len(kernel))}
        for role in ("A", "B"):
            if tuple(parts[role].shape) != want[role]:
                raise AdapterFileError(
                    f"{folder}: {path}.lora_{role} has shape {tuple(parts[role].shape)} but the model's "
                    f"{type(base).__name__} ({fan_in} -> {fan_out}) needs {want[role]}.{hint}")
        if r != config.rank_for(path):
            raise AdapterFileError(f"{folder}: {path} has rank {r} but the config says {config.rank_for(path)}")
        if ("magnitude" in parts) != config.use_dora:
            raise AdapterFileError(f"{folder}: use_dora={config.use_dora} but DoRA magnitudes are "
                                   f"{'present' if 'magnitude' in parts else 'missing'} for {path}")
        if "magnitude" in parts and parts["magnitude"].numel() != fan_out:
            raise AdapterFileError(f"{folder}: {path}.lora_magnitude_vector has {parts['magnitude'].numel()} "
                                   f"values, the layer has {fan_out} outputs.{hint}")
    params = {k.replace(".base_layer.", "."): p for k, p in model.named_parameters()}
    biases: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    copies: dict[str, dict[str, torch.Tensor]] = {}
    saved = config.modules_to_save or []
    for key, value in other.items():
        if ".original_module." in key:
            continue  # PEFT with bias="all" also writes the frozen original's bias; never needed
        if key.endswith(".base_layer.weight") and key[: -len(".base_layer.weight")] in lora:
            # PEFT saves the base embedding next to an embedding adapter (for resized vocabularies).
            current = modules[key[: -len(".base_layer.weight")]]
            current = current.base_layer if isinstance(current, LoraLayer) else current
            if current.weight.shape != value.shape or not torch.allclose(current.weight.detach().float(),
                                                                         value.float(), atol=1e-6):
                raise AdapterFileError(
                    f"{folder}: the adapter carries its own base weight for {key!r} (a resized or retrained "
                    f"embedding) that differs from this model's; load the model it was trained with.{hint}")
            continue
        key = key.replace(".modules_to_save.", ".")
        owner = next((p for p in modules if any(p == m or p.endswith("." + m) for m in saved)
                      and key.startswith(p + ".")), None)
        if owner is not None:
            copies.setdefault(owner, {})[key[len(owner) + 1:]] = value
        elif key.endswith("bias") and params.get(key.replace(".base_layer.", ".")) is not None \
                and params[key.replace(".base_layer.", ".")].shape == value.shape:
            biases.append((params[key.replace(".base_layer.", ".")], value))  # applied once all fits
        else:
            raise AdapterFileError(f"{folder}: tensor {key!r} matches nothing in {type(model).__name__}.{hint}")
    for owner, state in copies.items():
        module = modules[owner]
        template = module.original_module if isinstance(module, TrainedCopy) else module
        expected = template.state_dict()
        if set(state) != set(expected) or any(expected[k].shape != v.shape for k, v in state.items()):
            raise AdapterFileError(
                f"{folder}: saved module {owner!r} does not fit: file has "
                f"{ {k: tuple(v.shape) for k, v in state.items()} }, model has "
                f"{ {k: tuple(v.shape) for k, v in expected.items()} }.{hint}")

    # Everything fits: change the model.
    load_config = dataclasses.replace(config, target_modules=sorted(lora) or None,
                                      layers_to_transform=None, layers_pattern=None, init_lora_weights=True)
    inject(model, load_config, name, activate=False, trainable=False)
    adapter_configs(model)[name] = config
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if path in lora and name in layer.adapters:
                ad = layer.adapters[name]
                ad.A.copy_(lora[path]["A"])
                ad.B.copy_(lora[path]["B"])
                if ad.magnitude is not None:
                    ad.magnitude.copy_(lora[path]["magnitude"].reshape(ad.magnitude.shape))
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
    variant = "DoRA" if config.use_dora else "LoRA"
    if config.use_rslora:
        variant = f"rs{variant}"
    scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return {
        "base_model": config.base_model_name_or_path, "task_type": config.task_type, "variant": variant,
        "r": config.r, "lora_alpha": config.lora_alpha, "scale": scale, "modules": sorted(lora),
        "target_names": sorted({p.rsplit(".", 1)[-1] for p in lora}), "ranks": ranks,
        "modules_to_save": config.modules_to_save or [], "parameters": sum(t.numel() for t in tensors.values()),
        "dtype": ", ".join(dtypes), "bytes": (Path(folder) / WEIGHTS_NAME).stat().st_size,
        "other_tensors": sorted(other),
    }
