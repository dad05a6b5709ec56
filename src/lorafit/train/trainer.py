"""The training loop: one plain function, `train(config)`, the same on CPU and CUDA.

    config -> data (records, tokens, split) -> model + LoRA -> AdamW steps -> checkpoints, adapter, report

Resuming replays the exact run: the adapter, optimizer, scheduler and RNG states are restored and
the data order is a pure function of (seed, epoch), so the batch after a resume is the one the
uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lorafit.train import checkpoints as ckpt
from lorafit.tuner.state import delete_adapter
from lorafit.train.config import RunConfig
from lorafit.data.batching import (CausalLMCollator, ClassificationCollator, build_causal_lm_examples, batches,
                   build_classification_examples, num_batches, pack_examples)
from lorafit.data.records import load_split_records, read_records
from lorafit.infer.evaluate import evaluate_examples
from lorafit.tuner.inject import inject, parameter_report
from lorafit.ops.lean_blocks import patch_model
from lorafit.tuner.peft_format import load_adapter, save_adapter
from lorafit.ops.lm_loss import causal_lm_loss
from lorafit.models.loading import load_model, load_tokenizer
from lorafit.ops.precision import autocast_context, resolve_precision
from lorafit.train.run_log import MetricsLog, peak_memory_mb, write_loss_plot

ADAPTER = "default"


class TrainingStopped(RuntimeError):
    """Training stopped on bad numbers; the message says where the last good checkpoint is."""


@dataclass
class Prepared:
    model: nn.Module
    tokenizer: Any
    train: list[dict]
    val: list[dict]
    collator: Callable
    label_names: list[str] | None = None


@dataclass
class TrainResult:
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


def tokenize_splits(cfg: RunConfig, tokenizer, labels: list[str] | None = None):
    """(train examples, validation examples, label names) for the run's task."""
    d = cfg.data
    train_rec, val_rec = load_split_records(d.train, d.validation, d.val_fraction, cfg.train.seed, d.max_examples,
                                          d.columns)
    if cfg.model.task == "classification":
        train, names = build_classification_examples(train_rec, tokenizer, d.max_length, labels=labels)
        val = build_classification_examples(val_rec, tokenizer, d.max_length, labels=names)[0] if val_rec else []
        return train, val, names
    build = lambda rec: build_causal_lm_examples(rec, tokenizer, d.max_length,  # noqa: E731
                                                 train_on_prompt=d.train_on_prompt,
                                                 system_prompt=d.system_prompt) if rec else []
    return build(train_rec), build(val_rec), None


def prepare(cfg: RunConfig) -> Prepared:
    """Read and tokenize the data, load the model, add the adapter."""
    d, m = cfg.data, cfg.model
    if not d.train:
        raise ValueError("data.train is not set: give a training file (jsonl/csv/tsv)")
    if m.task == "classification":
        tokenizer = load_tokenizer(m.name, m.cache_dir)
        examples, val, names = tokenize_splits(cfg, tokenizer)  # labels decide the head size
        model, tokenizer = load_model(m.name, "classification", len(names), m.dtype, m.device, m.cache_dir)
        collator = ClassificationCollator(tokenizer.pad_token_id)
    else:
        read_records(d.train, d.columns)  # a malformed file fails here, before the (slow) model load
        model, tokenizer = load_model(m.name, "causal-lm", None, m.dtype, m.device, m.cache_dir)
        examples, val, names = tokenize_splits(cfg, tokenizer)
        collator = CausalLMCollator(tokenizer.pad_token_id)
    if not examples:
        raise ValueError(f"{d.train}: no training examples left after the validation split")
    if d.packing and m.task == "causal-lm":
        examples = pack_examples(examples, d.max_length)
    lora = cfg.lora
    if m.task == "classification" and not lora.modules_to_save:  # the new head must train
        lora = dataclasses.replace(lora, modules_to_save=[n for n in ("classifier", "score") if hasattr(model, n)])
    lora = dataclasses.replace(lora, base_model_name_or_path=model.config._name_or_path,
                               task_type="SEQ_CLS" if m.task == "classification" else "CAUSAL_LM")
    torch.manual_seed(cfg.train.seed)
    if cfg.train.method == "full":
        model.requires_grad_(True)
    else:
        inject(model, lora, ADAPTER)
    return Prepared(model, tokenizer, examples, val, collator, names)


def save_final(prep: Prepared, folder: Path, adapter: str | None) -> Path:
    """The run's product: an adapter folder, or (full fine-tuning) a loadable model folder."""
    if adapter is not None:
        save_adapter(prep.model, folder, adapter)
    else:
        tmp = folder.parent / f".{folder.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if prep.label_names is not None:
            prep.model.config.id2label = dict(enumerate(prep.label_names))
            prep.model.config.label2id = {n: i for i, n in enumerate(prep.label_names)}
        prep.model.save_pretrained(tmp, safe_serialization=True)
        prep.tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    if prep.label_names is not None:
        (folder / "labels.json").write_text(json.dumps(prep.label_names) + "\n")
    return folder


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.train
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the adapter has no trainable parameters")
    b_ratio = t.lora_plus_ratio or 1.0
    groups = [{"params": [p for n, p in params if not n.endswith(".B")], "lr": t.lr},
              {"params": [p for n, p in params if n.endswith(".B")], "lr": t.lr * b_ratio}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def _schedule(opt: torch.optim.Optimizer, cfg: RunConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(cfg.train.warmup_ratio * total)
    kind = cfg.train.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _count(batch: dict[str, torch.Tensor], task: str) -> int:
    if task == "classification":
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != -100).sum())


def _batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str, chunk: int) -> torch.Tensor:
    if task == "classification":
        return model(**batch).loss
    return causal_lm_loss(model, batch, chunk)[0]


def prepare_for_training(model: nn.Module, precision: str, gradient_checkpointing: bool = False,
                         recompute_mlp: bool = False) -> None:
    """The lean setup `train` uses (and the benchmark measures).

    With bf16, every frozen weight is stored in bf16 once; the trainable adapter (and any fully
    trained module) stays fp32 and autocast runs the matmuls in bf16. Autocast alone would cast each
    frozen fp32 weight on every call (it caches casts only for weights that require grad) and keep a
    fp32 residual stream, so the model would pay for a bf16 copy of every weight per step, save
    those copies for backward, and convert activations back and forth around every norm, residual
    add and rotary embedding. Storing the frozen model in bf16 removes all of that: half the weight
    memory, half the activation memory of the residual stream, far fewer element-wise casts. The
    loss moves by ~0.05% relative at step 1 on SmolLM2 (measured by benchmarks/peft_vs_lorafit.py).
    RMSNorm and SwiGLU blocks get the lean autograd functions of `kernels.py`; with `recompute_mlp`
    the SwiGLU output is recomputed in backward rather than kept (moot under checkpointing)."""
    if precision == "bf16":
        for p in model.parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
    patch_model(model, recompute_swiglu=recompute_mlp and not gradient_checkpointing)
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False


def forward_backward(model: nn.Module, group: list[dict[str, torch.Tensor]], task: str, precision: str,
                     chunk: int = 2048, max_grad_norm: float | None = None) -> tuple[float, torch.Tensor]:
    """One optimizer step's gradients over micro-batches (weighted by their labelled tokens, so
    accumulation equals one big batch); returns (loss, gradient norm after clipping is applied).
    The benchmark calls this same function, so what it measures is what `train` runs."""
    device = next(model.parameters()).device
    n_total = sum(_count(b, task) for b in group) or 1
    step_loss = 0.0
    for batch in group:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast_context(precision, device):
            loss = _batch_loss(model, batch, task, chunk)
        weight = _count(batch, task) / n_total
        (loss * weight).backward()
        step_loss += loss.item() * weight
    grads = [p for p in model.parameters() if p.requires_grad]
    gnorm = torch.nn.utils.clip_grad_norm_(grads, max_grad_norm or float("inf"))
    return step_loss, gnorm


def _micro_batches(prep: Prepared, cfg: RunConfig, epoch: int, index: int):
    """Endless stream of (epoch, index_in_epoch, batch), starting at a saved position."""
    t = cfg.train
    per_epoch = num_batches(len(prep.train), t.batch_size)
    while True:
        for k, batch in enumerate(batches(prep.train, t.batch_size, prep.collator, t.seed, epoch, start=index),
                                  start=index):
            yield epoch, k, batch
        epoch, index = epoch + 1, 0
        if per_epoch == 0:
            raise ValueError("the training set is empty")


def train(cfg: RunConfig, resume: bool | str | None = None, progress: bool = True,
          log: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune per `cfg`; `resume=True` continues from the newest checkpoint in output_dir."""
    t, task = cfg.train, cfg.model.task
    started = time.perf_counter()
    if t.threads:
        torch.set_num_threads(t.threads)
    random.seed(t.seed)
    out = Path(t.output_dir)
    resume_from = _find_resume(out, resume)
    if not resume_from and (out / "metrics.jsonl").exists() and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another "
                              "train.output_dir")
    prep = prepare(cfg)
    model = prep.model
    device = next(model.parameters()).device
    precision = resolve_precision(t.precision, device)
    prepare_for_training(model, precision, t.gradient_checkpointing, t.recompute_mlp)
    per_epoch = num_batches(len(prep.train), t.batch_size)
    total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch / t.grad_accum))

    state = {"step": 0, "epoch": 0, "index": 0, "best": float("inf"), "bad_evals": 0, "tokens": 0}
    if resume_from:
        if isinstance(cfg.lora.init_lora_weights, str) and cfg.lora.init_lora_weights.startswith("pissa"):
            raise ValueError("resuming a PiSSA run is not supported: its checkpoints store the update relative "
                             "to the original weights; start it again or use init_lora_weights: true")
        saved = ckpt.load_trainer_state(resume_from)
        _check_same_run(saved["config"], cfg, resume_from)
        if t.method == "full":
            ckpt.load_weights(model, resume_from)
        else:
            delete_adapter(model, ADAPTER)
            load_adapter(model, resume_from, ADAPTER, trainable=True)
    opt = _optimizer(model, cfg)
    sched = _schedule(opt, cfg, total)
    if resume_from:
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state.update(saved["progress"])
        ckpt.set_rng_state(saved["rng"])
        log(f"resumed from {resume_from} at step {state['step']}")
    out.mkdir(parents=True, exist_ok=True)
    ckpt.clean_partial(out)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
    metrics = MetricsLog(out, truncate_after=state["step"], tensorboard=t.tensorboard)
    params = parameter_report(model)
    log(f"{params} | {len(prep.train)} train / {len(prep.val)} val examples | {total} steps | "
        f"device {device} | precision {precision}")

    def evaluate() -> dict[str, float]:
        with autocast_context(precision, device):
            return evaluate_examples(model, prep.val, prep.collator, task, t.batch_size, t.loss_chunk,
                                     t.eval_batches)

    def checkpoint() -> Path:
        payload = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ckpt.rng_state(),
                   "progress": dict(state), "config": cfg.to_dict()}
        return ckpt.save_checkpoint(out, state["step"], model, adapter, payload, t.keep_last)

    adapter = ADAPTER if t.method == "lora" else None
    final_name, best_name = ("adapter", "best_adapter") if adapter else ("model", "best_model")
    stream = _micro_batches(prep, cfg, state["epoch"], state["index"])
    stopped, losses, last_eval = "completed", [], {}
    bar = _progress(progress, total, state["step"])
    window_start, window_tokens = time.perf_counter(), 0
    model.train()
    while state["step"] < total:
        group = [next(stream) for _ in range(t.grad_accum)]
        last_epoch, last_index, _ = group[-1]
        step_loss, gnorm = forward_backward(model, [b for _, _, b in group], task, precision, t.loss_chunk,
                                            t.max_grad_norm)
        window_tokens += sum(int(b["input_ids"].numel()) for _, _, b in group)
        if not (math.isfinite(step_loss) and torch.isfinite(gnorm)):
            opt.zero_grad(set_to_none=True)
            good = ckpt.list_checkpoints(out)
            stopped = "nan"
            msg = (f"step {state['step'] + 1}: loss {step_loss} / grad norm {gnorm.item()} is not finite; "
                   f"training stopped. Last good checkpoint: {good[-1] if good else 'none (no checkpoint yet)'}. "
                   "Try a lower train.lr, train.precision=fp32, or train.max_grad_norm.")
            metrics.close()
            raise TrainingStopped(msg)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.update(step=state["step"] + 1, epoch=last_epoch, index=last_index + 1)
        state["tokens"] += sum(int(b["input_ids"].numel()) for _, _, b in group)
        losses.append(step_loss)
        now = time.perf_counter()
        tps = window_tokens / max(now - window_start, 1e-9)
        if state["step"] % t.log_every == 0 or state["step"] == total:
            metrics.write({"step": state["step"], "epoch": last_epoch + (last_index + 1) / max(per_epoch, 1),
                           "loss": step_loss, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
                           "tokens_per_s": tps})
        if bar is not None:
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tps:.0f}")
            bar.update(1)
        window_start, window_tokens = now, 0
        at_end = state["step"] == total
        if (t.eval_every and state["step"] % t.eval_every == 0) or at_end:
            last_eval = evaluate()
            model.train()
            metrics.write({"step": state["step"], **{f"val_{k}": v for k, v in last_eval.items()}})
            if last_eval["loss"] < state["best"]:
                state.update(best=last_eval["loss"], bad_evals=0)
                save_final(prep, out / best_name, adapter)
            else:
                state["bad_evals"] += 1
                if t.early_stopping_patience and state["bad_evals"] >= t.early_stopping_patience:
                    stopped = f"early stop: no validation improvement in {state['bad_evals']} evaluations"
        if (t.save_every and state["step"] % t.save_every == 0) or at_end or stopped != "completed":
            checkpoint()
        window_start = time.perf_counter()  # eval/checkpoint time is not training throughput
        if stopped != "completed":
            break
    if bar is not None:
        bar.close()
    metrics.close()
    model.eval()
    adapter_dir = save_final(prep, out / final_name, adapter)
    write_loss_plot(out / "metrics.jsonl", out / "loss.png")
    best = out / best_name
    result = TrainResult(out, adapter_dir, best if best.is_dir() else None, state["step"], stopped,
                         time.perf_counter() - started, peak_memory_mb(device), params.trainable, params.total,
                         {f"val_{k}": v for k, v in last_eval.items()}, losses)
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items() if k != "losses"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


def _find_resume(out: Path, resume: bool | str | None) -> Path | None:
    if not resume:
        return None
    if isinstance(resume, str) and resume not in ("auto", "latest"):
        path = Path(resume)
        if not (path / "trainer_state.pt").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no trainer_state.pt)")
        return path
    found = ckpt.list_checkpoints(out)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    return found[-1]


def _check_same_run(saved: dict[str, Any], cfg: RunConfig, where: Path) -> None:
    now = cfg.to_dict()
    for section in ("model", "data", "lora"):
        if saved.get(section) != now[section]:
            diff = sorted(k for k in set(saved.get(section, {})) | set(now[section])
                          if saved.get(section, {}).get(k) != now[section].get(k))
            raise ValueError(f"cannot resume from {where}: {section} options changed ({', '.join(diff)}); "
                             "resume with the config the run started with")
    if saved["train"]["seed"] != cfg.train.seed or saved["train"]["batch_size"] != cfg.train.batch_size:
        raise ValueError(f"cannot resume from {where}: train.seed / train.batch_size changed")


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

