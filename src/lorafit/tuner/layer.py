"""The LoRA layer: a frozen base module plus any number of named low-rank updates.

    y = base(x) + scale * B(A(dropout(x)))          scale = alpha / r  (alpha / sqrt(r): rsLoRA)

One class, `LoraLayer`, serves every registered base-layer *kind* (`kinds/`: nn.Linear, GPT-2
Conv1D, nn.Embedding, nn.ConvNd). What differs between them (shapes, the branch, the out-major
weight view and its write-back) is a method of the kind; what differs between LoRA *variants*
(`variants/`: DoRA, PiSSA) is a hook of the variant. Everything here (several adapters, merge,
per-row adapters) is written once against those two interfaces and the out-major view (rows =
output features).

Tensor shapes follow PEFT's so adapter files map one to one:
    linear / gpt2 Conv1D: A (r, d_in)            B (d_out, r)
    embedding:            A (r, num_embeddings)  B (embedding_dim, r)
    conv:                 A (r, c_in, *k)        B (c_out, r, 1, ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.tuner.config import lora_scale
from lorafit.tuner.kinds import kind_of
from lorafit.tuner.rows import Rows, current_rows
from lorafit.tuner.variants import OneOp, Variant, update_variant, variants_for


class LoraAdapter(nn.Module):
    """One adapter's tensors inside one LoraLayer (variants may add more, e.g. DoRA's magnitude)."""

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
        dropout: float,
        r: int,
        alpha: float,
        variants: Sequence[Variant] = (),
    ):
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.scale, self.dropout, self.r, self.alpha = scale, dropout, r, alpha
        self.variants = tuple(variants)
        self.update = update_variant(self.variants)  # whose forward / merge / unmerge apply
        self.merge_state: Any = None  # what the update's unmerge needs, captured at merge


class LoraLayer(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        kind = kind_of(base_layer)
        if kind is None:
            raise TypeError(f"cannot wrap {type(base_layer).__name__}")
        kind.check(base_layer)
        self.base_layer = base_layer
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.variant_cache: dict[str, Any] = {}  # variants' caches of frozen-weight statistics

    # --- geometry ------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:  # transformers sometimes reads module.weight (e.g. tying)
        return self.base_layer.weight

    def dims(self) -> tuple[int, int]:
        """(fan_in, fan_out) as the A and B shapes see them."""
        return self.kind.fan_dims(self.base_layer)

    @property
    def device(self) -> torch.device:
        return self.kind.device(self.base_layer)

    def out_major_weight(self) -> torch.Tensor:
        """The base weight with rows = output features, in fp32 (a copy)."""
        return self.kind.weight(self.base_layer).detach().float().clone()

    def write_weight(self, w: torch.Tensor) -> None:
        """Store an out-major weight into the base module (cast to its dtype)."""
        self.kind.write_weight(self.base_layer, w)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * B A in the out-major layout of the base weight, fp32."""
        return self.delta_weight_of(self.adapters[name])

    def delta_weight_of(self, ad: LoraAdapter) -> torch.Tensor:
        A, B = ad.A.detach().float(), ad.B.detach().float()
        delta = B.flatten(1) @ A.flatten(1)  # (out, r) @ (r, in * prod(k)) -> (out, in')
        shape = self.kind.weight_shape(self.base_layer)
        return ad.scale * delta.reshape(shape)

    # --- adapters ------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        init: bool | str = True,
        variants: Sequence[Variant] | None = None,
    ) -> None:
        """Add adapter `name` with the variants the registry chose (`variants_for(config)`);
        None: those these arguments select (by their LoraConfig field names)."""
        if variants is None:
            variants = variants_for(
                {
                    "r": r,
                    "lora_alpha": alpha,
                    "lora_dropout": dropout,
                    "use_rslora": rslora,
                    "init_lora_weights": init,
                }
            )
        for variant in variants:
            variant.check(self.kind, self.base_layer)
        a_shape, b_shape = self.kind.adapter_shapes(self.base_layer, r)
        # Trainable tensors stay fp32 even on a half-precision base: tiny, and Adam needs the range.
        A = torch.empty(a_shape, dtype=torch.float32, device=self.device)
        B = torch.zeros(b_shape, dtype=torch.float32, device=self.device)
        if not any(v.sets_factors(self.kind) for v in variants):
            self.kind.init_factors(A, B, init)
        scale = lora_scale(alpha, r, rslora)
        ad = LoraAdapter(A, B, scale, dropout, r, alpha, variants)
        for variant in ad.variants:
            variant.init(self, ad, init)
        self.adapters[name] = ad

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not (self.disabled or args or kwargs):
            one = self._with_branch(x)
            if one is not None:
                return one
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or not self.adapters:
            return result
        rows = current_rows()
        if rows is not None:
            return self._forward_rows(x, result, rows)
        base_out = result
        for name in self.active:
            if name in self.merged or name not in self.adapters:
                continue
            result = result + self.adapter_out(self.adapters[name], x, base_out)
        return result

    def _with_branch(self, x: torch.Tensor) -> torch.Tensor | None:
        """The base op and the one active adapter as one (its update variant's `one_op`, through
        the kind's `with_branch`), or None: see `one_branch`."""
        op = self.one_branch()
        return None if op is None else self.kind.with_branch(self.base_layer, x, *op)

    def _single(self) -> LoraAdapter | None:
        """The adapter when this layer's output is its base op plus one active adapter on the
        undropped input with a scalar scale; None for several adapters, per-row adapters, dropout
        in training, a per-output scale, or a disabled / merged adapter."""
        if len(self.active) != 1 or self.disabled or current_rows() is not None:
            return None
        name = self.active[0]
        ad = self.adapters[name] if name in self.adapters else None
        if (
            ad is None
            or name in self.merged
            or torch.is_tensor(ad.scale)
            or (ad.dropout > 0 and self.training and self.kind.dropout)
        ):
            return None
        return ad

    def one_branch(self) -> OneOp | None:
        """The adapter as (A, B, scale, per-output scale) when this layer's output is its base
        op plus one branch, scaled per output or not (`_single`, and its update variant's
        `one_op`: plain LoRA, DoRA); else None."""
        ad = self._single()
        return None if ad is None else ad.update.one_op(self, ad)

    def _forward_rows(self, x: torch.Tensor, result: torch.Tensor, rows: Rows) -> torch.Tensor:
        """A mixed batch: row i gets adapter rows.names[i] ("__base__": none)."""
        if self.merged:
            raise RuntimeError("per-row adapters need unmerged weights: call unmerge() first")
        if len(rows) != x.shape[0]:
            raise ValueError(f"got {len(rows)} adapter names for a batch of {x.shape[0]}")
        if len(rows.groups) == 1:  # one adapter (or none) for the whole batch: no indexing
            (name,) = rows.groups
            if name not in self.adapters:
                return result
            return result + self.adapter_out(self.adapters[name], x, result)
        if rows.spans is not None and not torch.is_grad_enabled():
            # rows sorted by adapter, inference: add each group's update into its slice in place
            for name, span in rows.spans.items():
                if name in self.adapters:
                    part = result[span]
                    part += self.adapter_out(self.adapters[name], x[span], part)
            return result
        result = result.clone()
        for name in rows.groups:
            if name not in self.adapters:
                continue  # "__base__" rows, or an adapter that does not touch this layer
            idx = rows.indices(name, x.device)  # (n,)
            ad = self.adapters[name]
            result[idx] = result[idx] + self.adapter_out(ad, x[idx], result[idx])
        return result

    def adapter_out(self, ad: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter `ad` adds to the base output `base_out` of input `x`."""
        dropped = ad.dropout > 0 and self.training and self.kind.dropout
        xd = F.dropout(x, ad.dropout, training=True) if dropped else x
        return ad.update.forward(self, ad, xd, base_out, dropped)

    def branch(self, ad: LoraAdapter, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """scale * B(A(x)), scale a scalar or per-output (out,). The scale is folded into B (an
        (out, r) multiply) rather than applied to the (..., out) result: one full-size op less
        each way."""
        dtype = x.dtype if x.is_floating_point() else ad.A.dtype  # ids (embeddings) stay ids
        B = ad.B.to(dtype)
        if torch.is_tensor(scale):
            B = B * scale.to(dtype).view(-1, *(1,) * (B.dim() - 1))  # (out, r, ...)
        else:
            B = B * scale
        return self.kind.branch(self.base_layer, x, ad.A.to(dtype), B)

    def base_output(
        self, x: torch.Tensor, w_out_major: torch.Tensor, bias: bool = True
    ) -> torch.Tensor:
        """The base op run with another weight (given out-major): for probes and DoRA."""
        return self.kind.base_op(self.base_layer, x, w_out_major, bias)

    # --- merge ---------------------------------------------------------------------------------
    def merged_weight(self, names: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The out-major fp32 weight with `names` folded in (nothing is written), and what each
        adapter's unmerge will need. Raises FloatingPointError on NaN/inf."""
        W, states = self.out_major_weight(), {}
        for name in names:
            ad = self.adapters[name]
            W, states[name] = ad.update.merge(self, ad, W)
            if not torch.isfinite(W).all():
                raise FloatingPointError(
                    f"merging adapter {name!r} would put NaN/inf in the weights"
                )
        return W, states

    def merge(self, names: list[str]) -> None:
        """Fold adapters into the base weight, computing in fp32. Idempotent per adapter."""
        todo = [n for n in names if n in self.adapters and n not in self.merged]
        if not todo:
            return
        W, states = self.merged_weight(todo)
        self.write_weight(W)
        for name in todo:
            self.adapters[name].merge_state = states[name]
        self.merged += todo

    def unmerge(self) -> None:
        """Undo merges, newest first."""
        W = self.out_major_weight()
        while self.merged:
            ad = self.adapters[self.merged.pop()]
            W = ad.update.unmerge(self, ad, W, ad.merge_state)
            ad.merge_state = None
        self.write_weight(W)


# ---------------------------------------------------------------- layers sharing one input --
def join_shared_input(layers: Sequence[nn.Module]) -> bool:
    """Prepare LoRA layers that always read the same input (a block's q / k / v, an MLP's gate /
    up) for `shared_input_forward`: their kind joins the frozen base weights into one tensor."""
    if len(layers) < 2 or not all(isinstance(m, LoraLayer) for m in layers):
        return False
    if len({m.kind for m in layers}) != 1:
        return False
    return layers[0].kind.join([m.base_layer for m in layers])


def shared_input_forward(
    layers: Sequence[nn.Module], x: torch.Tensor, joined: bool = False
) -> tuple[torch.Tensor, ...] | torch.Tensor | None:
    """(layer(x) for layer in layers) computed as one op (the kind's `group_with_branch`), or
    None, when any of them is not a base op plus one branch (`one_branch`) right now: the
    caller then calls each layer. `joined`: the outputs side by side as one (..., sum out)
    tensor instead (one gradient for all of them in backward)."""
    if not all(isinstance(m, LoraLayer) for m in layers):
        return None
    factors = [m.one_branch() for m in layers]
    if any(f is None for f in factors):
        return None
    return layers[0].kind.group_with_branch([m.base_layer for m in layers], x, factors, joined)
