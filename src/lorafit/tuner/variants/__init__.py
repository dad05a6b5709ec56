"""LoRA variants as hook objects (plain LoRA = the defaults); importing this package registers
them all. A new variant is a new file here that subclasses `Variant` and calls
`register_variant`, plus its import below."""

from lorafit.tuner.variants import dora, pissa  # noqa: F401  (registers)
from lorafit.tuner.variants.base import (
    LORA,
    OneOp,
    Variant,
    register_variant,
    registered_variants,
    resumable,
    update_variant,
    variants_for,
)

__all__ = [
    "LORA",
    "OneOp",
    "Variant",
    "register_variant",
    "registered_variants",
    "resumable",
    "update_variant",
    "variants_for",
]
