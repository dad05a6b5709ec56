"""ReLoRA (Lialin et al., 2023): high-rank training through a sequence of low-rank updates.

Every `train.relora.every` steps the adapter's update s·B·A is merged into the frozen base (in
fp32, so nothing is rounded away: a bf16 run keeps fp32 masters of the merged weights in CPU
memory and computes with their bf16 copy, as plain LoRA computes with a bf16 base), A is drawn afresh and B set to zero (the model's function does not
change at a restart), the Adam moments of A and B are magnitude-pruned (or zeroed), and the
learning rate climbs back over a short warmup (the jagged schedule, `optim.restart_factor`).

What the run keeps: each restart's (A, B) per layer, in fp32 (a few MB each). Checkpoints carry
them in trainer_state.pt (the base is never written): a resumed run loads the fp32 base, replays
the merges in the same order with the same arithmetic (bit-identical weights), then continues. The
saved adapter (adapter/, best_adapter/) is the whole update as ONE PEFT adapter of rank
(restarts + 1) x r, the factors laid side by side with the scale folded into B (lora_alpha = r,
scale 1), so PEFT and every lorafit command load it on the original base.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from lorafit.train.callbacks import Callback
from lorafit.train.config import ReloraOptions
from lorafit.tuner.config import LoraConfig
from lorafit.tuner.peft_format import PREFIX
from lorafit.tuner.state import lora_layers


def _delta(layer, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·B·A in the base weight's out-major layout, fp32."""
    delta = B.float().flatten(1) @ A.float().flatten(1)
    return scale * delta.reshape(layer.kind.weight_shape(layer.base_layer))


@torch.no_grad()
def merge_update(
    layer, A: torch.Tensor, B: torch.Tensor, scale: float, master: torch.Tensor | None = None
) -> None:
    """Add scale·B·A to the base weight, computing in fp32: into the layer's fp32 weight, or into
    its fp32 `master` copy, whose rounding to the layer's dtype is then written to the layer."""
    W = layer.out_major_weight() if master is None else master
    W += _delta(layer, A, B, scale).to(W.device)
    layer.write_weight(W.to(layer.device))


@torch.no_grad()
def keep_largest(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """The mask of the largest (1 - ratio) share of |t| (ties at the threshold are kept)."""
    keep = math.ceil((1 - ratio) * t.numel())
    if keep <= 0:
        return torch.zeros_like(t, dtype=torch.bool)
    threshold = torch.topk(t.abs().flatten(), keep, sorted=False).values.min()
    return t.abs() >= threshold


class Relora(Callback):
    """The restarts, the accumulated updates and the adapter that sums them (see the module)."""

    state_key = "relora"

    def __init__(self, options: ReloraOptions, init: bool | str = True):
        self.options, self.init = options, init
        self.updates: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.restarts = 0
        self.masters: dict[str, torch.Tensor] = {}  # bf16 runs: the merged weights in fp32, on CPU

    def on_fit_start(self, trainer):
        """A bf16 run computes with a bf16 copy of the base, as plain LoRA does (the model loads
        in fp32 for ReLoRA): the merged weights live on as fp32 masters in CPU memory, and each
        restart writes their rounding to bf16 into the model. Nothing is rounded away: the
        updates add up in fp32, and the saved adapter holds their factors."""
        if trainer.data.precision != "bf16" or self.masters:
            return
        name = trainer.data.adapter
        for path, layer in lora_layers(trainer.model):
            if name in layer.adapters:
                self.masters[path] = layer.out_major_weight().cpu()
        for p in trainer.model.parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)

    # --- the restart -----------------------------------------------------------------------------
    def on_step_end(self, trainer, out):
        step = trainer.state.step
        if step % self.options.every == 0 and step < trainer.total_steps:
            self.restart(trainer)

    @torch.no_grad()
    def restart(self, trainer) -> None:
        name, fresh = trainer.data.adapter, []
        for path, layer in lora_layers(trainer.model):
            if name not in layer.adapters:
                continue
            ad = layer.adapters[name]
            A, B = ad.A.detach().clone(), ad.B.detach().clone()
            merge_update(layer, A, B, ad.scale, self.masters.get(path))
            self.updates.setdefault(path, []).append((A, B))
            ad.B.zero_()
            layer.kind.init_factors(ad.A.data, ad.B.data, self.init)
            self._reset_moments(trainer.optimizer, (ad.A, ad.B))
            fresh.append(ad.A)
        trainer.dist.broadcast_parameters(fresh)  # one new A on every rank (rank 0's draw)
        self.restarts += 1

    def _reset_moments(self, optimizer, params) -> None:
        """Zero Adam's moments, or keep both where the second moment is largest: one mask for
        both, because a first moment kept where the second is pruned would step by m / eps."""
        for p in params:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                continue
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if self.options.reset == "zero":
                m.zero_(), v.zero_()
            else:
                mask = keep_largest(v, self.options.prune_ratio).to(v.dtype)
                m.mul_(mask), v.mul_(mask)

    # --- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "restarts": self.restarts,
            "A": {path: [a.cpu() for a, _ in ups] for path, ups in self.updates.items()},
            "B": {path: [b.cpu() for _, b in ups] for path, ups in self.updates.items()},
        }

    def load_state_dict(self, trainer, state: dict) -> None:
        """Replay the saved restarts' merges into the freshly loaded base, in order."""
        layers = dict(lora_layers(trainer.model))
        name = trainer.data.adapter
        missing = sorted(set(state["A"]) - set(layers))
        if missing:
            raise ValueError(
                f"the checkpoint's ReLoRA updates name layers this model lacks: {missing[0]}"
            )
        self.restarts = int(state["restarts"])
        self.updates = {}
        for path, As in state["A"].items():
            layer = layers[path]
            device = layer.adapters[name].A.device
            ups = [(a.to(device), b.to(device)) for a, b in zip(As, state["B"][path])]
            self.updates[path] = ups
        for i in range(self.restarts):  # restart by restart, as the run merged them
            for path, ups in self.updates.items():
                layer = layers[path]
                A, B = ups[i]
                merge_update(layer, A, B, layer.adapters[name].scale)

    # --- the product -----------------------------------------------------------------------------
    def edit_adapter(self, trainer):
        """save_adapter's edit: the live adapter plus every merged update, as one adapter."""

        def edit(tensors: dict[str, torch.Tensor], config: LoraConfig):
            if not self.restarts:
                return tensors, config
            layers = dict(lora_layers(trainer.model))
            name = trainer.data.adapter
            out = dict(tensors)
            for path, ups in self.updates.items():
                layer = layers[path]
                ad = layer.adapters[name]
                key_a, key_b = (f"{PREFIX}{path}.{k}" for k in layer.kind.peft_keys)
                As = [a for a, _ in ups] + [ad.A.detach()]
                Bs = [b for _, b in ups] + [ad.B.detach()]
                out[key_a] = torch.cat([a.float().cpu() for a in As], dim=0).contiguous()
                out[key_b] = (
                    ad.scale * torch.cat([b.float().cpu() for b in Bs], dim=1)
                ).contiguous()
            rank = (self.restarts + 1) * config.r
            return out, dataclasses.replace(config, r=rank, lora_alpha=rank, use_rslora=False)

        return edit
