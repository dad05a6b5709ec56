"""DoRA (weight-decomposed LoRA): W' = m * (W + s B A) / ||W + s B A||, one norm per output row.

m is a trained per-output magnitude, initialised to the row norms so step 0 equals the base. As
in the paper (and PEFT), the norm is treated as a constant in backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.tuner.variants.base import OneOp, Variant, register_variant


@torch.no_grad()
def weight_norm(layer: nn.Module, ad: nn.Module) -> torch.Tensor:
    """Row norms of W + s B A for the current base weight, without materialising B A.

    ||w_i + s (BA)_i||^2 = ||w_i||^2 + 2 s <w_i A^T, b_i> + s^2 b_i (A A^T) b_i^T
    costs one (out, in) x (in, r) product instead of an (out, in) temporary, and ||w_i||^2 is
    cached (the base is frozen).
    """
    W = layer.kind.weight(layer.base_layer).flatten(1)  # (out, in'), base dtype
    A, B = ad.A.flatten(1).float(), ad.B.flatten(1).float()  # (r, in'), (out, r)
    cross = F.linear(A.to(W.dtype), W).float().T  # (out, r) = W A^T
    s = ad.scale
    sq = _row_sq(layer, W) + 2 * s * (cross * B).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
    return sq.clamp_min(0).sqrt()  # (out,)


def _row_sq(layer: nn.Module, W: torch.Tensor) -> torch.Tensor:
    # Keyed on the weight's storage and version: a merge or any in-place write invalidates it.
    key = (layer.kind.weight_version(layer.base_layer), W.dtype)
    cached = layer.variant_cache.get("dora_row_sq")
    if cached is None or cached[0] != key:
        cached = (key, W.float().pow(2).sum(1))  # (out,)
        layer.variant_cache["dora_row_sq"] = cached
    return cached[1]


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(out,) -> broadcastable over the rows of an out-major weight."""
    return v.view(-1, *(1,) * (like.dim() - 1))


class DoRA(Variant):
    name = "dora"
    label = "DoRA"
    order = 20  # measures ||W + sBA|| after any re-expression of W (PiSSA)
    owns_update = True
    additive = False
    file_keys = {"magnitude": "lora_magnitude_vector"}

    def selected(self, settings: Mapping[str, Any]) -> bool:
        return bool(settings.get("use_dora"))

    def init(self, layer: nn.Module, ad: nn.Module, init: bool | str) -> None:
        shape = layer.kind.magnitude_shape(layer.base_layer)
        ad.magnitude = nn.Parameter(weight_norm(layer, ad).reshape(shape))

    def forward(self, layer, ad, x, base_out, dropped):
        kind = layer.kind
        mscale = ad.magnitude.reshape(-1) / weight_norm(layer, ad)  # (out,)
        lora = layer.branch(ad, x, mscale * ad.scale)  # per-output scale folded into B
        mscale = kind.per_output(mscale.to(lora.dtype), lora)
        if dropped:  # the base term must see the same dropped-out input as the branch
            base_plain = layer.base_output(x, kind.weight(layer.base_layer), bias=False)
        else:
            bias = kind.bias(layer.base_layer)
            base_plain = base_out - (0.0 if bias is None else kind.per_output(bias, base_out))
        return (mscale - 1) * base_plain + lora

    def one_op(self, layer, ad):
        """y = c * (x W^T + s (x A^T) B^T) with c = m / ||W + s B A|| per output: the kind's
        one-op base + branch scaled per output (the same output as `forward` added to the base
        output: base + (c - 1) base + c * branch); none for a biased layer (c must not scale the
        bias)."""
        if layer.kind.bias(layer.base_layer) is not None:
            return None
        return OneOp(
            ad.A, ad.B, ad.scale, lambda: ad.magnitude.reshape(-1) / weight_norm(layer, ad)
        )

    def merge(self, layer, ad, W):
        W = W + layer.delta_weight_of(ad)
        norm = W.flatten(1).norm(dim=1)  # (out,), kept for unmerge
        return W * _rows(ad.magnitude.detach().float().reshape(-1) / norm, W), norm

    def unmerge(self, layer, ad, W, state):
        W = W / _rows(ad.magnitude.detach().float().reshape(-1) / state, W)
        return W - layer.delta_weight_of(ad)

    def to_file(self, layer, ad, tensors):
        return {**tensors, "magnitude": ad.magnitude.detach()}

    def check_file(self, kind, module, parts, config):
        if ("magnitude" in parts) != bool(config.use_dora):
            found = "present" if "magnitude" in parts else "missing"
            return f"use_dora={config.use_dora} but DoRA magnitudes are {found}"
        if "magnitude" in parts:
            n, out = parts["magnitude"].numel(), kind.fan_dims(module)[1]
            if n != out:
                return f"lora_magnitude_vector has {n} values, the layer has {out} outputs"
        return None

    def from_file(self, ad, parts):
        ad.magnitude.copy_(parts["magnitude"].reshape(ad.magnitude.shape))


DORA = register_variant(DoRA())
