"""nn.Conv1d / Conv2d / Conv3d: weight (out, in, *k).

As in PEFT, A is a convolution like the base (r, in, *k) with its stride and padding, and B is a
1x1 convolution (out, r, 1, ...). Grouped (depthwise) and dilated convolutions are refused: PEFT's
grouped-conv LoRA is a dense branch, not a low-rank update of the grouped weight, so it cannot
merge (and needs r divisible by groups); any padding_mode but zeros is refused too: the branch
pads with zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.tuner.kinds.base import LayerKind, register_kind

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvKind(LayerKind):
    name = "conv"
    label = "nn.Conv1d/2d/3d"
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def check(self, module: nn.modules.conv._ConvNd) -> None:
        if module.groups != 1 or any(d != 1 for d in module.dilation):
            raise TypeError(
                "LoRA on grouped or dilated convolutions is not supported: for a grouped one "
                "(e.g. depthwise) PEFT adds a dense branch that is no low-rank update of the "
                "grouped weight (it cannot merge, and needs r divisible by groups: r >= channels "
                "for depthwise); target the full / pointwise convolutions, and train a depthwise "
                "one (C x k x k weights) in full with modules_to_save if it must change"
            )
        if module.padding_mode != "zeros":
            raise TypeError("LoRA on convolutions needs padding_mode='zeros'")

    def fan_dims(self, module) -> tuple[int, int]:
        return module.in_channels, module.out_channels

    def adapter_shapes(self, module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kernel = tuple(module.kernel_size)
        return (r, module.in_channels, *kernel), (module.out_channels, r, *(1,) * len(kernel))

    def magnitude_shape(self, module) -> tuple[int, ...]:
        return (1, module.out_channels) + (1,) * len(module.kernel_size)  # PEFT's layout

    def weight(self, module) -> torch.Tensor:
        return module.weight  # (out, in, *k): already out-major

    def write_weight(self, module, w: torch.Tensor) -> None:
        module.weight.data.copy_(w.to(module.weight.dtype))

    def branch(self, module, x, A, B) -> torch.Tensor:
        conv = _CONV[len(module.kernel_size)]
        h = conv(x, A, stride=module.stride, padding=module.padding)  # (N, r, *spatial)
        return conv(h, B)  # (N, out, *spatial)

    def base_op(self, module, x, w, bias: bool = True) -> torch.Tensor:
        b = module.bias if bias else None
        conv = _CONV[len(module.kernel_size)]
        return conv(x, w.to(module.weight.dtype), b, module.stride, module.padding)

    def per_output(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *(1,) * (out.dim() - 2))  # channels are dim 1 of (N, out, *spatial)

    def probe(self, module, gen: torch.Generator) -> torch.Tensor:
        w = module.weight
        spatial = [2 * k + 1 for k in module.kernel_size]
        x = torch.randn(2, module.in_channels, *spatial, generator=gen)  # (2, in, *spatial)
        return x.to(w.device, w.dtype)


CONV = register_kind(ConvKind())
