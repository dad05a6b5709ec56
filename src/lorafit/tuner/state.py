"""Model-level adapter state: which adapters a model has, which are active, which train, and
which one each batch row uses. The bottom of the model-level modules: inject, merge and
peft_format build on it, and it imports none of them.

The configs live in `model.lorafit_configs` (name -> LoraConfig); the active set, the disabled
flag and merges live on each wrapper (LoraLayer / TrainedCopy); the per-row choice lives in a
context variable (`rows.py`), never on the modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lorafit.tuner.config import LoraConfig
from lorafit.tuner.layer import LoraAdapter, LoraLayer
from lorafit.tuner.rows import BASE, rows_context
from lorafit.tuner.trained_copy import TrainedCopy


# --- what the model holds -----------------------------------------------------------------------
def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    return model.__dict__.setdefault("lorafit_configs", {})


def adapter_names(model: nn.Module) -> list[str]:
    return list(adapter_configs(model))


def plain_modules(model: nn.Module):
    """(path, module) for the model's own modules, looking through lorafit wrappers."""
    for path, module in model.named_modules():
        dotted = f".{path}"
        if ".base_layer" in dotted or ".adapters" in dotted or ".copies" in dotted:
            continue
        if ".original_module" in dotted:
            continue
        yield path, module


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module


def wrappers(model: nn.Module) -> Iterator[LoraLayer | TrainedCopy]:
    for module in model.modules():
        if isinstance(module, (LoraLayer, TrainedCopy)):
            yield module


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def check_new_adapter_name(model: nn.Module, name: str) -> None:
    """Raise ValueError unless `name` can name a new adapter of `model`: a non-empty string
    without dots (it becomes part of module paths), not the per-row "no adapter" name, not taken.
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if name == BASE:
        raise ValueError(f"{BASE!r} is reserved for 'no adapter' in per-row batches")
    if name in adapter_configs(model):
        raise ValueError(
            f"model already has an adapter named {name!r}; delete it or pick another name"
        )


def check_names(model: nn.Module, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in adapter_configs(model)]
    if missing:
        raise KeyError(f"no adapter named {missing} on this model; it has {adapter_names(model)}")


# --- which adapters apply -----------------------------------------------------------------------
def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make these adapters the ones used by forward (several are summed)."""
    names = [names] if isinstance(names, str) else list(names)
    check_names(model, names)
    for module in wrappers(model):
        module.active = list(names)


def active_adapters(model: nn.Module) -> list[str]:
    for module in wrappers(model):
        return list(module.active)
    return []


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Run the base model: no adapter applies inside this block (merged ones are unmerged first)."""
    layers = [layer for _, layer in lora_layers(model)]
    was_merged = [list(layer.merged) for layer in layers]
    for layer, names in zip(layers, was_merged):
        if names:
            layer.unmerge()
    mods = list(wrappers(model))
    for module in mods:
        module.disabled = True
    try:
        yield model
    finally:
        for module in mods:
            module.disabled = False
        for layer, names in zip(layers, was_merged):
            layer.merge(names)  # the same adapters in the same order: already checked once


def adapter_rows(names: Sequence[str] | None, model: nn.Module | None = None):
    """Context manager: in every forward inside (e.g. `model.generate(...)`), batch row i uses
    adapter names[i] ("__base__": no adapter). Local to the calling thread / asyncio task, so
    concurrent requests on one model do not see each other's rows. None: the active adapters.
    With `model`, the names are checked against its adapters first."""
    if model is not None and names is not None:
        check_names(model, [n for n in names if n != BASE])
    return rows_context(names)


def forward_with_adapters(model: nn.Module, adapter_names: Sequence[str], *args, **kwargs):
    """`model(*args, **kwargs)` with batch row i using adapter adapter_names[i]."""
    with adapter_rows(adapter_names, model):
        return model(*args, **kwargs)


@contextlib.contextmanager
def per_sample_adapters(model: nn.Module, names: list[str]):
    """One forward over a batch where row i uses adapter names[i] ("__base__": no adapter).
    The same as `adapter_rows(names, model)`; yields the model."""
    with adapter_rows(names, model):
        yield model


# --- which adapters train -----------------------------------------------------------------------
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


def train_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the active and only trainable adapter."""
    set_active(model, name)
    mark_trainable(model, name)


# --- removing adapters --------------------------------------------------------------------------
def unwrap(model: nn.Module, only_empty: bool = False) -> nn.Module:
    """Replace lorafit wrappers by their base modules (no merge): all, or those with no adapter
    left."""
    for path, module in list(plain_modules(model)):
        if isinstance(module, LoraLayer) and not (only_empty and module.adapters):
            set_submodule(model, path, module.base_layer)
        elif isinstance(module, TrainedCopy) and not (only_empty and module.copies):
            set_submodule(model, path, module.original_module)
    if not only_empty:
        adapter_configs(model).clear()
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter everywhere; wrappers left with no adapter are replaced by their base."""
    check_names(model, [name])
    for module in wrappers(model):
        if isinstance(module, LoraLayer):
            if name in module.merged:
                raise RuntimeError(
                    f"adapter {name!r} is merged into the weights; unmerge() before deleting it"
                )
            if name in module.adapters:
                del module.adapters[name]
        elif name in module.copies:
            del module.copies[name]
        module.active = [n for n in module.active if n != name]
    del adapter_configs(model)[name]
    unwrap(model, only_empty=True)


# --- combining adapters -------------------------------------------------------------------------
def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    new_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> LoraConfig:
    """A new adapter from a weighted combination of existing ones (PEFT's semantics).

    - "cat":    rank = sum of ranks; delta W = sum_i w_i s_i B_i A_i exactly.
    - "svd":    delta W = sum_i w_i s_i B_i A_i, truncated to `svd_rank` (default: the largest
                rank).
    - "linear": all ranks equal; A = sum_i sqrt(w_i s_i) A_i, B = sum_i sqrt(w_i s_i) B_i
                (a cheap mix of the factors, not of the products: only exact for one adapter).
    The new adapter has scale 1 (lora_alpha = r) and is not activated.
    """
    check_names(model, adapters)
    if len(adapters) != len(weights) or not adapters:
        raise ValueError("give one weight per adapter (and at least one adapter)")
    check_new_adapter_name(model, new_name)
    configs = [adapter_configs(model)[a] for a in adapters]
    layers = [(p, lay) for p, lay in lora_layers(model) if any(a in lay.adapters for a in adapters)]
    present_ads = [lay.adapters[a] for _, lay in layers for a in adapters if a in lay.adapters]
    odd = sorted({v.label for ad in present_ads for v in ad.variants if not v.additive})
    if odd:
        raise ValueError(
            f"combining {'/'.join(odd)} adapters is not supported: "
            "their updates are not scale * B A, so they do not add"
        )
    ranks = {ad.r for ad in present_ads}
    if combination_type == "linear":
        if len(ranks) > 1:
            raise ValueError(
                f"'linear' needs adapters of one rank, got ranks {sorted(ranks)}; "
                "use 'cat' or 'svd'"
            )
        if any(w < 0 for w in weights):
            raise ValueError(
                "'linear' takes sqrt(weight): weights must be >= 0; use 'cat' or 'svd'"
            )
    elif combination_type not in ("cat", "svd"):
        raise ValueError(
            f"combination_type must be 'linear', 'cat' or 'svd', got {combination_type!r}"
        )
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
            delta = sum(w * layer.delta_weight_of(ad) for ad, w in present)  # (out, in, ...)
            U, S, Vh = torch.linalg.svd(
                delta.flatten(1), full_matrices=False
            )  # (out,k) (k,) (k,in')
            k = min(new_rank, S.numel())
            a_shape = (k, *present[0][0].A.shape[1:])
            b_shape = (delta.shape[0], k, *present[0][0].B.shape[2:])
            A, B = Vh[:k].reshape(a_shape), (U[:, :k] * S[:k]).reshape(b_shape)
        built[path] = (layer, A, B)

    ranks_out = {p: A.shape[0] for p, (_, A, _) in built.items()}
    rank = max(ranks_out.values())
    config = dataclasses.replace(
        configs[0],
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        init_lora_weights=True,
        target_modules=sorted({p.rsplit(".", 1)[-1] for p in built}),
        modules_to_save=None,
        rank_pattern={p: r for p, r in ranks_out.items() if r != rank},
        alpha_pattern={p: r for p, r in ranks_out.items() if r != rank},
        layers_to_transform=None,
        layers_pattern=None,
    )
    for path, (layer, A, B) in built.items():
        r = A.shape[0]
        ad = LoraAdapter(A.contiguous(), B.contiguous(), 1.0, configs[0].lora_dropout, r, r)
        ad.requires_grad_(False)  # trainable only once train_adapter() picks it
        layer.adapters[new_name] = ad.to(layer.device)
    adapter_configs(model)[new_name] = config
    return config
