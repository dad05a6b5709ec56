"""Base-layer kinds LoRA can wrap, one file each; importing this package registers them all.

A new kind is a new file here that subclasses `LayerKind` and calls
`register_kind`, plus its import below.
"""

from lorafit.tuner.kinds import (  # noqa: F401  (registers)
    conv,
    embedding,
    gpt2_conv1d,
    linear,
    quantized,
)
from lorafit.tuner.kinds.base import LayerKind, kind_of, register_kind, registered_kinds

__all__ = ["LayerKind", "kind_of", "register_kind", "registered_kinds"]
