"""Variant hooks, and the registry that picks an adapter's variants from its settings.

Plain LoRA is `Variant` itself: every hook's default is the plain behaviour. A variant (DoRA,
PiSSA, ...) overrides the hooks it changes, in the spirit of PEFT's variant objects:

    init        after A and B exist: extra tensors (DoRA's magnitude) or a re-expression of the
                base (PiSSA's SVD)
    forward     what the adapter adds to the base output
    one_op      the adapter as the kind's one-op forms take it (base op + branch, a per-output
                scale), when the layer's output can be computed that way
    merge       the base weight with the adapter folded in, and what unmerge needs to undo it
    to_file     the tensors written to the adapter file (PiSSA: relative to the original W0)
    file_config the adapter_config as written (PiSSA: doubled rank)

An adapter may carry several variants (PiSSA + DoRA). Hooks that transform a value chain through
them in order; forward / merge / unmerge come from the one variant that owns the update
(`owns_update`), or plain LoRA when none does. A new variant is one new file in this package
that subclasses `Variant` and calls `register_variant`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from lorafit.tuner.registered import Registered

if TYPE_CHECKING:
    from lorafit.tuner.kinds.base import LayerKind


class OneOp(NamedTuple):
    """An adapter in the form the kinds' one-op paths compute: out_scale * (base + scale B A x)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    out_scale: Callable[[], torch.Tensor] | None
    """What gives the per-output scale (out,), e.g. DoRA's m / ||W + sBA||: called only by a kind
    that runs the one-op form, so a kind that has none costs nothing (a quantized base's norm
    would dequantize its weight)."""


class Variant(Registered):
    """The hooks of one LoRA variant; this base class is plain LoRA.

    Hooks receive the `LoraLayer` (`layer`) and one of its `LoraAdapter`s (`ad`), typed as
    nn.Module here because layer.py builds on this package, not the other way round."""

    name: str = "lora"
    label: str = "LoRA"
    """How messages and `describe_adapter` name it."""
    order: int = 0
    """Init order among an adapter's variants (a re-expression of W before what measures it)."""
    owns_update: bool = False
    """Whether this variant's forward / merge / unmerge replace plain LoRA's."""
    additive: bool = True
    """Whether the update is exactly scale * B A, so adapters can be combined linearly."""
    file_keys: dict[str, str] = {}
    """Extra tensors in the adapter file: {role on the adapter: PEFT key suffix}."""
    resumable: bool = True
    """Whether a training run of an adapter with this variant can resume from a checkpoint (the
    checkpoint holds the adapter as the model holds it, not as `to_file` re-expresses it)."""

    def selected(self, settings: Mapping[str, Any]) -> bool:
        """Whether an adapter with these LoraConfig field values uses this variant."""
        return False

    def check(self, kind: LayerKind, module: torch.nn.Module) -> None:
        """Raise TypeError when this variant is not defined for the module (before any change)."""

    def sets_factors(self, kind: LayerKind) -> bool:
        """True when `init` computes A and B itself, so the kind's random init is skipped."""
        return False

    def init(self, layer: nn.Module, ad: nn.Module, init: bool | str) -> None:
        """Called once A and B exist (and the adapter is not yet in the layer)."""

    def forward(
        self,
        layer: nn.Module,
        ad: nn.Module,
        x: torch.Tensor,
        base_out: torch.Tensor,
        dropped: bool,
    ) -> torch.Tensor:
        """What the adapter adds to `base_out`; `x` has had dropout applied when `dropped`."""
        return layer.branch(ad, x, ad.scale)

    def one_op(self, layer: nn.Module, ad: nn.Module) -> OneOp | None:
        """The adapter as the kind's one-op forms take it (`LayerKind.with_branch`,
        `group_with_branch`): the layer's output is out_scale * (base op + scale * B(A(x))) when
        the adapter is the layer's only active one and sees x undropped. None where this variant
        has no such form and `forward` adds to the base output."""
        if type(self).forward is not Variant.forward:  # an update of its own: its own form
            return None
        return OneOp(ad.A, ad.B, ad.scale, None)

    def merge(self, layer: nn.Module, ad: nn.Module, W: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(out-major fp32 W with the adapter folded in, state `unmerge` needs)."""
        return W + layer.delta_weight_of(ad), None

    def unmerge(self, layer: nn.Module, ad: nn.Module, W: torch.Tensor, state: Any) -> torch.Tensor:
        return W - layer.delta_weight_of(ad)

    def to_file(
        self, layer: nn.Module, ad: nn.Module, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The tensors to write, by role ("A", "B", or a `file_keys` role)."""
        return tensors

    def file_config(self, config):
        """The LoraConfig as it must be written next to `to_file`'s tensors."""
        return config

    def check_file(
        self, kind: LayerKind, module: torch.nn.Module, parts: dict, config
    ) -> str | None:
        """Why a file's tensors for one module do not fit this variant (None: they do)."""
        return None

    def from_file(self, ad: nn.Module, parts: dict[str, torch.Tensor]) -> None:
        """Copy this variant's tensors from a file into a freshly added adapter."""

    def __repr__(self) -> str:
        return f"<LoRA variant {self.name}>"


LORA = Variant()
_VARIANTS: list[Variant] = []


def register_variant(variant: Variant) -> Variant:
    if variant not in _VARIANTS:
        _VARIANTS.append(variant)
        _VARIANTS.sort(key=lambda v: v.order)
    return variant


def registered_variants() -> list[Variant]:
    return list(_VARIANTS)


def variants_for(settings: Mapping[str, Any]) -> tuple[Variant, ...]:
    """The variants an adapter with these LoraConfig field values uses, in init order."""
    chosen = tuple(v for v in _VARIANTS if v.selected(settings))
    owners = [v.name for v in chosen if v.owns_update]
    if len(owners) > 1:
        raise ValueError(f"LoRA variants {owners} each replace the update; use one of them")
    return chosen


def resumable(config: Any) -> str | None:
    """None when a training run of an adapter with this LoraConfig (or mapping of its fields) can
    resume from a checkpoint, else the label of the variant that prevents it (e.g. "PiSSA")."""
    settings = config if isinstance(config, Mapping) else vars(config)
    return next((v.label for v in variants_for(settings) if not v.resumable), None)


def update_variant(variants: tuple[Variant, ...]) -> Variant:
    """The variant whose forward / merge / unmerge an adapter uses."""
    return next((v for v in variants if v.owns_update), LORA)
