"""Several named adapters on one model: activate, disable, delete, combine, mix per sample."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import nn

from lorafit.tuner.config import LoraConfig
from lorafit.tuner.inject import adapter_configs, mark_trainable, unwrap
from lorafit.tuner.layer import LoraAdapter, LoraLayer, TrainedCopy


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


def _wrappers(model: nn.Module) -> Iterator[LoraLayer | TrainedCopy]:
    for module in model.modules():
        if isinstance(module, (LoraLayer, TrainedCopy)):
            yield module


def adapter_names(model: nn.Module) -> list[str]:
    return list(adapter_configs(model))


def _check_names(model: nn.Module, names: list[str]) -> None:
    missing = [n for n in names if n not in adapter_configs(model)]
    if missing:
        raise KeyError(f"no adapter named {missing} on this model; it has {adapter_names(model)}")


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make these adapters the ones used by forward (several are summed)."""
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    for module in _wrappers(model):
        module.active = list(names)


def active_adapters(model: nn.Module) -> list[str]:
    for module in _wrappers(model):
        return list(module.active)
    return []


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Run the base model: no adapter applies inside this block (merged ones are unmerged first)."""
    from lorafit.tuner.merge import merge, merged_adapters, unmerge  # merge.py builds on this module

    was_merged = merged_adapters(model)
    if was_merged:
        unmerge(model)
    wrappers = list(_wrappers(model))
    for module in wrappers:
        module.disabled = True
    try:
        yield model
    finally:
        for module in wrappers:
            module.disabled = False
        if was_merged:
            merge(model, was_merged)


@contextlib.contextmanager
def per_sample_adapters(model: nn.Module, names: list[str]):
    """One forward over a batch where row i uses adapter names[i] ("__base__": no adapter)."""
    _check_names(model, [n for n in names if n != "__base__"])
    wrappers = list(_wrappers(model))
    for module in wrappers:
        module.sample_adapters = list(names)
    try:
        yield model
    finally:
        for module in wrappers:
            module.sample_adapters = None


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter everywhere; wrappers left with no adapter are replaced by their base."""
    _check_names(model, [name])
    for module in _wrappers(model):
        if isinstance(module, LoraLayer):
            if name in module.merged:
                raise RuntimeError(f"adapter {name!r} is merged into the weights; unmerge() before deleting it")
            if name in module.adapters:
                del module.adapters[name]
        elif name in module.copies:
            del module.copies[name]
        module.active = [n for n in module.active if n != name]
    del adapter_configs(model)[name]
    unwrap(model, only_empty=True)


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], new_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> LoraConfig:
    """A new adapter from a weighted combination of existing ones (PEFT's semantics).

    - "cat":    rank = sum of ranks; delta W = sum_i w_i s_i B_i A_i exactly.
    - "svd":    delta W = sum_i w_i s_i B_i A_i, truncated to `svd_rank` (default: the largest rank).
    - "linear": all ranks equal; A = sum_i sqrt(w_i s_i) A_i, B = sum_i sqrt(w_i s_i) B_i
                (a cheap mix of the factors, not of the products: only exact for one adapter).
    The new adapter has scale 1 (lora_alpha = r) and is not activated.
    """
    _check_names(model, adapters)
    if len(adapters) != len(weights) or not adapters:
        raise ValueError("give one weight per adapter (and at least one adapter)")
    if new_name in adapter_configs(model):
        raise ValueError(f"an adapter named {new_name!r} already exists")
    configs = [adapter_configs(model)[a] for a in adapters]
    if any(c.use_dora for c in configs):
        raise ValueError("combining DoRA adapters is not supported: their magnitudes do not add")
    layers = [(p, layer) for p, layer in lora_layers(model) if any(a in layer.adapters for a in adapters)]
    ranks = {layer.adapters[a].r for _, layer in layers for a in adapters if a in layer.adapters}
    if combination_type == "linear":
        if len(ranks) > 1:
            raise ValueError(f"'linear' needs adapters of one rank, got ranks {sorted(ranks)}; use 'cat' or 'svd'")
        if any(w < 0 for w in weights):
            raise ValueError("'linear' takes sqrt(weight): weights must be >= 0; use 'cat' or 'svd'")
    elif combination_type not in ("cat", "svd"):
        raise ValueError(f"combination_type must be 'linear', 'cat' or 'svd', got {combination_type!r}")
    new_rank = {"linear": max(ranks), "svd": svd_rank or max(ranks), "cat": None}[combination_type]

    built = {}
    for path, layer in layers:
        present = [(layer.adapters[a], w) for a, w in zip(adapters, weights) if a in layer.adapters]
        if combination_type == "cat":
            A = torch.cat([ad.A.detach().float() * w * ad.scale for ad, w in present], dim=0)
            B = torch.cat([ad.B.detach().float() for ad, _ in present], dim=1)
        elif combination_type == "linear":
            A = sum(ad.A.detach().float() * math.sqrt(w * ad.scale) for ad, w in present)
            B = sum(ad.B.detach().float() * math.sqrt(w * ad.scale) for ad, w in present)
        else:
            delta = sum(w * layer.delta_weight(name) for name, w in zip(adapters, weights) if name in layer.adapters)
            U, S, Vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)  # (out, k) (k,) (k, in')
            k = min(new_rank, S.numel())
            a_shape = (k, *present[0][0].A.shape[1:])
            b_shape = (delta.shape[0], k, *present[0][0].B.shape[2:])
            A, B = Vh[:k].reshape(a_shape), (U[:, :k] * S[:k]).reshape(b_shape)
        built[path] = (layer, A, B)

    ranks_out = {p: A.shape[0] for p, (_, A, _) in built.items()}
    rank = max(ranks_out.values())
    config = dataclasses.replace(
        configs[0], r=rank, lora_alpha=rank, use_rslora=False, init_lora_weights=True,
        target_modules=sorted({p.rsplit(".", 1)[-1] for p in built}), modules_to_save=None,
        rank_pattern={p: r for p, r in ranks_out.items() if r != rank},
        alpha_pattern={p: r for p, r in ranks_out.items() if r != rank},
        layers_to_transform=None, layers_pattern=None,
    )
    for path, (layer, A, B) in built.items():
        ad = LoraAdapter(A.contiguous(), B.contiguous(), 1.0, configs[0].lora_dropout, None, A.shape[0], A.shape[0])
        ad.requires_grad_(False)  # trainable only once train_adapter() picks it
        layer.adapters[new_name] = ad.to(layer.base_layer.weight.device)
    adapter_configs(model)[new_name] = config
    return config


def train_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the active and only trainable adapter."""
    set_active(model, name)
    mark_trainable(model, name)
