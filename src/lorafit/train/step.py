"""One optimizer step's arithmetic, shared by the trainer and benchmarks/peft_vs_lorafit.py (so what
the benchmark measures is what training runs): the lean model setup, the micro-batch stream, and
forward + backward over a step's micro-batches."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from lorafit.data.batching import batches, num_batches
from lorafit.models import heap
from lorafit.ops.attention import attention_kernel
from lorafit.ops.fused import set_fusion
from lorafit.ops.lean_blocks import patch_model
from lorafit.ops.precision import autocast_context
from lorafit.quant import quantized_modules
from lorafit.tasks import Task, get_task
from lorafit.tuner.kinds import kind_of
import lorafit.train.fsdp as fsdp
from lorafit.train.distributed import Dist

ONEDNN_CACHE = "256"
"""oneDNN's primitive cache capacity for training processes (its default: 1,024). oneDNN keeps a
compiled primitive per matmul shape. Padding-free rows come in multiples of 64 tokens and the
loss's labelled rows in multiples of 32 (ops/lm_loss.py), so a run meets a few dozen shapes per
token count: 256 holds them (creating a primitive costs 0.5-10 ms). An unbounded cache grows with
the attention's per-document shapes (a new set each step): before the row padding, the default
peaked ~100 MB higher in a 26-step SmolLM2 run; 16 halved the
speed; 256 vs 128 (24 steps in process, 3 interleaved pairs): 0.9% faster, peak 25 MB lower.
Read when oneDNN creates its first primitive, so it is set here, before the model's first matmul;
a value the user set is kept."""
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE)


def prepare_for_training(
    model: nn.Module,
    precision: str,
    gradient_checkpointing: bool = False,
    recompute_mlp: bool = True,
    fused_kernels: bool = True,
    frozen_bf16: bool = True,
) -> None:
    """The lean setup `train` uses (and the benchmark measures).

    With bf16, every frozen weight is stored in bf16 once; the trainable adapter (and any fully
    trained module) stays fp32 and autocast runs the matmuls in bf16. Autocast alone would cast each
    frozen fp32 weight on every call (it caches casts only for weights that require grad) and keep a
    fp32 residual stream, so the model would pay for a bf16 copy of every weight per step, save
    those copies for backward, and convert activations back and forth around every norm, residual
    add and rotary embedding. Storing the frozen model in bf16 removes all of that: half the weight
    memory, half the activation memory of the residual stream, far fewer element-wise casts. The
    loss moves by ~0.05% relative at step 1 on SmolLM2 (measured by benchmarks/peft_vs_lorafit.py).
    RMSNorm and SwiGLU blocks get the lean autograd functions of `ops/lean_blocks.py`; with
    `recompute_mlp` the SwiGLU output is recomputed in backward rather than kept (moot under
    checkpointing). `fused_kernels` runs their element-wise math as compiled kernels
    (`ops/fused.py`) rather than eager torch ops. `frozen_bf16=False` keeps the frozen weights
    in their dtype (ReLoRA merges into them)."""
    set_fusion(fused_kernels)
    if precision == "bf16" and frozen_bf16:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue  # its fp32 running statistics need fp32 weights (and are tiny)
            for p in module.parameters(recurse=False):
                if not p.requires_grad and p.dtype == torch.float32:
                    p.data = p.data.to(torch.bfloat16)
    patch_model(model, recompute_swiglu=recompute_mlp and not gradient_checkpointing)
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for _, layer in quantized_modules(model):  # the recompute's dequantized weight serves
            layer.keep_dequantized = True  # its backward: 2 dequantizations per step, not 3
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    setattr(model, _ROW_BYTES, _activation_row_bytes(model, precision))


_ROW_BYTES = "_lorafit_activation_row_bytes"


def _activation_row_bytes(model: nn.Module, precision: str) -> int:
    """Bytes per token of the widest linear layer's output in a step (the output head aside: its
    logits come in loss chunks), for `_keep_large_blocks`; 0 where the heap's mmap cap stays: off
    CPU (CUDA has its own caching allocator) and for quantized bases (each forward's dequantized
    weights are large freed blocks too; the cap was measured there, `models/heap.py`)."""
    device = next(model.parameters()).device
    if device.type != "cpu" or quantized_modules(model):
        return 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    widths = [
        kind.fan_dims(m)[1]
        for m in model.modules()
        if m is not head and (kind := kind_of(m)) is not None and kind.all_linear
    ]
    return max(widths, default=0) * (2 if precision == "bf16" else 4)


def _keep_large_blocks(model: nn.Module, ids: torch.Tensor) -> None:
    """Once a batch's widest activation reaches glibc's mmap cap (8 MiB), the heap keeps large
    freed blocks for the next step instead of unmapping them (`heap.keep_large_blocks`; the
    trainer ends it after its steps): such activations fault their pages in again on every use."""
    row_bytes = getattr(model, _ROW_BYTES, 0)
    if row_bytes and ids.numel() * row_bytes >= heap.MMAP_THRESHOLD_BYTES:
        heap.keep_large_blocks()


def forward_backward(
    model: nn.Module,
    group: Sequence[dict[str, torch.Tensor]],
    task: str | Task,
    precision: str,
    chunk: int = 2048,
    max_grad_norm: float | None = None,
    dist: Dist | None = None,
) -> tuple[float, torch.Tensor]:
    """One optimizer step's gradients over micro-batches (weighted by their loss targets, so
    accumulation equals one big batch); returns (loss, gradient norm before clipping; the
    gradients are clipped to max_grad_norm in place). `task` is a Task or its name.

    With `dist` (several processes, each with its shard of the step's batches) the weights are
    over the targets of all ranks and the gradients and loss are summed over ranks once, after
    the last micro-batch: every rank ends with the gradient of the whole global batch."""
    task = get_task(task) if isinstance(task, str) else task
    device = next(model.parameters()).device
    n_total = sum(task.target_count(b) for b in group)
    if dist is not None and dist.enabled:
        n_total = int(dist.sum([float(n_total)])[0])
    n_total = n_total or 1
    step_loss = 0.0
    sharded = dist.layers if dist is not None and dist.enabled else []
    for i, batch in enumerate(group):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        ids = batch.get("input_ids")
        kernel = attention_kernel(model, ids) if ids is not None else contextlib.nullcontext()
        if ids is not None:
            _keep_large_blocks(model, ids)
        last = i == len(group) - 1  # FSDP reduces the shards' gradients after the last only
        sync = fsdp.gradient_sync(sharded, last) if sharded else contextlib.nullcontext()
        with kernel, sync:  # backward too: checkpointing recomputes the forward in it
            with autocast_context(precision, device):
                loss = task.loss(model, batch, chunk)
            weight = task.target_count(batch) / n_total
            (loss * weight).backward()
        step_loss += loss.item() * weight
    grads = [p for p in model.parameters() if p.requires_grad]
    if dist is not None and dist.enabled:
        dist.reduce_gradients(grads)
        step_loss = dist.sum([step_loss])[0]
    if sharded:
        return step_loss, fsdp.clip_gradients(grads, max_grad_norm, dist)
    gnorm = torch.nn.utils.clip_grad_norm_(grads, max_grad_norm or float("inf"))
    return step_loss, gnorm


def micro_batches(
    examples: Sequence[dict],
    batch_size: int,
    collator: Callable,
    seed: int,
    epoch: int = 0,
    index: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """Endless stream of (epoch, index in epoch, batch), starting at a saved position. The order is
    a pure function of (seed, epoch), so a resumed run reads what the uninterrupted one would.
    With world_size > 1, `batch_size` is per rank: rank r's share of each global batch."""
    if num_batches(len(examples), batch_size, world_size=world_size) == 0:
        raise ValueError("the training set is empty")
    while True:
        stream = batches(
            examples,
            batch_size,
            collator,
            seed,
            epoch,
            start=index,
            rank=rank,
            world_size=world_size,
        )
        for k, batch in enumerate(stream, start=index):
            yield epoch, k, batch
        epoch, index = epoch + 1, 0
