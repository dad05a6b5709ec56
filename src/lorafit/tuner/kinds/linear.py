"""nn.Linear: weight (out, in), y = x W^T + b."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.tuner.kinds.base import LayerKind, register_kind


class LinearKind(LayerKind):
    name = "linear"
    label = "nn.Linear"
    module_types = (nn.Linear,)
    all_linear = True
    gguf_lora = True
    svd_init = True
    plain_linear = True

    def fan_dims(self, module: nn.Linear) -> tuple[int, int]:
        return module.in_features, module.out_features

    def weight(self, module: nn.Linear) -> torch.Tensor:
        return module.weight  # (out, in): already out-major

    def write_weight(self, module: nn.Linear, w: torch.Tensor) -> None:
        module.weight.data.copy_(w.to(module.weight.dtype))

    def branch(self, module: nn.Linear, x, A, B) -> torch.Tensor:
        return F.linear(F.linear(x, A), B)  # (..., in) -> (..., r) -> (..., out)

    def base_op(self, module: nn.Linear, x, w, bias: bool = True) -> torch.Tensor:
        b = module.bias if bias else None
        return F.linear(x, w.to(module.weight.dtype), b)  # (..., out)

    def probe(self, module: nn.Linear, gen: torch.Generator) -> torch.Tensor:
        w = module.weight
        return torch.randn(8, module.in_features, generator=gen).to(w.device, w.dtype)  # (8, in)


LINEAR = register_kind(LinearKind())
