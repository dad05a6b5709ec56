"""`lorafit plan`: a run's peak memory estimated from the model config alone (built on the meta
device: no weight is read), its step time from a short measured probe, and for a memory limit the
cheapest `--set` changes that make it fit. The estimate is the training process's peak RSS: the
runtime (measured here) plus the larger of loading (weights streamed into their final form) and
the training step (weights, adapter + grads + AdamW, what autograd keeps, the loss chunk or a
layer's backward scratch, slack)."""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from dataclasses import dataclass, field

import psutil
import torch
import transformers
from torch import nn

from lorafit.models.loading import (
    DTYPES,
    HEADS,
    load_model,
    model_config,
    pick_device,
    pick_dtype,
)
from lorafit.models.streaming import build_empty
from lorafit.ops.lean_blocks import patch_model
from lorafit.ops.precision import resolve_precision
from lorafit.quant import pick_backend, quantizable
from lorafit.tasks import get_task
from lorafit.train.config import RunConfig, TrainOptions
from lorafit.train.optim import build_optimizer
from lorafit.train.setup import load_dtype_for
from lorafit.train.step import forward_backward, prepare_for_training
from lorafit.tuner.config import PEFT_SEQ_CLS_HEADS, LoraConfig
from lorafit.tuner.inject import find_targets, inject, output_head_names
from lorafit.tuner.kinds import kind_of

# Measured (peak RSS, VmHWM, of fresh processes; the README has the table):
# A loss chunk's logits, in the compute dtype, exist once: their gradient is written over them.
LOGIT_COPIES = 1
EAGER_LOSS_BYTES_PER_LOGIT = 14  # fused_kernels off: bf16 logits, fp32 copy, scratch, gradient
BACKWARD_BYTES_PER_MLP = 24  # one layer's backward scratch per token and intermediate unit
QUANT_SCRATCH_BYTES = {"nf4": 9, "int8": 6}  # per weight of the largest linear, while loading
MODEL_FIXED_BYTES = 48 << 20  # a loaded model beyond its tensors: objects, buffers (47-58 MB)
STEP_FIXED_BYTES = 55 << 20  # first step: oneDNN, autograd (30-41 MB); `train`: data, plot (~20)
# glibc keeps freed tensors (under its mmap threshold: 8 MiB after loading, 32 MiB while steps keep
# large blocks, models/heap.py) in its heap, where small gradients pin
# holes: peak RSS exceeds the live peak by shares of activations + loss chunk + backward scratch,
# and per layer of its fp32 token x intermediate scratch and dequantized weight (fitted: 14 runs).
ALLOCATOR_SLACK, LAYER_SLACK, DEQUANT_SLACK = 0.5, 0.45, 0.2
READ_CHUNK = 64 << 20  # streaming.py reads at most this much raw data at a time
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_UNITS = {"": 0, "b": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """'4GB', '4G', '4096MB', '3.5GiB' -> bytes, in powers of 1024 as RAM is (4GB = 4096MB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(([kmgt]?)(i?b)?)\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0 or m.group(2).lower() == "ib":
        raise ValueError(
            f"--memory {text!r} is not a memory size; write e.g. 4GB, 4G, 4096MB or 3.5GiB"
        )
    return int(float(m.group(1)) * 1024 ** _UNITS[m.group(3).lower()])


def human(n: int) -> str:
    """Bytes as GiB from 1 GiB up, else MiB."""
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass
class MemoryEstimate:
    """Estimated peak RSS of a run, by part (bytes); `total` is what the run needs."""

    weights: dict[str, int]  # while training, by storage: {"nf4 linear": ..., ...}
    adapter_params: int
    adapter_grads: int
    optimizer: int
    activations: int  # what autograd keeps for backward, at the configured checkpointing
    activations_other: int  # the same with checkpointing flipped (not counted)
    gradient_checkpointing: bool
    loss: int  # the loss chunk's logits (chunk x vocab) and their gradient
    backward: int  # one layer's backward scratch
    slack: int
    loading: int  # peak while loading (and casting) the weights
    loading_note: str
    runtime: int
    notes: list[str] = field(default_factory=list)

    @property
    def training(self) -> int:
        state = self.adapter_params + self.adapter_grads + self.optimizer
        working = self.activations + max(self.loss, self.backward) + STEP_FIXED_BYTES + self.slack
        return sum(self.weights.values()) + MODEL_FIXED_BYTES + state + working

    @property
    def total(self) -> int:
        return self.runtime + max(self.loading, self.training)

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes) rows for printing; rows in [brackets] are not part of the total."""
        on, off = ("on", "off") if self.gradient_checkpointing else ("off", "on")
        return [
            ("runtime (python, torch, transformers, lorafit)", self.runtime),
            *[(f"weights: {k}", v) for k, v in self.weights.items()],
            ("model objects, read buffers", MODEL_FIXED_BYTES),
            ("trained params (fp32)", self.adapter_params),
            ("their grads (fp32)", self.adapter_grads),
            ("AdamW states (2 x fp32)", self.optimizer),
            (f"activations, checkpointing {on} (this config)", self.activations),
            (f"[activations, checkpointing {off}]", self.activations_other),
            ("loss chunk (logits x vocab)", self.loss),
            ("backward scratch (one layer)", self.backward),
            ("first step, trainer (data, plot), allocator slack", STEP_FIXED_BYTES + self.slack),
            ("= training phase", self.runtime + self.training),
            (f"[loading phase: {self.loading_note}]", self.runtime + self.loading),
            ("total estimated peak", self.total),
        ]


def estimate_memory(
    hf_config, *, head: str = "causal-lm", quantize: str = "none",
    compute_dtype: torch.dtype = torch.bfloat16, batch_size: int = 1, seq_len: int = 512,
    gradient_checkpointing: bool = False, lora_r: int = 8, target_modules="all-linear",
    use_dora: bool = False, loss_chunk: int = TrainOptions.loss_chunk, method: str = "lora",
    runtime_bytes: int | None = None, load_dtype: torch.dtype | None = None,
    recompute_mlp: bool = True, fused_kernels: bool = True,
) -> MemoryEstimate:  # fmt: skip
    """The peak RSS of training a model of `hf_config` (a transformers config), by part.

    `compute_dtype`: frozen weights and activations while training. `load_dtype`: what weights
    stream in as; None does what model.dtype auto does: float32 unquantized (bf16 training casts it
    after: a big model's peak), else `compute_dtype`. `runtime_bytes`: default `runtime_rss()`.
    `recompute_mlp`: the run's setting where down_proj can run as one op (a caller passes False
    where it cannot: LoRA dropout, fp32 frozen weights); a quantized base or full fine-tuning keeps
    the SwiGLU output anyway. `fused_kernels`: the loss chunk's logits exist once (else the eager
    loss's fp32 copies)."""
    quantize, full = quantize or "none", method == "full"
    quantized = quantize != "none"
    load_dtype = load_dtype or (torch.float32 if quantize == "none" else compute_dtype)
    auto_class = getattr(transformers, HEADS[head].auto_class)
    model = build_empty(auto_class, hf_config, compute_dtype, "sdpa")
    model.tie_weights()  # as loading does: a tied head shares the embedding
    heads = output_head_names(model) | {h for h in PEFT_SEQ_CLS_HEADS if hasattr(model, h)}
    b, lb, cd = compute_dtype.itemsize, load_dtype.itemsize, DTYPE_NAMES.get(compute_dtype, "?")

    # Weights: every nn.Linear but the heads is quantized; the rest stays in the compute dtype.
    linear_n = other_n = q_bytes = largest = largest_linear = 0
    for path, module in model.named_modules(remove_duplicate=True):
        for name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if p is getattr(model.get_input_embeddings(), "weight", None) and path in heads:
                continue  # a tied head: counted with the embedding
            largest = max(largest, p.numel())
            if quantizable(module) and name == "weight" and path not in heads:
                n = p.numel()  # nf4: 4-bit codes, uint8 absmax per 64, fp32 per 256 blocks
                linear_n, largest_linear = linear_n + n, max(largest_linear, n)
                q_bytes += {"nf4": n // 2 + -(-n // 64) + 4 * -(-n // 16384) + 1092,
                            "int8": n + 4 * p.shape[0]}.get(quantize, 0)  # fmt: skip
            else:
                other_n += p.numel()
    weights = {f"{cd} embeddings/norms/head": b * other_n}
    weights[f"{quantize if quantized else cd} linear"] = q_bytes if quantized else b * linear_n
    if full:
        weights = {"fp32 all weights (trained)": 4 * (linear_n + other_n)}
    # Trained: r (in + out) per LoRA target (+ out for DoRA's magnitude), and any trained head.
    trainable, targeted = (linear_n + other_n if full else 0), set()
    if not full:
        lora = LoraConfig(r=lora_r, target_modules=target_modules, use_dora=use_dora)
        for path, module in find_targets(model, lora):
            fan_in, fan_out = kind_of(module).fan_dims(module)
            trainable += lora_r * (fan_in + fan_out) + (fan_out if use_dora else 0)
            targeted.add(path.rsplit(".", 1)[-1])
        if head == "classification":
            trainable += sum(p.numel() for h in heads for p in model.get_submodule(h).parameters())
    # Kept for backward, per token and layer (bytes): measured on the lean Llama blocks as norm
    # inputs, q/k/v after rotary, the attention output, gate, up, plus each LoRA target's input
    # (shared by q/k/v and by gate/up) and A output; fp32 attention log-sum-exp and norm scales.
    text = hf_config.get_text_config()  # Llama names, else GPT-2's
    h = getattr(text, "hidden_size", None) or text.n_embd
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * h
    nh = getattr(text, "num_attention_heads", None) or text.n_head
    kv = (getattr(text, "num_key_value_heads", None) or nh) * (
        getattr(text, "head_dim", None) or h // nh
    )
    n_layers = max((len(m) for m in model.modules() if isinstance(m, nn.ModuleList)), default=0)
    lean, notes = patch_model(model) > 0, []
    names = {"q_proj", "gate_proj", "down_proj"} if full else targeted
    per = 4 * h + 2 * kv + 2 * inter + lora_r * len(targeted)
    swiglu_out = 0  # down_proj's input, kept unless recompute_mlp (always under checkpointing)
    if lean:
        per += h * bool(names & {"q_proj", "k_proj", "v_proj"})
        per += h * bool(names & {"gate_proj", "up_proj"})
        swiglu_out = b * inter * ("down_proj" in names)
        per = b * per + 4 * nh + 8
    else:  # transformers' own blocks keep more (fp32 norm outputs, activation inputs, masks)
        notes.append(f"{type(model).__name__} has no lean blocks: activations are approximate")
        per = b * (per + 6 * h + inter) + 4 * nh
    tokens = batch_size * seq_len
    with_ckpt = tokens * (n_layers * b * h + per + swiglu_out + 2 * b * h)  # one layer recomputed
    # made again in backward only by down_proj's one-op form (LoRA on a plain nn.Linear)
    kept = per + (0 if recompute_mlp and not (quantized or full) else swiglu_out)
    without = tokens * (n_layers * kept + 2 * b * h)  # (+ the final norm's input and output)
    acts, other = (with_ckpt, without) if gradient_checkpointing else (without, with_ckpt)
    vocab = getattr(text, "vocab_size", 0) if head == "causal-lm" else 0
    targets = batch_size * (seq_len - 1)  # every position labelled: the worst case
    per_logit = LOGIT_COPIES * b if fused_kernels else EAGER_LOSS_BYTES_PER_LOGIT
    loss = per_logit * min(loss_chunk, targets) * vocab + 2 * b * targets * h
    backward = tokens * BACKWARD_BYTES_PER_MLP * inter
    if quantized:  # one layer's weight dequantized (forward and backward)
        backward += 2 * b * largest_linear
    per_layer = LAYER_SLACK * tokens * inter * 4 + DEQUANT_SLACK * b * largest_linear * quantized
    slack = int(ALLOCATOR_SLACK * (acts + loss + backward) + n_layers * per_layer)
    # Loading: each tensor is read straight into its final form, one read chunk at a time.
    final = sum(weights.values()) if quantized or full else lb * (linear_n + other_n)
    stored = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None))
    in_flight = min(READ_CHUNK, (4 if stored.endswith("float32") else 2) * largest)
    if quantized:  # the float weight, then the quantizer's scratch
        in_flight += (b + QUANT_SCRATCH_BYTES[quantize]) * largest_linear
    loading = final + MODEL_FIXED_BYTES + in_flight
    note = f"{DTYPE_NAMES.get(load_dtype, load_dtype)} weights + one tensor in flight"
    if not full and quantize == "none" and lb > b:  # prepare_for_training casts tensor by tensor
        loading = max(loading, final + MODEL_FIXED_BYTES + b * largest + 4 * trainable)
        note = f"{DTYPE_NAMES[load_dtype]} weights loaded, then cast to {cd}"
    runtime_bytes = runtime_rss(quantize) if runtime_bytes is None else runtime_bytes
    return MemoryEstimate(
        weights, 0 if full else 4 * trainable, 4 * trainable, 8 * trainable, acts, other,
        gradient_checkpointing, loss, backward, slack, loading, note, runtime_bytes, notes,
    )  # fmt: skip


_RUNTIME: dict[str, int] = {}


def runtime_rss(quantize: str = "none", device: str = "cpu", library: str = "auto") -> int:
    """This process's RSS when first asked (ask before loading) + the quantization library's."""
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    _RUNTIME.setdefault("base", rss())
    if quantize not in (None, "none") and quantize not in _RUNTIME:
        before = rss()
        __import__(pick_backend(quantize, device, library).library)
        _RUNTIME[quantize] = max(0, rss() - before)
    return _RUNTIME["base"] + _RUNTIME.get(quantize or "none", 0)


def _inputs(cfg: RunConfig) -> tuple[object, dict, torch.device, str]:
    """(transformers config, estimate_memory's keywords, device, precision) of a run config."""
    m, t, head = cfg.model, cfg.train, get_task(cfg.model.task).head
    hf_config = model_config(m.name, m.cache_dir)
    try:
        auto = getattr(transformers, HEADS[head].auto_class)
        auto._model_mapping[type(hf_config)]  # imports the model's code: part of the runtime
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{m.name}: no usable model config ({exc})") from None
    device = pick_device(m.device)
    precision = resolve_precision(t.precision, device)
    if m.quantize != "none":  # as load_model: bf16 compute unless model.dtype says otherwise
        bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
        load = compute = DTYPES.get(m.dtype) or (torch.bfloat16 if bf16 else torch.float16)
    else:
        load = pick_dtype(load_dtype_for(cfg, HEADS[head].needs_num_labels), device)
        compute = torch.bfloat16 if precision == "bf16" else load
    kw = dict(
        head=head, quantize=m.quantize, compute_dtype=compute, load_dtype=load,
        batch_size=t.batch_size, seq_len=cfg.data.max_length, lora_r=cfg.lora.r,
        gradient_checkpointing=t.gradient_checkpointing, target_modules=cfg.lora.target_modules,
        use_dora=cfg.lora.use_dora, loss_chunk=t.loss_chunk, method=t.method,
        # down_proj is one op only without LoRA dropout and with bf16 frozen weights (not ReLoRA's)
        recompute_mlp=t.recompute_mlp and not cfg.lora.lora_dropout and t.relora is None,
        fused_kernels=t.fused_kernels,
        runtime_bytes=runtime_rss(m.quantize, device.type, m.quantize_backend),
    )  # fmt: skip
    return hf_config, kw, device, precision


def peak_rss(reset: bool = False) -> int:
    """This process's peak RSS (Linux's VmHWM); `reset` starts a new peak first."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def _probe(cfg: RunConfig, device: torch.device, precision: str) -> tuple[float, int]:
    """(median step seconds x grad_accum, peak memory) of 1 warm-up + 2 timed steps on a
    synthetic batch of batch_size x max_length tokens, the model loaded as training loads it."""
    m, t, task = cfg.model, cfg.train, get_task(cfg.model.task)
    classify, cuda = task.head == "classification", device.type == "cuda"
    peak_rss(reset=True)
    model, _ = load_model(
        m.name, head=task.head, num_labels=2 if classify else None, dtype=m.dtype,
        device=m.device, cache_dir=m.cache_dir, quantize=m.quantize,
        quantize_backend=m.quantize_backend,
    )  # fmt: skip
    torch.manual_seed(t.seed)
    if t.method == "lora":
        lora, heads = cfg.lora, task.trained_heads(model)
        inject(model, dataclasses.replace(lora, modules_to_save=lora.modules_to_save or heads))
    else:
        model.requires_grad_(True)
    prepare_for_training(
        model, precision, t.gradient_checkpointing, t.recompute_mlp, t.fused_kernels
    )
    optimizer = build_optimizer(model.train(), t)
    ids = torch.randint(0, model.config.vocab_size, (t.batch_size, cfg.data.max_length))
    labels = torch.randint(0, 2, (t.batch_size,)) if classify else ids
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    times = []
    for _ in range(3):
        start = time.perf_counter()
        forward_backward(model, [batch], task, precision, t.loss_chunk, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_reserved(device) if cuda else peak_rss()
    return statistics.median(times[1:]) * t.grad_accum, peak


@dataclass
class Plan:
    """A run's memory estimate and, when probed, its measured step time and peak memory."""

    estimate: MemoryEstimate
    settings: dict  # what the estimate assumed: device, precision, dtypes, batch, length, ...
    step_time_s: float | None = None
    probe_peak: int | None = None
    probe_note: str = ""

    def to_dict(self) -> dict:
        rows = [{"label": label, "bytes": n} for label, n in self.estimate.rows()]
        return {**dataclasses.asdict(self), "rows": rows, "total": self.estimate.total}


def plan_run(cfg: RunConfig, probe: bool = True) -> Plan:
    """The run's memory estimate and, with `probe`, a short measured run (unless it won't fit)."""
    hf_config, kw, device, precision = _inputs(cfg)
    est = estimate_memory(hf_config, **kw)
    shown = {k: str(v).removeprefix("torch.") for k, v in kw.items() if k != "runtime_bytes"}
    plan = Plan(est, {"model": cfg.model.name, "device": str(device), "precision": precision,
                      "grad_accum": cfg.train.grad_accum, **shown})  # fmt: skip
    available = psutil.virtual_memory().available
    if not probe:
        plan.probe_note = "not run (--no-probe)"
    elif device.type == "cpu" and est.total - est.runtime > available:
        need = human(est.total - est.runtime)
        plan.probe_note = f"skipped: needs ~{need} beyond the runtime, {human(available)} free"
    else:
        plan.step_time_s, plan.probe_peak = _probe(cfg, device, precision)
        what = "peak CUDA memory reserved" if device.type == "cuda" else "peak RSS"
        plan.probe_note = f"1 warm-up + 2 timed steps (median x grad_accum); {what}"
    return plan


def _candidates(cfg: RunConfig, precision: str) -> list[list[dict]]:
    """The changes that lower memory, cheapest first: per option, its values in the order tried."""
    m, t, n = cfg.model, cfg.train, cfg.train.batch_size * cfg.train.grad_accum
    lora = t.method == "lora"  # a quantized or bf16-stored base cannot be fully fine-tuned
    trained = cfg.lora.modules_to_save or HEADS[get_task(m.task).head].needs_num_labels  # fp32
    free = lora and m.dtype == "float32" and m.quantize == "none" and not trained
    free = free and precision == "bf16"  # auto already streams such runs into bf16
    schemes = ["int8", "nf4"][m.quantize == "int8" :] if lora and m.quantize != "nf4" else []
    return [
        [{"model.dtype": "bfloat16"}] if free else [],  # bf16 training casts to it anyway: free
        [] if t.gradient_checkpointing else [{"train.gradient_checkpointing": True}],
        [{"model.quantize": q} for q in schemes],
        [{"train.batch_size": b, "train.grad_accum": n // b} for b in range(t.batch_size - 1, 0, -1)
         if n % b == 0],  # the same examples per optimizer step
        [{"train.loss_chunk": c} for c in (128, 64, 32, 16) if c < t.loss_chunk],
        [{"data.max_length": x} for x in (2048, 1024, 512, 256, 128, 64)
         if x < cfg.data.max_length],  # last: it changes what the model sees
    ]  # fmt: skip


def fit_to_memory(cfg: RunConfig, limit_bytes: int) -> tuple[list[str], MemoryEstimate]:
    """The fewest `--set` overrides, cheapest first, under which the estimate fits `limit_bytes`,
    with that estimate ([] when the run fits as it is). Raises ValueError when nothing fits."""
    hf_config, _, _, precision = _inputs(cfg)

    def estimate(changes: dict) -> MemoryEstimate:  # changes: {option: {"train.x": value}}
        parts: dict = {}
        for key, value in (kv for change in changes.values() for kv in change.items()):
            parts.setdefault(key.split(".")[0], {})[key.split(".")[1]] = value
        new = {s: dataclasses.replace(getattr(cfg, s), **v) for s, v in parts.items()}
        return estimate_memory(hf_config, **_inputs(dataclasses.replace(cfg, **new))[1])

    def overrides(changes: dict) -> list[str]:
        flat = [kv for change in changes.values() for kv in change.items()]
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flat]

    changes, best = {}, estimate({})
    for option, values in enumerate(_candidates(cfg, precision)):
        for value in values:
            if best.total <= limit_bytes:
                break
            trial = estimate({**changes, option: value})
            if trial.total < best.total:
                changes[option], best = value, trial
    if best.total > limit_bytes:
        sets = " --set ".join(overrides(changes))
        raise ValueError(
            f"nothing tried fits the run in {human(limit_bytes)}: the least is {human(best.total)}"
            f" (--set {sets}); use a smaller model or a machine with more memory"
        )
    for option in list(changes):  # drop what a later, stronger change made unneeded
        fewer = {k: v for k, v in changes.items() if k != option}
        trial = estimate(fewer)
        if trial.total <= limit_bytes:
            changes, best = fewer, trial
    return overrides(changes), best
