"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for `train.distributed: fsdp`: each decoder layer's
parameters (the frozen base and the LoRA weights in it) are sharded over the ranks and gathered
for its forward and backward; the embedding, the final norm and the head stay whole on every rank
(the chunked LM loss calls them outside the model's forward, where FSDP's hooks sit).

Gradients of the sharded LoRA weights are reduce-scattered by FSDP with a SUM (the loss is already
weighted by the job's target tokens), only after a step's last micro-batch; the few whole trainable
tensors outside the layers go through `Dist.reduce_gradients`. Checkpoints hold full tensors
(gathered on every rank, written by rank 0), so they resume under DDP, FSDP or one process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from lorafit.train.distributed import Dist


def _dtensor():
    """torch's DTensor API, imported when FSDP is used (not at every trainer's start-up)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    return DTensor, distribute_tensor


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList of num_hidden_layers blocks)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return module
    raise ValueError(
        f"train.distributed: fsdp needs a model with a stack of decoder layers; "
        f"{type(model).__name__} has none that it recognises: use train.distributed: ddp"
    )


QUANTIZED = (
    "train.distributed: fsdp does not shard a quantized base (its nf4 / int8 tensors are not "
    "parameters FSDP2 can split); use train.distributed: ddp with model.quantize"
)


def shard(model: nn.Module, dist: Dist) -> list[nn.Module]:
    """fully_shard every decoder layer (not a quantized base: see QUANTIZED); returns them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dist._device().type, (dist.world_size,))
    layers = list(decoder_layers(model))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
        layer.set_gradient_divide_factor(1.0)  # a sum: the loss carries the global weights
        layer.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return layers


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of weights this rank holds, bytes of the whole model's weights)."""
    here = whole = 0
    for p in model.parameters():
        size = p.element_size()
        whole += p.numel() * size
        here += (p.to_local().numel() if is_sharded(p) else p.numel()) * size
    return here, whole


def is_sharded(p: torch.Tensor) -> bool:
    return isinstance(p, _dtensor()[0])


@contextlib.contextmanager
def gradient_sync(layers: list[nn.Module], enabled: bool) -> Iterator[None]:
    """Within: the sharded layers reduce their gradients in backward only when `enabled`."""
    for layer in layers:
        layer.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_requires_gradient_sync(True)


def clip_gradients(params: list[torch.Tensor], max_norm: float | None, dist: Dist) -> torch.Tensor:
    """Global gradient norm over sharded (DTensor) and whole gradients; clip to max_norm."""
    sharded, whole = 0.0, 0.0
    for p in params:
        if p.grad is None:
            continue
        if is_sharded(p.grad):
            sharded += float(p.grad.to_local().double().pow(2).sum())
        else:
            whole += float(p.grad.double().pow(2).sum())
    total = math.sqrt(dist.sum([sharded])[0] + whole)  # whole gradients are the same everywhere
    if max_norm is not None and math.isfinite(total) and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return torch.tensor(total)


@contextlib.contextmanager
def full_parameters(layers: list[nn.Module]) -> Iterator[None]:
    """Within: every sharded layer holds its whole parameters (gathered on every rank)."""
    for layer in layers:
        layer.unshard()
    try:
        yield
    finally:
        for layer in layers:
            layer.reshard()


def full_optimizer_state(state: dict) -> dict:
    """An optimizer state_dict with every sharded tensor gathered whole (call on every rank)."""
    DTensor, _ = _dtensor()
    out = {"param_groups": state["param_groups"], "state": {}}
    for key in sorted(state["state"]):
        out["state"][key] = {
            k: (v.full_tensor() if isinstance(v, DTensor) else v)
            for k, v in state["state"][key].items()
        }
    return out


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict of a full state: split each state tensor like its parameter."""
    DTensor, distribute_tensor = _dtensor()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    optimizer.state[p][k] = distribute_tensor(
                        v.to(p.dtype), p.device_mesh, p.placements
                    )
