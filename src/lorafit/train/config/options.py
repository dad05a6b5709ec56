"""The run config's options: one dataclass per YAML section (model / data / lora / train / tune),
a default, a type and a docstring per option (the docstrings are what `lorafit train --help`
prints; `field_docs` reads them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lorafit.tuner.config import LoraConfig

SCHEDULES = ("cosine", "linear", "constant")
"""Learning-rate decays after warmup (train.schedule; implemented in train/optim.py)."""

NO_VALIDATION_FILE = "no data.validation file and data.val_fraction is 0"
"""Why a run has no validation data when it asks for none."""


def one_of(choices) -> str:
    """'a, b or c': the choices an option accepts, for messages."""
    choices = list(choices)
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]


def early_stopping_needs_validation(reason: str) -> str:
    """The one message for early stopping in a run without validation data (`reason`: why not)."""
    return (
        f"train.early_stopping_patience needs validation data, but {reason}; "
        "set data.validation or data.val_fraction > 0, or drop early stopping"
    )


METHODS = ("lora", "full", "head")


@dataclass
class ModelOptions:
    name: str = "smollm2"
    """Base model: 'smollm2' (SmolLM2-135M-Instruct, the default), 'minilm', 'efficientnet-lite0' (ImageNet CNN), a Hugging Face folder, a .gguf file, or 'new' (recommendation: a fresh model sized from the data, see model.init)."""
    task: str = "causal-lm"
    """The task (lorafit.tasks): 'causal-lm' (chat / text generation), 'classification' (text -> label, with a trained head), 'image-classification' (image -> label: a CNN with a trained head) or 'recommendation' (user-item interactions -> ratings and rankings)."""
    init: dict[str, Any] | None = None
    """With model.name: new, the fresh model's architecture options: recommendation takes dim (embedding size, default 32) and init_std (default 0.1)."""
    dtype: str = "auto"
    """Weight dtype: auto (float32 on CPU; training uses autocast), float32, bfloat16 or float16."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    cache_dir: str | None = None
    """Where converted GGUF models are cached (default $LORAFIT_CACHE or ~/.cache/lorafit)."""
    quantize: str = "none"
    """Store the frozen base's linear layers quantized (QLoRA): none, nf4 (4-bit NormalFloat with double-quantized scales) or int8 (weight-only, per row). Norms, embeddings and the head stay in the compute dtype (bf16 unless model.dtype says otherwise)."""
    quantize_backend: str = "auto"
    """Library for model.quantize: auto (the faster one on this device, as measured by benchmarks/quant_backends.py), bitsandbytes or torchao."""


@dataclass
class DataOptions:
    train: str = ""
    """Training file: .jsonl/.json/.csv/.tsv with chat messages, instruction/input/output, prompt/completion, text, or text,label."""
    validation: str | None = None
    """Validation file; when empty, val_fraction of the training file is held out (deterministically)."""
    columns: dict[str, str] | None = None
    """Rename the file's fields to lorafit's, keeping only these: e.g. {mr: prompt, ref: completion} or {sentence: text}."""
    val_fraction: float = 0.1
    """Share of the training file held out for validation when no validation file is given."""
    max_length: int = 512
    """Maximum tokens per example; longer ones are truncated (the start is kept)."""
    packing: bool = False
    """Pack several short examples into one sequence (no padding; positions restart per example)."""
    padding_free: bool = True
    """Causal LM: lay each batch's examples end to end in one row, each attending only to itself, so no compute goes to pad tokens (same batches and gradients as padding; off: pad to the longest)."""
    train_on_prompt: bool = False
    """Also learn the prompt tokens (default: loss only on the answer)."""
    system_prompt: str | None = None
    """System message put before every chat that has none (also used by `lorafit eval --generate`)."""
    max_examples: int | None = None
    """Use only the first N training rows (quick experiments)."""
    image_size: int | None = None
    """Image classification: the side in pixels images are resized to (default: the model's, 224 for EfficientNet-Lite0)."""
    history: list[str] | None = None
    """Recommendation: files of other interactions of the same users (same columns as data.train), never trained on: their ids get rows in a new model, and ranking evaluation never recommends an item a user already has in data.train, data.validation or here."""


@dataclass
class TrainOptions:
    output_dir: str = "runs/lorafit"
    """Folder for the adapter, checkpoints, metrics.jsonl, TensorBoard logs and the loss plot."""
    method: str = "lora"
    """'lora' (train an adapter), 'full' (full fine-tuning of every weight: the baseline LoRA is compared with) or 'head' (only the task's freshly initialised head trains, the base stays frozen: a linear probe); full and head save a whole model folder."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed); max_steps wins when set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    lora_plus_ratio: float | None = None
    """LoRA+: learning rate of the B matrices = lr * ratio (the paper suggests 16)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming the learning rate up linearly from 0."""
    schedule: str = "cosine"
    """Learning-rate decay after warmup: cosine, linear or constant."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value (null: no clipping)."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware runs it fast, else fp32), fp32 or bf16."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of storing them (least memory, ~10-25% slower)."""
    recompute_mlp: bool = True
    """SwiGLU models: down_proj keeps gate and up (kept anyway) instead of the SwiGLU output and makes it again in backward, in the pass that computes SwiGLU's gradient, when down_proj runs as one op (SmolLM2 short examples: ~50-70 MB less peak, the same speed within noise; false keeps the output)."""
    fused_kernels: bool = True
    """Fuse the element-wise pieces of a step (SwiGLU, RMSNorm, the loss's softmax) into one pass each with torch.compile: one compile of a few seconds per process (cached on disk), then ~15-25% faster CPU steps on short examples (benchmarks/short_examples.py). Falls back to eager torch, with a warning, where compiling fails."""
    loss_chunk: int = 256
    """Tokens per chunk when computing the LM loss against the output head (bounds logits memory: 256 x 49,152 fp32 = 50 MB for SmolLM2)."""
    eval_every: int = 50
    """Evaluate on the validation set every N steps (0: only at the end)."""
    eval_batches: int | None = None
    """Evaluate on at most this many validation batches (null: all)."""
    save_every: int = 100
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted."""
    early_stopping_patience: int | None = None
    """Stop when validation loss has not improved for this many evaluations."""
    seed: int = 0
    """Seed for adapter init, data split and order, dropout."""
    log_every: int = 1
    """Write metrics every N steps."""
    threads: int | None = None
    """CPU threads for torch (null: torch's default)."""
    distributed: str = "ddp"
    """Under torchrun (or --nproc): ddp (every rank holds the whole model; gradients all-reduced) or fsdp (FSDP2: each decoder layer's weights sharded over the ranks, for bases that do not fit one device; not with a quantized base)."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""
    relora: dict[str, Any] | None = None
    """ReLoRA: {every: K, reset: prune|zero, prune_ratio: 0.999, warmup_steps: W (default K/10)}. Every K steps the adapter is merged into the (fp32) base, A and B start afresh, their optimizer state is magnitude-pruned (or zeroed) and the learning rate warms up again over W steps; the saved adapter is the sum of all the updates (rank = (restarts + 1) x r). Plain LoRA on an unquantized base (no DoRA / PiSSA, not under FSDP)."""


RELORA_RESETS = ("prune", "zero")
"""What a ReLoRA restart does to the optimizer state of A and B (train.relora.reset)."""


@dataclass(frozen=True)
class ReloraOptions:
    """train.relora, checked (`relora_options`)."""

    every: int
    """Optimizer steps between restarts."""
    reset: str = "prune"
    """prune: keep only the largest (1 - prune_ratio) of each Adam moment; zero: clear them."""
    prune_ratio: float = 0.999
    """Share of each Adam moment of A and B set to zero at a restart (reset: prune)."""
    warmup_steps: int | None = None
    """Steps over which the learning rate climbs back from 0 after each restart (null: every / 10, at least 1)."""


TUNE_DIRECTIONS = ("auto", "maximize", "minimize")
TUNE_PRUNERS = ("hyperband", "median", "none")


@dataclass
class TuneOptions:
    metric: str = "loss"
    """Validation metric `lorafit tune` optimises (causal-lm: loss, perplexity, token_accuracy; classification: loss, accuracy, macro_f1). Never a test split."""
    direction: str = "auto"
    """maximize, minimize or auto (loss / perplexity are minimised, the others maximised)."""
    space: dict[str, Any] | None = None
    """The search space: {option: [choices] | {low, high, log}}, options as section.key (train.lr, lora.r, lora.lora_dropout...) plus lora.alpha_ratio (lora_alpha = ratio x r) and lora.targets (attention, mlp, all-linear). null: the default space of train.method."""
    pruner: str = "hyperband"
    """Stop weak trials early on their validation reports: hyperband, median or none."""
    startup_trials: int = 5
    """Random trials before the TPE sampler models the results."""


RUN_LORA_DEFAULTS: dict[str, Any] = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}


@dataclass
class RunConfig:
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(**RUN_LORA_DEFAULTS))
    train: TrainOptions = field(default_factory=TrainOptions)
    tune: TuneOptions = field(default_factory=TuneOptions)

    def to_dict(self) -> dict[str, Any]:
        names = ("model", "data", "train", "tune")
        out = {name: dataclasses.asdict(getattr(self, name)) for name in names}
        lora = dataclasses.asdict(self.lora)
        lora.pop("extra")
        out["lora"] = lora
        return out


SECTIONS = {
    "model": ModelOptions,
    "data": DataOptions,
    "lora": LoraConfig,
    "train": TrainOptions,
    "tune": TuneOptions,
}


def field_docs(cls) -> dict[str, str]:
    """{field: docstring} from the string literal under each field (litgpt's convention)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs
