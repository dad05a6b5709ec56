"""Fold adapters into the base weights (and back), explicitly and all-or-nothing."""

from __future__ import annotations

import torch
from torch import nn

from lorafit.quant import dequantize_model
from lorafit.tuner.kinds import kind_of
from lorafit.tuner.layer import LoraLayer
from lorafit.tuner.state import (
    active_adapters,
    adapter_configs,
    lora_layers,
    plain_modules,
    set_submodule,
)
from lorafit.tuner.trained_copy import TrainedCopy


class MergeError(RuntimeError):
    """A merge was refused; the model's weights are as they were before the call."""


def merged_adapters(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, layer in lora_layers(model):
        names += [n for n in layer.merged if n not in names]
    return names


def _untie_if_shared(model: nn.Module, path: str, layer: LoraLayer) -> None:
    """Give a tied weight (e.g. embeddings shared with the LM head) its own copy before it
    changes."""
    weight = layer.base_layer.weight
    sharers = [
        p
        for p, m in model.named_modules()
        if m is not layer.base_layer and any(q is weight for q in m.parameters(recurse=False))
    ]
    if sharers:
        layer.base_layer.weight = nn.Parameter(
            weight.detach().clone(), requires_grad=weight.requires_grad
        )
        if hasattr(getattr(model, "config", None), "tie_word_embeddings"):
            model.config.tie_word_embeddings = False


def merge(
    model: nn.Module,
    adapters: list[str] | str | None = None,
    verify: bool = False,
    tolerance: float | None = None,
) -> list[str]:
    """Add the given (default: active) adapters into the base weights.

    Idempotent (an adapter already merged is skipped) and all-or-nothing: every layer's merged
    weight is computed and checked first, and only when all pass is anything written. A check
    fails on NaN/inf, or, with `verify`, when the merged layer's output on random probe inputs
    differs from the unmerged one by more than `tolerance` (relative; default 1e-4 in fp32,
    2e-2 in half precision). A failure raises MergeError with the weights untouched.
    Returns the names merged.
    """
    names = [adapters] if isinstance(adapters, str) else list(adapters or active_adapters(model))
    unknown = [n for n in names if n not in adapter_configs(model)]
    if unknown:
        raise KeyError(f"no adapter named {unknown}; this model has {list(adapter_configs(model))}")
    gen = torch.Generator().manual_seed(0)
    plan = []
    for path, layer in lora_layers(model):
        todo = [n for n in names if n in layer.adapters and n not in layer.merged]
        if not todo:
            continue
        if layer.kind.quantized:
            raise MergeError(
                f"{path}: the base weight is quantized and cannot hold a merge; dequantize the "
                "model first (lorafit.tuner.dequantize_base; `lorafit merge` does); nothing was "
                "merged"
            )
        try:
            weight, _ = layer.merged_weight(
                todo
            )  # computed to check; merge() recomputes to save memory
        except FloatingPointError as exc:
            raise MergeError(f"{path}: {exc}; nothing was merged") from None
        if verify:
            _verify(path, layer, todo, weight, gen, tolerance)
        del weight
        plan.append((path, layer, todo))
    for path, layer, todo in plan:
        _untie_if_shared(model, path, layer)
        layer.merge(todo)
    return names


def _verify(
    path: str,
    layer: LoraLayer,
    todo: list[str],
    weight: torch.Tensor,
    gen: torch.Generator,
    tolerance: float | None,
) -> None:
    x = layer.kind.probe(layer.base_layer, gen)
    was_training, was_active = layer.training, layer.active
    layer.eval()
    layer.active = todo
    try:
        with torch.no_grad():
            expected = layer(x)
            got = layer.base_output(x, weight)
    finally:
        layer.active = was_active
        layer.train(was_training)
    half = layer.kind.compute_dtype(layer.base_layer) in (torch.float16, torch.bfloat16)
    tol = tolerance if tolerance is not None else (2e-2 if half else 1e-4)
    err = (
        (got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-6)
    ).item()
    if not err <= tol:
        raise MergeError(
            f"{path}: merged output differs from unmerged by {err:.2e} (> {tol:.0e}); "
            "nothing was merged"
        )


def dequantize_base(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every quantized base layer (also those under a LoRA layer) by a float nn.Linear
    holding its dequantized weight, so adapters can be merged into it; returns how many."""
    count = dequantize_model(model, dtype)
    for _, layer in lora_layers(model):
        kind = kind_of(layer.base_layer)
        if kind is not layer.kind:
            layer.kind = kind
            layer.variant_cache.clear()  # statistics of the quantized weight
    return count


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights again."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(
    model: nn.Module, adapters: list[str] | str | None = None, verify: bool = True
) -> nn.Module:
    """Merge, then remove every lorafit module: the result is the plain transformers model."""
    merge(model, adapters, verify=verify)
    for path, module in list(plain_modules(model)):
        if isinstance(module, LoraLayer):
            set_submodule(model, path, module.base_layer)
        elif isinstance(module, TrainedCopy):
            set_submodule(model, path, module.current())
    adapter_configs(model).clear()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
