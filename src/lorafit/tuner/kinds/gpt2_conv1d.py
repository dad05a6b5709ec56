"""GPT-2's Conv1D (transformers.pytorch_utils): a linear layer whose weight is stored (in, out)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from lorafit.tuner.kinds.base import LayerKind, register_kind


class GPT2Conv1DKind(LayerKind):
    name = "gpt2_conv1d"
    label = "transformers Conv1D"
    module_types = (Conv1D,)
    all_linear = True
    fan_in_fan_out = True
    svd_init = True

    def fan_dims(self, module: Conv1D) -> tuple[int, int]:
        return module.nx, module.nf

    def weight(self, module: Conv1D) -> torch.Tensor:
        return module.weight.T  # stored (in, out) -> (out, in)

    def write_weight(self, module: Conv1D, w: torch.Tensor) -> None:
        module.weight.data.copy_(w.T.to(module.weight.dtype))

    def branch(self, module: Conv1D, x, A, B) -> torch.Tensor:
        return F.linear(F.linear(x, A), B)  # (..., in) -> (..., r) -> (..., out)

    def base_op(self, module: Conv1D, x, w, bias: bool = True) -> torch.Tensor:
        b = module.bias if bias else None
        return F.linear(x, w.to(module.weight.dtype), b)  # (..., out)

    def probe(self, module: Conv1D, gen: torch.Generator) -> torch.Tensor:
        w = module.weight
        return torch.randn(8, module.nx, generator=gen).to(w.device, w.dtype)  # (8, in)


GPT2_CONV1D = register_kind(GPT2Conv1DKind())
