"""`lorafit` command line: a thin map from sub-command to the library's plain functions."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from lorafit.train.config import SECTIONS, field_docs, load_run_config


def _config_reference() -> str:
    lines = ["config options (YAML sections; override any with --set section.key=value):"]
    for section, cls in SECTIONS.items():
        lines.append(f"\n  {section}:")
        import dataclasses

        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else
                             (f.default_factory() if f.default_factory is not dataclasses.MISSING else None))
                    for f in dataclasses.fields(cls)}
        if section == "lora":
            from lorafit.train.config import RUN_LORA_DEFAULTS

            defaults.update(RUN_LORA_DEFAULTS)
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        for name, doc in field_docs(cls).items():
            if name == "extra":
                continue
            lines.append(f"    {name} ({types[name]}, default {defaults.get(name)!r}): {doc}")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from lorafit.train.trainer import train

    cfg = load_run_config(args.config, args.set or [])
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"\ndone: {result.steps} steps ({result.stopped}) in {result.wall_time_s:.1f}s, "
          f"peak memory {result.peak_memory_mb:.0f} MiB")
    print(f"trainable params: {result.trainable_params:,} of {result.total_params:,} "
          f"({100 * result.trainable_params / max(result.total_params, 1):.3f}%)")
    for k, v in result.final.items():
        print(f"  {k}: {v:.4f}")
    print(f"adapter: {result.adapter_dir}")
    if result.best_adapter_dir:
        print(f"best adapter (lowest validation loss): {result.best_adapter_dir}")
    print(f"metrics: {result.output_dir / 'metrics.jsonl'}  plot: {result.output_dir / 'loss.png'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lorafit.infer.evaluate import evaluate_run

    cfg = load_run_config(args.config, args.set or [])
    metrics = evaluate_run(cfg, adapter=args.adapter, data=args.data, generate=args.generate,
                           max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, limit=args.limit,
                           predictions=args.predictions, loss=not args.no_loss)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lorafit.infer.generate import chat, classify, generate, load_for_inference

    model, tokenizer = load_for_inference(args.model, args.adapter, args.device, args.dtype)
    if getattr(model.config, "id2label", None) and args.adapter and (Path(args.adapter) / "labels.json").exists():
        texts = args.prompt or [line.strip() for line in sys.stdin if line.strip()]
        for text, label in zip(texts, classify(model, tokenizer, texts)):
            print(f"{label}\t{text}")
        return 0
    if not args.prompt:
        chat(model, tokenizer, args.system, args.max_new_tokens, args.temperature)
        return 0
    for prompt, reply in zip(args.prompt, generate(model, tokenizer, args.prompt, args.max_new_tokens,
                                                   args.temperature, num_beams=args.num_beams, system=args.system)):
        print(f"### {prompt}\n{reply}\n")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lorafit.infer.generate import load_for_inference
    from lorafit.tuner.merge import merge_and_unload

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    model, tokenizer = load_for_inference(args.model, args.adapter, "cpu", args.dtype, merged=False)
    model = merge_and_unload(model, verify=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged model written to {out} (safetensors); load it with transformers' from_pretrained")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lorafit.tuner.peft_format import describe_adapter

    info = describe_adapter(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"adapter:      {args.adapter}")
    print(f"base model:   {info['base_model']}")
    print(f"task:         {info['task_type']}")
    print(f"variant:      {info['variant']}")
    print(f"rank / alpha: r={info['r']} alpha={info['lora_alpha']} (scale {info['scale']:.4g})")
    print(f"targets:      {len(info['modules'])} modules: {', '.join(info['target_names'])}")
    if info["ranks"] and len(set(info["ranks"].values())) > 1:
        print(f"ranks:        {info['ranks']}")
    if info["modules_to_save"]:
        print(f"trained in full: {', '.join(info['modules_to_save'])}")
    print(f"parameters:   {info['parameters']:,} ({info['dtype']})")
    print(f"size on disk: {info['bytes'] / 2**20:.2f} MiB")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from lorafit.cli.quickstart import run

    run(args.out, args.steps, args.model)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafit", description="LoRA fine-tuning on small hardware.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune from a YAML config", epilog=_config_reference(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune a model with LoRA as the YAML config says.")
    t.add_argument("config", nargs="?", help="YAML run config (sections model, data, lora, train)")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config option, e.g. --set train.lr=1e-4 (repeatable)")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue the run in train.output_dir from its newest checkpoint (or the given one)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate an adapter (or the base model) on validation data",
                       description="Evaluate on the run's validation split or on --data.")
    e.add_argument("config", nargs="?", help="the YAML run config the adapter was trained with")
    e.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config option")
    e.add_argument("--adapter", help="adapter folder (default: <train.output_dir>/adapter; 'none' for the base model)")
    e.add_argument("--data", help="evaluate on this file instead of the validation split")
    e.add_argument("--generate", action="store_true",
                   help="also decode answers and score them (BLEU, ROUGE-L, METEOR, CIDEr) against the references")
    e.add_argument("--max-new-tokens", type=int, default=64, help="generation length limit with --generate")
    e.add_argument("--num-beams", type=int, default=1, help="beam width with --generate (1: greedy)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    e.add_argument("--predictions", help="write generated outputs to this JSONL file (with --generate)")
    e.add_argument("--no-loss", action="store_true",
                   help="skip the teacher-forced loss/perplexity pass (with --generate on large test sets)")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text (one prompt, or an interactive chat)",
                       description="Generate with a base model, optionally with an adapter.")
    g.add_argument("--model", help="base model (default: the adapter's base model, else smollm2)")
    g.add_argument("--adapter", help="adapter folder to apply (merged into the weights for speed)")
    g.add_argument("--prompt", action="append", help="a user message (repeatable); none starts an interactive chat")
    g.add_argument("--system", help="system prompt")
    g.add_argument("--max-new-tokens", type=int, default=128, help="maximum tokens to generate per reply")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (1: no beam search)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("merge", help="write base + adapter as one merged model folder (safetensors)",
                       description="Merge an adapter into its base model and save a plain transformers model.")
    m.add_argument("--adapter", required=True, help="adapter folder")
    m.add_argument("--model", help="base model (default: the adapter's recorded base model)")
    m.add_argument("--out", required=True, help="output folder (written atomically)")
    m.add_argument("--dtype", default="auto", help="dtype of the saved weights: auto (float32), bfloat16, float16")
    m.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    m.set_defaults(func=cmd_merge)

    i = sub.add_parser("inspect", help="describe an adapter folder",
                       description="Show an adapter's base model, targets, ranks and size.")
    i.add_argument("adapter", help="adapter folder")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    i.set_defaults(func=cmd_inspect)

    q = sub.add_parser("quickstart", help="the demo: teach SmolLM2 a pirate persona on CPU, show before/after",
                       description="Generate a small chat dataset, fine-tune the default model, compare answers.")
    q.add_argument("--out", default="runs/quickstart", help="output folder (its run/ subfolder is replaced)")
    q.add_argument("--steps", type=int, default=60, help="optimizer steps (batch 8)")
    q.add_argument("--model", default="smollm2", help="base model")
    q.set_defaults(func=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lorafit never downloads weights
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as exc:
        if os.environ.get("LORAFIT_DEBUG"):
            raise
        print(f"lorafit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
