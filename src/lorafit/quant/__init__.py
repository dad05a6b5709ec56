"""Quantized frozen weights for QLoRA: `QuantizedLinear` (NF4 or int8) and the backends that
store and dequantize them (bitsandbytes, torchao), picked per device by measurement."""

from lorafit.quant.backends import (
    PREFERRED,
    SCHEMES,
    Backend,
    backends_for,
    import_libraries_quietly,
    pick_backend,
)
from lorafit.quant.linear import (
    QuantizedLinear,
    dequantize_model,
    is_quantized,
    quantizable,
    quantize_model,
    quantized_modules,
)

# Every use of the LoRA core passes here before transformers' model code is imported (the tuner
# imports it); transformers imports torchao itself when installed, which would print its kernel
# notices ("Failed to load ..._C_mxfp8...so").
import_libraries_quietly()

__all__ = [
    "PREFERRED",
    "SCHEMES",
    "Backend",
    "QuantizedLinear",
    "backends_for",
    "dequantize_model",
    "is_quantized",
    "pick_backend",
    "quantizable",
    "quantize_model",
    "quantized_modules",
]
