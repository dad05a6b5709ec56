"""The base weights the lean decoding step multiplies by: the model's own, or 4-bit copies.

Decoding one token reads every weight of the model once, so on a CPU a single stream is bound
by memory traffic: SmolLM2-135M in fp32 is 540 MB per token. `--decode-weights int4` decodes
with what llama.cpp decodes its Q4_1 files with:
- the seven projections of every layer in 4 bits, groups of 32 inputs with their own scale and
  offset, w = (q - 8) * scale + offset (torchao quantizes, torch's `_weight_int4pack_mm_for_cpu`
  multiplies with bf16 activations);
- the output head in 8 bits, one scale per vocabulary row (`_weight_int8pack_mm`),
~1/4.5 of the fp32 bytes. A base that came from a Q4_1 GGUF is re-expressed almost exactly (its
groups are the same 32 inputs); others are rounded to 4 bits like any 4-bit model. The residual
stream, norms, attention, the LoRA factors and the prefill stay in the model's dtype, so the
answers are close to, not bit-identical with, float decoding (benchmarks/decode_step.py counts
the greedy tokens that agree). CPU only: the int4 kernel is torch's CPU one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.quant.backends import quiet_import
from lorafit.tuner.kinds import kind_of

GROUP = 32
"""Inputs per 4-bit group (llama.cpp's Q4_0 / Q4_1 block)."""

FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
"""Projections that read the same input, multiplied as one (their outputs side by side)."""


class FloatWeights:
    """The modules' own weights, as the model computes with them."""

    name = "float"

    def __init__(self, model: nn.Module, projections: list[dict[str, nn.Module]]):
        # per layer {projection or FUSED group: ((weight, bias) per member)}
        self.layers = [
            {
                name: tuple((per[p].weight, per[p].bias) for p in members)
                for name, members in layer_groups(per).items()
            }
            for per in projections
        ]
        self.head_module = model.lm_head

    @staticmethod
    def linear(x: torch.Tensor, w: tuple) -> torch.Tensor:
        """x W^T with one entry of `layers[i]`: a FUSED group's outputs side by side."""
        ys = [F.linear(x, weight, bias) for weight, bias in w]
        return ys[0] if len(ys) == 1 else torch.cat(ys, -1)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_module(x)  # (S, vocab)


class Int4Weights:
    """4-bit projections and an 8-bit head, made once from the model's weights (which stay, for
    the prefill)."""

    name = "int4"

    def __init__(self, model: nn.Module, projections: list[dict[str, nn.Module]]):
        if next(model.parameters()).device.type != "cpu":
            raise ValueError(
                "--decode-weights int4 runs on CPU (torch's int4 kernel is a CPU one); on a GPU "
                "decode with --dtype bfloat16"
            )
        for per in projections:
            for p, m in per.items():
                if m.in_features % GROUP:
                    raise ValueError(
                        f"--decode-weights int4 needs {GROUP}-input groups; {p} has "
                        f"{m.in_features} inputs"
                    )
        kind = kind_of(model.lm_head)
        if kind is None or not kind.plain_linear:
            raise ValueError(
                f"--decode-weights int4 needs a plain linear output head; this model's is a "
                f"{type(model.lm_head).__name__}"
            )
        # per layer {projection or FUSED group: (packed, scale and offset, bias)}
        self.layers = [
            {name: _int4([per[p] for p in members]) for name, members in layer_groups(per).items()}
            for per in projections
        ]
        ao = quiet_import("torchao.quantization")
        w = model.lm_head.weight.detach()
        t = ao.Int8Tensor.from_hp(w.float().contiguous(), ao.PerRow())
        self.head_weights = (t.qdata, t.scale.reshape(-1).to(torch.bfloat16), model.lm_head.bias)

    @staticmethod
    def linear(x: torch.Tensor, w: tuple) -> torch.Tensor:
        packed, scale_offset, bias = w
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), packed, GROUP, scale_offset
        ).to(x.dtype)  # (S, out)
        return y if bias is None else y + bias

    def head(self, x: torch.Tensor) -> torch.Tensor:
        q, scale, bias = self.head_weights
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale).to(x.dtype)
        return y if bias is None else y + bias  # (S, vocab)


def layer_groups(projections: dict[str, nn.Module]) -> dict[str, tuple[str, ...]]:
    """{projection or FUSED group: its member projections} for one layer."""
    grouped = {p for members in FUSED.values() for p in members}
    return {**{p: (p,) for p in projections if p not in grouped}, **FUSED}


def _int4(modules: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The modules' weights stacked along the outputs, as (packed (out, in / 2) uint8, scale and
    offset (in / GROUP, out, 2) bf16, bias or None)."""
    Int4 = quiet_import("torchao.prototype.quantization.int4.int4_opaque_tensor").Int4OpaqueTensor
    w = torch.cat([m.weight.detach().float() for m in modules])  # (out, in)
    # qparams chosen in fp32, then rounded once to the kernel's bf16
    t = Int4.from_hp(w.contiguous(), [1, GROUP])
    biases = [m.bias for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b.detach() if b is not None else m.weight.new_zeros(m.out_features)
                for b, m in zip(biases, modules)
            ]
        )
    return t.qdata, t.scale_and_zero.to(torch.bfloat16), bias


WEIGHTS = {w.name: w for w in (FloatWeights, Int4Weights)}
"""`--decode-weights` choices."""
