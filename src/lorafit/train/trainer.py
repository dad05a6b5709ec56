"""The trainer: `setup` (checks, data, model, optimizer, resume), `fit` (the step loop and its
callbacks), `save` (final evaluation, adapter, plot, summary), the same on CPU and CUDA.

    config -> setup -> fit: [forward/backward -> callbacks -> optimizer step -> callbacks]* -> save

Resuming replays the exact run: the adapter, optimizer, scheduler and RNG states are restored and
the data order is a pure function of (seed, epoch), so the batch after a resume is the one the
uninterrupted run would have seen. `train(cfg)` is the whole recipe in one call.

Started by torchrun as one of N processes, the same trainer trains data-parallel (distributed.py):
each rank takes its share of every global batch, gradients are summed over ranks once per step,
and rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafit import atomic
from lorafit.data.batching import num_batches
from lorafit.models.heap import keep_large_blocks, return_freed_memory
from lorafit.ops.precision import autocast_context
from lorafit.tasks import get_task
import lorafit.train.checkpoints as ckpt
import lorafit.train.distributed as distributed
import lorafit.train.fsdp as fsdp
import lorafit.train.resume as resuming
from lorafit.train.callbacks import Callback, TrainingStopped, default_callbacks
from lorafit.train.config import RunConfig, relora_options
from lorafit.tasks.classification import LABELS_FILE, set_label_names
from lorafit.train.optim import build_optimizer, build_schedule
from lorafit.train.relora import Relora
from lorafit.train.run_log import peak_memory_mb, write_loss_plot
from lorafit.train.setup import Prepared, prepare
from lorafit.train.state import StepOutput, TrainState
from lorafit.train.step import forward_backward, micro_batches
from lorafit.tuner.inject import parameter_report
from lorafit.tuner.peft_format import save_adapter

__all__ = ["Trainer", "TrainResult", "TrainingStopped", "train"]


@dataclass
class TrainResult:
    """What `train` returns; summary.json holds the same (without the per-step losses)."""

    output_dir: Path
    adapter_dir: Path
    best_adapter_dir: Path | None
    steps: int
    stopped: str
    wall_time_s: float
    peak_memory_mb: float
    trainable_params: int
    total_params: int
    final: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


class Trainer:
    """One training run in train.output_dir. Call `setup()`, `fit()`, then `save()`.

    Callbacks (see callbacks.py) read and change the public attributes: cfg, task, out, data
    (the `Prepared` inputs: model, examples, collator...), model, optimizer, scheduler, state,
    total_steps, losses, last_eval, is_main."""

    def __init__(
        self,
        cfg: RunConfig,
        resume: bool | str | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
        callbacks: list[Callback] | None = None,
    ):
        self.cfg, self.resume = cfg, resume
        self.task = get_task(cfg.model.task)
        self.out = Path(cfg.train.output_dir)
        self.dist = distributed.from_env()  # world_size 1 unless started by torchrun
        self.is_main = self.dist.is_main  # whether this process writes files (rank 0)
        self.log = log if self.is_main else (lambda *_: None)
        self.state = TrainState()
        self.losses: list[float] = []
        self.last_eval: dict[str, float] = {}
        self.resumed_from: Path | None = None
        if callbacks is None:
            relora = relora_options(cfg.train.relora)
            extra = [Relora(relora, cfg.lora.init_lora_weights)] if relora else []
            callbacks = default_callbacks(self, progress, extra)
        self.callbacks = callbacks
        self._evaluated_at: int | None = None
        self._started = time.perf_counter()

    # ------------------------------------------------------------------------------ setup --
    def setup(self) -> None:
        """Everything before the first step. The cheap checks (a previous run in the way, the
        checkpoint to resume from, a writable output_dir) come before the model loads."""
        t, world = self.cfg.train, self.dist.world_size
        self._started = time.perf_counter()
        self.dist.check_same_config(self.cfg.to_dict())
        if t.batch_size % world:
            raise ValueError(
                f"train.batch_size {t.batch_size} is the global batch and must divide evenly "
                f"between the {world} processes; make it a multiple of {world}"
            )
        self.rank_batch = t.batch_size // world
        if t.distributed == "fsdp" and self.dist.enabled and self.cfg.model.quantize != "none":
            raise ValueError(fsdp.QUANTIZED)
        if t.threads:
            torch.set_num_threads(t.threads)
        random.seed(t.seed)
        payload = None
        if self.resume:
            self.resumed_from = resuming.find_checkpoint(self.out, self.resume)
            payload = resuming.load_checkpoint(self.resumed_from, full_model=t.method != "lora")
            resuming.check_same_run(payload["config"], self.cfg, self.resumed_from)
        else:
            resuming.check_fresh_start(self.out)
        self.dist.barrier()  # every rank has looked at output_dir before rank 0 writes in it
        if self.is_main:  # an unwritable output_dir fails here (WriteError), not after the load
            atomic.write_json(self.out / "config.json", self.cfg.to_dict())
            ckpt.clean_partial(self.out)
        self.data: Prepared = prepare(self.cfg, self.task, self.resumed_from)
        self.model = self.data.model
        self.dist.broadcast_parameters([p for p in self.model.parameters() if p.requires_grad])
        if t.distributed == "fsdp" and self.dist.enabled:
            self.dist.layers = fsdp.shard(self.model, self.dist)
            here, whole = fsdp.weight_bytes(self.model)
            self.log(
                f"FSDP2: {len(self.dist.layers)} decoder layers sharded over {world} ranks; "
                f"this rank holds {100 * here / whole:.0f}% of the weights "
                f"({here / 2**20:.2f} of {whole / 2**20:.2f} MiB)"
            )
        self.per_epoch = num_batches(len(self.data.train), self.rank_batch, world_size=world)
        self.total_steps = t.max_steps or max(
            1, math.ceil(t.epochs * self.per_epoch / t.grad_accum)
        )
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_schedule(self.optimizer, t, self.total_steps)
        if payload is not None:
            self.state = TrainState.restore(payload, self.optimizer, self.scheduler)
            if self.dist.layers:  # the checkpoint holds whole tensors: split them like the weights
                fsdp.shard_optimizer_state(self.optimizer)
            saved = payload.get("callbacks", {})
            for callback in self.callbacks:
                if callback.state_key in saved:
                    callback.load_state_dict(self, saved[callback.state_key])
            self.log(f"resumed from {self.resumed_from} at step {self.state.step}")
        self.params = parameter_report(self.model)
        d = self.data
        self.log(
            f"{self.params} | {len(d.train)} train / {len(d.val)} val examples | "
            f"{self.total_steps} steps | device {d.device} | precision {d.precision}"
        )
        if d.no_validation:
            self.log(
                f"no validation data ({d.no_validation}): no evaluation and no best "
                f"{'adapter' if d.adapter else 'model'}; the final one is saved"
            )

    # -------------------------------------------------------------------------------- fit --
    @property
    def finished(self) -> bool:
        return self.state.step >= self.total_steps or bool(self.state.stopped)

    def stop(self, reason: str) -> None:
        """End training after the current step's callbacks (e.g. early stopping)."""
        self.state.stopped = reason

    def fit(self) -> None:
        t, state = self.cfg.train, self.state
        stream = micro_batches(
            self.data.train,
            self.rank_batch,
            self.data.collator,
            t.seed,
            state.epoch,
            state.index,
            self.dist.rank,
            self.dist.world_size,
        )
        self.dispatch("on_fit_start")
        self.model.train()
        try:
            while not self.finished:
                out = self.train_step(stream)
                self.dispatch("on_step_end", out)
        finally:
            self.model.eval()
            keep_large_blocks(False)  # large blocks the steps kept (train/step.py) go back to mmap
            return_freed_memory()  # what is left (saving, the plot) runs without the steps' heap
            self.dispatch("on_fit_end")

    def train_step(self, stream) -> StepOutput:
        """One optimizer step over train.grad_accum micro-batches."""
        t, state = self.cfg.train, self.state
        started = time.perf_counter()
        group = [next(stream) for _ in range(t.grad_accum)]
        epoch, index, _ = group[-1]
        micro = [batch for _, _, batch in group]
        loss, grad_norm = forward_backward(
            self.model,
            micro,
            self.task,
            self.data.precision,
            t.loss_chunk,
            t.max_grad_norm,
            self.dist,
        )
        tokens = sum(self.task.input_count(b) for b in micro)
        if self.dist.enabled:  # the progress bar and metrics show the whole job's tokens
            tokens = int(self.dist.sum([float(tokens)])[0])
        out = StepOutput(loss, grad_norm, tokens)
        self.dispatch("after_backward", out)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step, state.epoch, state.index = state.step + 1, epoch, index + 1
        state.tokens += out.tokens
        self.losses.append(loss)
        out.epoch = epoch + (index + 1) / max(self.per_epoch, 1)
        out.lr = self.scheduler.get_last_lr()[0]
        out.seconds = time.perf_counter() - started
        return out

    def dispatch(self, hook: str, *args) -> None:
        """Call `hook` on every callback that runs in this process, in list order."""
        for callback in self.callbacks:
            if callback.main_process_only and not self.is_main:
                continue
            getattr(callback, hook)(self, *args)

    def evaluate(self) -> dict[str, float]:
        """The task's validation metrics for the current weights ({} without validation data).
        Under torch.distributed rank 0 computes them and every rank gets its numbers."""
        t, d = self.cfg.train, self.data
        metrics = None
        return_freed_memory()  # the steps' freed activations: not resident under the evaluation
        if self.is_main or self.dist.layers:  # sharded layers need every rank in the forward
            with autocast_context(d.precision, d.device):
                metrics = self.task.evaluate(
                    self.model, d.val, d.collator, t.batch_size, t.loss_chunk, t.eval_batches
                )
        metrics = self.dist.broadcast_object(metrics)
        self.last_eval, self._evaluated_at = metrics, self.state.step
        return metrics

    # ------------------------------------------------------------------------------- save --
    @property
    def final_dir(self) -> Path:
        return self.out / ("adapter" if self.data.adapter else "model")

    @property
    def best_dir(self) -> Path:
        return self.out / ("best_adapter" if self.data.adapter else "best_model")

    @property
    def _saves(self) -> bool:
        """Whether this rank takes part in writing a checkpoint or product: rank 0 writes; under
        FSDP every rank helps gather the sharded tensors."""
        return self.is_main or bool(self.dist.layers)

    def _whole(self):
        """Within: the model's weights are whole on every rank (FSDP: gathered)."""
        if self.dist.layers:
            return fsdp.full_parameters(self.dist.layers)
        return contextlib.nullcontext()

    def save_checkpoint(self) -> Path | None:
        """A checkpoint (written by rank 0; under FSDP every rank takes part in gathering it)."""
        if not self._saves:
            return None
        payload = self.state.to_payload(self.optimizer, self.scheduler, self.cfg.to_dict())
        payload["callbacks"] = {
            c.state_key: c.state_dict() for c in self.callbacks if c.state_key is not None
        }
        if self.dist.layers:
            payload["optimizer"] = fsdp.full_optimizer_state(payload["optimizer"])
        t = self.cfg.train
        with self._whole():
            if not self.is_main:
                return None
            return ckpt.save_checkpoint(
                self.out, self.state.step, self.model, self.data.adapter, payload, t.keep_last
            )

    def _adapter_edit(self):
        """The callbacks' rewrites of the saved adapter, chained (None: none)."""
        edits = [e for e in (c.edit_adapter(self) for c in self.callbacks) if e is not None]
        if not edits:
            return None

        def edit(tensors, config):
            for one in edits:
                tensors, config = one(tensors, config)
            return tensors, config

        return edit

    def save_product(self, folder: Path) -> Path:
        """The run's product, atomically: an adapter folder, or (full fine-tuning) a loadable
        model folder; with LABELS_FILE (labels.json) for classification."""
        d = self.data

        def build(tmp: Path) -> None:
            if d.adapter is not None:
                save_adapter(d.model, tmp, d.adapter, edit=self._adapter_edit())
            else:
                if d.label_names is not None:
                    set_label_names(d.model, d.label_names)
                d.model.save_pretrained(tmp, safe_serialization=True)
                d.tokenizer.save_pretrained(tmp)
            if d.label_names is not None:
                (tmp / LABELS_FILE).write_text(json.dumps(d.label_names) + "\n")
            for name, text in d.task.product_files(self.cfg.data, d.tokenizer).items():
                (tmp / name).write_text(text)

        if not self._saves:
            return folder
        with self._whole():
            if not self.is_main:
                return folder
            return atomic.write_dir(folder, build)

    def save(self) -> TrainResult:
        """Final evaluation, the final adapter (or model), loss plot and summary.json."""
        d = self.data
        if d.val and self._evaluated_at != self.state.step:
            self.evaluate()  # a resumed run whose steps were all done before it was stopped
        final = self.save_product(self.final_dir)  # rank 0 writes
        best = self.best_dir
        result = TrainResult(
            self.out,
            final,
            best if best.is_dir() else None,
            self.state.step,
            self.state.stopped or "completed",
            time.perf_counter() - self._started,
            peak_memory_mb(d.device),
            self.params.trainable,
            self.params.total,
            {f"val_{k}": v for k, v in self.last_eval.items()},
            list(self.losses),
        )
        if self.is_main:
            write_loss_plot(self.out / "metrics.jsonl", self.out / "loss.png")
            atomic.write_json(self.out / "summary.json", self.summary(result))
        return result

    def summary(self, result: TrainResult) -> dict:
        summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}
        del summary["losses"]
        summary["validation_examples"] = len(self.data.val)
        if self.data.no_validation:
            summary["no_validation"] = self.data.no_validation
        return summary


def train(
    cfg: RunConfig,
    resume: bool | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Fine-tune per `cfg`; `resume=True` continues from the newest checkpoint in output_dir,
    `resume="<checkpoint folder>"` from that one."""
    trainer = Trainer(cfg, resume=resume, progress=progress, log=log)
    try:
        trainer.setup()
        trainer.fit()
        result = trainer.save()
        trainer.dist.barrier()  # the other ranks wait for rank 0's files
    finally:
        distributed.shutdown()
    return result
