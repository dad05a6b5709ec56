"""A quantized frozen linear (lorafit.quant.QuantizedLinear, NF4 or int8): QLoRA's base layer.

LoRA's branch is the plain linear one and trains in the adapter's dtype; the base is read only by
dequantizing it. Writing into it (merge in place, PiSSA's residual) is refused: merging a QLoRA
adapter first dequantizes the whole model (`lorafit.quant.dequantize_model`), then merges in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.quant import QuantizedLinear
from lorafit.tuner.kinds.base import LayerKind, register_kind


class QuantizedLinearKind(LayerKind):
    name = "quantized-linear"
    label = "QuantizedLinear (NF4 / int8)"
    module_types = (QuantizedLinear,)
    all_linear = True
    quantized = True

    def fan_dims(self, module: QuantizedLinear) -> tuple[int, int]:
        return module.in_features, module.out_features

    def device(self, module: QuantizedLinear) -> torch.device:
        return module.device

    def compute_dtype(self, module: QuantizedLinear) -> torch.dtype:
        return module.compute_dtype

    def weight_shape(self, module: QuantizedLinear) -> torch.Size:
        return torch.Size((module.out_features, module.in_features))

    def weight(self, module: QuantizedLinear) -> torch.Tensor:
        return module.dequantize()  # (out, in), compute dtype: a new tensor on every call

    def write_weight(self, module: QuantizedLinear, w: torch.Tensor) -> None:
        raise ValueError(
            f"cannot write into a {module.scheme}-quantized base weight; dequantize the model "
            "first (lorafit.quant.dequantize_model; `lorafit merge` does this)"
        )

    def weight_version(self, module: QuantizedLinear) -> tuple:
        first = next(b for b in module._buffers.values() if b is not None)
        return (id(first), first._version)

    def branch(self, module: QuantizedLinear, x, A, B) -> torch.Tensor:
        return F.linear(F.linear(x, A), B)  # (..., in) -> (..., r) -> (..., out)

    def base_op(self, module: QuantizedLinear, x, w, bias: bool = True) -> torch.Tensor:
        b = module.bias if bias else None
        dtype = module.compute_dtype
        return F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype))

    def probe(self, module: QuantizedLinear, gen: torch.Generator) -> torch.Tensor:
        x = torch.randn(8, module.in_features, generator=gen)  # (8, in)
        return x.to(module.device, module.compute_dtype)


QUANTIZED_LINEAR = register_kind(QuantizedLinearKind())
