"""`lorafit` command line: a thin map from sub-command to the library's plain functions.

Every failure the user can fix (a bad config, data or adapter file, a path that cannot be
written) is printed as one line and exits with status 2; set LORAFIT_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from lorafit.cli.commands import (
    cmd_check,
    cmd_eval,
    cmd_generate,
    cmd_inspect,
    cmd_export,
    cmd_merge,
    cmd_plan,
    cmd_quickstart,
    cmd_serve,
    cmd_train,
    cmd_tune,
)
from lorafit.train.config import RUN_LORA_DEFAULTS, SECTIONS, field_docs


def _config_reference() -> str:
    lines = ["config options (YAML sections; override any with --set section.key=value):"]
    for section, cls in SECTIONS.items():
        lines.append(f"\n  {section}:")
        defaults = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
        if section == "lora":
            defaults.update(RUN_LORA_DEFAULTS)
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for name, doc in field_docs(cls).items():
            if name != "extra":
                lines.append(f"    {name} ({types[name]}, default {defaults.get(name)!r}): {doc}")
    return "\n".join(lines)


def _add_decode_weights(parser: argparse.ArgumentParser, note: str) -> None:
    parser.add_argument(
        "--decode-weights",
        choices=("float", "int4"),
        default="float",
        help="float: decode with the model's weights (default); int4: with 4-bit copies of the "
        "projections and an 8-bit output head, as llama.cpp's Q4_1 (CPU, Llama-family models, "
        "plain LoRA; ~2-3x faster single-stream decoding, answers close to float's)"
        + (f"; {note}" if note else ""),
    )


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override one config option, e.g. --set train.lr=1e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafit", description="LoRA fine-tuning on small hardware.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="fine-tune from a YAML config",
        epilog=_config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a model with LoRA as the YAML config says.",
    )
    t.add_argument("config", nargs="?", help="YAML run config (sections model, data, lora, train)")
    _add_overrides(t)
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue the run in train.output_dir from its newest checkpoint (or the given one)",
    )
    t.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (metrics still go to metrics.jsonl)",
    )
    t.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train data-parallel on N local processes (torchrun --standalone --nproc-per-node N "
        "-m lorafit train ...; gloo on CPU, nccl on CUDA); train.batch_size is the global batch",
    )
    t.set_defaults(func=cmd_train)

    tu = sub.add_parser(
        "tune",
        help="search rank and hyperparameters (Optuna) within a wall-clock budget",
        description="Search the config's tune.space (default: rank, alpha/r, lr, targets, "
        "dropout, init, rsLoRA, LoRA+ for LoRA; lr for full fine-tuning) with Optuna's TPE "
        "sampler and a Hyperband pruner on the validation metric tune.metric. Each trial is a "
        "real training run in its own process. The study is kept in SQLite: run the same "
        "command again (or with --study DIR) to continue it. Writes best.yaml and report.md.",
    )
    tu.add_argument("config", nargs="?", help="YAML run config with an optional tune: section")
    _add_overrides(tu)
    tu.add_argument(
        "--budget", help="wall clock for the whole search: 30m, 1h30m, 90s (the study's total)"
    )
    tu.add_argument("--trials", type=int, help="stop after N finished trials (study total)")
    tu.add_argument(
        "--study", help="study folder (default <train.output_dir>-tune); continued if it exists"
    )
    tu.add_argument(
        "--seeds",
        type=int,
        default=0,
        metavar="K",
        help="rerun the best config with K fresh seeds and report mean +- std",
    )
    tu.set_defaults(func=cmd_tune)

    e = sub.add_parser(
        "eval",
        help="evaluate an adapter (or the base model) on validation data",
        description="Evaluate on the run's validation split or on --data.",
    )
    e.add_argument("config", nargs="?", help="the YAML run config the adapter was trained with")
    _add_overrides(e)
    e.add_argument(
        "--adapter",
        help="adapter or model folder (default: <train.output_dir>/adapter, or /model after "
        "train.method=full; 'none' for the base model)",
    )
    e.add_argument("--data", help="evaluate on this file instead of the validation split")
    e.add_argument(
        "--generate",
        action="store_true",
        help="also decode answers and score them (BLEU, ROUGE-L, METEOR, CIDEr) against the references",
    )
    e.add_argument(
        "--max-new-tokens", type=int, default=64, help="generation length limit with --generate"
    )
    e.add_argument(
        "--num-beams", type=int, default=1, help="beam width with --generate (1: greedy)"
    )
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    e.add_argument(
        "--report",
        help="write the task's figures into this folder (image classification: the confusion "
        "matrix as PNG and JSON)",
    )
    e.add_argument(
        "--predictions", help="write generated outputs to this JSONL file (with --generate)"
    )
    e.add_argument(
        "--no-loss",
        action="store_true",
        help="skip the teacher-forced loss/perplexity pass (with --generate on large test sets)",
    )
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser(
        "generate",
        help="generate text (one prompt, or an interactive chat)",
        description="Generate with a base model, optionally with an adapter.",
    )
    g.add_argument("--model", help="base model (default: the adapter's base model, else smollm2)")
    g.add_argument("--adapter", help="adapter folder to apply (merged into the weights for speed)")
    g.add_argument(
        "--prompt",
        action="append",
        help="a user message (repeatable); none starts an interactive chat",
    )
    g.add_argument("--system", help="system prompt")
    g.add_argument(
        "--max-new-tokens", type=int, default=128, help="maximum tokens to generate per reply"
    )
    g.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)"
    )
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (1: no beam search)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    _add_decode_weights(g, "the --prompt replies are decoded by lorafit serve's engine")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser(
        "merge",
        help="write base + adapter as one merged model folder (safetensors)",
        description="Merge an adapter into its base model and save a plain transformers model.",
    )
    m.add_argument("--adapter", required=True, help="adapter folder")
    m.add_argument("--model", help="base model (default: the adapter's recorded base model)")
    m.add_argument("--out", required=True, help="output folder (written atomically)")
    m.add_argument(
        "--dtype",
        default="auto",
        help="dtype of the saved weights: auto (float32), bfloat16, float16",
    )
    m.add_argument(
        "--base-quantize",
        default="auto",
        help="the base the adapter is merged into: auto (as it was trained: a QLoRA adapter goes "
        "into its nf4/int8 base, dequantized), none (the full-precision base), nf4 or int8",
    )
    m.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    m.set_defaults(func=cmd_merge)

    x = sub.add_parser(
        "export",
        help="export an adapter for llama.cpp / Ollama (GGUF) or transformers (merged folder)",
        description="Write a trained adapter as files other runtimes load: gguf (the merged "
        "model, one file), gguf-lora (the adapter alone, applied on the base GGUF by llama.cpp / "
        "Ollama), hf (a merged transformers folder). GGUF exports get an Ollama Modelfile beside "
        "them. Nothing is downloaded and no llama.cpp build is needed.",
    )
    x.add_argument("--adapter", required=True, help="adapter folder")
    x.add_argument("--format", required=True, choices=["gguf", "gguf-lora", "hf"])
    x.add_argument("--out", required=True, help="output file (.gguf) or folder (hf)")
    x.add_argument(
        "--dtype",
        help="gguf: f16 (default), f32, bf16, q8_0; hf: auto (float32), bfloat16, float16",
    )
    x.add_argument("--model", help="base model: the .gguf it was trained on (default: recorded)")
    x.add_argument("--no-modelfile", action="store_true", help="do not write an Ollama Modelfile")
    x.add_argument("--shard-size", help="hf: largest safetensors shard (default 2GB)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser(
        "check",
        help="parity gate: the adapter vs its merged model, a GGUF, a running endpoint",
        description="Compare greedy continuations (and logits) of the adapter, its merged model "
        "and, when given, a GGUF and an OpenAI-compatible endpoint on probe prompts; check the "
        "GGUF's chat template and EOS and the base's sha256; lint which runtimes load the "
        "adapter. Exits 1 when a row is beyond its dtype's tolerance.",
    )
    c.add_argument("--adapter", required=True, help="adapter folder")
    c.add_argument("--gguf", help="a GGUF exported from it (llama.cpp runs it when installed)")
    c.add_argument("--url", help="an OpenAI-compatible server, e.g. http://localhost:8080")
    c.add_argument("--served-model", help="model name at --url (default: its first model)")
    c.add_argument("--prompts", help="probe prompts: one per line, or JSON lines with 'prompt'")
    c.add_argument("--tokens", type=int, default=16, help="greedy tokens per prompt (default 16)")
    c.add_argument("--json", action="store_true", help="print machine-readable JSON")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server for a base model and many adapters on it",
        description="Serve /v1/chat/completions, /v1/completions (streaming too), /v1/models and "
        "hot adapter load / unload over HTTP. Requests for different adapters are batched into "
        "one forward per decoding step; adapters stay unmerged on one shared base.",
    )
    s.add_argument("--model", help="base model (default: the first adapter's base)")
    s.add_argument(
        "--adapters",
        nargs="*",
        default=[],
        metavar="NAME=DIR",
        help="adapters to load at start, each served under its NAME",
    )
    s.add_argument(
        "--adapter-dir", help="folder POST /v1/adapters may load from (nothing outside it)"
    )
    s.add_argument("--host", default="127.0.0.1", help="address (not loopback: needs a key)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--api-key", help="required bearer key (default: env LORAFIT_API_KEY)")
    s.add_argument("--device", default="auto", help="cpu, cuda, ... (default: the best one)")
    s.add_argument("--dtype", default="auto", help="float32, bfloat16, ... (default: auto)")
    s.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    s.add_argument(
        "--max-len", type=int, default=1024, help="prompt + answer tokens per request (1024)"
    )
    s.add_argument("--max-adapters", type=int, default=8, help="loaded at once; LRU ones go")
    s.add_argument("--max-rank", type=int, default=64, help="largest adapter rank accepted")
    s.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens accepted")
    s.add_argument("--max-concurrent", type=int, default=64, help="in flight before 429")
    s.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding step (faster decoding; minutes of warm-up at start)",
    )
    _add_decode_weights(s, "")
    s.set_defaults(func=cmd_serve)

    i = sub.add_parser(
        "inspect",
        help="describe an adapter folder",
        description="Show an adapter's base model, targets, ranks and size.",
    )
    i.add_argument("adapter", help="adapter folder")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    i.set_defaults(func=cmd_inspect)

    pl = sub.add_parser(
        "plan",
        help="will it fit? estimate a run's peak memory and step time before training",
        description="Estimate the peak memory of the run a config describes (from the model "
        "config: nothing loaded), measure its step time with a short probe, and with --memory "
        "propose the --set changes that make it fit.",
    )
    pl.add_argument("config", nargs="?", help="YAML run config (as for lorafit train)")
    _add_overrides(pl)
    pl.add_argument(
        "--memory",
        metavar="LIMIT",
        help="memory the run must fit in (4GB, 4G, 4096MB, 3.5GiB; powers of 1024): if the "
        "estimate exceeds it, print the cheapest --set changes that fit",
    )
    pl.add_argument(
        "--no-probe",
        action="store_true",
        help="estimate only: skip the short measured run (step time and measured peak)",
    )
    pl.add_argument("--json", action="store_true", help="print machine-readable JSON")
    pl.set_defaults(func=cmd_plan)

    q = sub.add_parser(
        "quickstart",
        help="the demo: teach SmolLM2 a pirate persona on CPU, show before/after",
        description="Generate a small chat dataset, fine-tune the default model, compare answers.",
    )
    q.add_argument(
        "--out", default="runs/quickstart", help="output folder (its run/ subfolder is replaced)"
    )
    q.add_argument("--steps", type=int, default=60, help="optimizer steps (batch 8)")
    q.add_argument("--model", default="smollm2", help="base model")
    q.set_defaults(func=cmd_quickstart)
    return p


def error_line(exc: BaseException) -> str:
    """One line that names the problem (and, for file errors, the path and the reason)."""
    if isinstance(exc, OSError) and exc.strerror and not str(exc).startswith("cannot write"):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lorafit never downloads weights
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        if os.environ.get("LORAFIT_DEBUG"):
            raise
        print(f"lorafit {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
