"""PiSSA: start A, B from the top-r singular directions of W0 and leave the residual in the base.

    W0 = U S V^T;  B = U_r sqrt(S_r / s),  A = sqrt(S_r / s) V_r^T;  base := W0 - s B A

so step 0 equals the base model but training moves the principal directions. A file must work
on the original W0 (PEFT's convention), so on save the update is re-expressed relative to W0:
s B A - s B0 A0 = s [B, -B0] [A; A0], i.e. rank 2r (and alpha scaled to keep s).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorafit.tuner.variants.base import Variant, register_variant

if TYPE_CHECKING:
    from lorafit.tuner.kinds.base import LayerKind


class PiSSA(Variant):
    name = "pissa"
    label = "PiSSA"
    order = 10  # re-expresses W before anything measures it (DoRA's norms)
    # A checkpoint's adapter file holds the update relative to the original W0 (`to_file`), while
    # the model being trained holds the residual base and (A, B): resuming would start from the
    # wrong weights.
    resumable = False

    def selected(self, settings: Mapping[str, Any]) -> bool:
        init = settings.get("init_lora_weights")
        return isinstance(init, str) and init.startswith("pissa")

    def check(self, kind: LayerKind, module: nn.Module) -> None:
        if kind.quantized:
            raise TypeError(
                "PiSSA initialisation rewrites the base weight, which a quantized base cannot "
                "store; use model.quantize: none, or another init_lora_weights"
            )
        # Kinds with their own init (embeddings) keep it, as in PEFT; convolutions have no SVD init.
        if not (kind.svd_init or kind.own_init):
            raise TypeError("PiSSA initialisation is defined for linear layers only")

    def sets_factors(self, kind: LayerKind) -> bool:
        return kind.svd_init

    def init(self, layer: nn.Module, ad: nn.Module, init: bool | str) -> None:
        if layer.kind.svd_init:
            W, A, B = _svd_factors(layer, ad.r, ad.scale, init)
            layer.write_weight(W - ad.scale * (B @ A))  # the base keeps the residual
            ad.A, ad.B = nn.Parameter(A), nn.Parameter(B)
        # Every module of a PiSSA adapter is saved at rank 2r, so every module keeps (A0, B0); an
        # own-init kind (embedding) has A0 = 0, so its extra rank adds nothing.
        ad.pissa_init = (ad.A.detach().clone(), ad.B.detach().clone())

    def to_file(self, layer, ad, tensors):
        A0, B0 = ad.pissa_init
        A, B = tensors["A"], tensors["B"]
        return {**tensors, "A": torch.cat([A, A0.to(A)], 0), "B": torch.cat([B, -B0.to(B)], 1)}

    def file_config(self, config):
        grow = 2 if not config.use_rslora else math.sqrt(2)  # keeps alpha / r (or / sqrt(r))
        return dataclasses.replace(
            config,
            r=2 * config.r,
            lora_alpha=config.lora_alpha * grow,
            init_lora_weights=True,  # the file holds a plain LoRA; loading must not redo the SVD
            rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
            alpha_pattern={k: v * grow for k, v in config.alpha_pattern.items()},
        )


def _svd_factors(layer: nn.Module, r: int, scale: float, init: str) -> tuple[torch.Tensor, ...]:
    """(W0, A, B) with s B A the best rank-r approximation of W0."""
    W = layer.out_major_weight()  # (out, in) fp32
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:  # pissa_niter_N: randomised SVD, much faster on big matrices
        niter = int(init.rsplit("_", 1)[1])
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.T
    S = S / scale
    A = torch.diag(S.sqrt()) @ Vh  # (r, in)
    B = U @ torch.diag(S.sqrt())  # (out, r)
    return W, A, B


PISSA = register_variant(PiSSA())
