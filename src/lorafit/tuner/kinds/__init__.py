"""Base-layer kinds LoRA can wrap, one file each; importing this package registers them all.

A new kind (e.g. a quantized linear) is a new file here that subclasses `LayerKind` and calls
`register_kind`, plus its import below.
"""

from lorafit.tuner.kinds import conv, embedding, gpt2_conv1d, linear  # noqa: F401  (registers)
from lorafit.tuner.kinds.base import LayerKind, kind_of, register_kind, registered_kinds

__all__ = ["LayerKind", "kind_of", "register_kind", "registered_kinds"]
