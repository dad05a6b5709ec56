"""The sub-commands: each reads its arguments and calls the library's plain functions."""

from __future__ import annotations

import argparse
import json
import sys

from lorafit.train.config import load_run_config


def cmd_train(args: argparse.Namespace) -> int:
    from lorafit.train import train

    cfg = load_run_config(args.config, args.set or [])
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    share = 100 * result.trainable_params / max(result.total_params, 1)
    print(
        f"\ndone: {result.steps} steps ({result.stopped}) in {result.wall_time_s:.1f}s, "
        f"peak memory {result.peak_memory_mb:.0f} MiB"
    )
    print(
        f"trainable params: {result.trainable_params:,} of {result.total_params:,} ({share:.3f}%)"
    )
    for k, v in result.final.items():
        print(f"  {k}: {v:.4f}")
    print(f"adapter: {result.adapter_dir}")
    if result.best_adapter_dir:
        print(f"best adapter (lowest validation loss): {result.best_adapter_dir}")
    out = result.output_dir
    print(f"metrics: {out / 'metrics.jsonl'}  plot: {out / 'loss.png'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lorafit.infer import evaluate_run

    cfg = load_run_config(args.config, args.set or [])
    metrics = evaluate_run(
        cfg,
        adapter=args.adapter,
        data=args.data,
        generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        limit=args.limit,
        predictions=args.predictions,
        loss=not args.no_loss,
    )
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lorafit.infer import chat, load_for_inference
    from lorafit.tasks import get_task

    model, tokenizer = load_for_inference(args.model, args.adapter, args.device, args.dtype)
    task = get_task(model.lorafit_task)
    if not task.generative:  # e.g. classification: one output per input line
        texts = args.prompt or [line.strip() for line in sys.stdin if line.strip()]
        for text, label in zip(texts, task.infer(model, tokenizer, texts)):
            print(f"{label}\t{text}")
        return 0
    if not args.prompt:
        chat(model, tokenizer, args.system, args.max_new_tokens, args.temperature)
        return 0
    replies = task.infer(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        num_beams=args.num_beams,
        system=args.system,
    )
    for prompt, reply in zip(args.prompt, replies):
        print(f"### {prompt}\n{reply}\n")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lorafit.infer.merging import REPORT_FILE, merge_to_folder

    report = merge_to_folder(
        args.adapter, args.out, args.model, args.dtype, args.base_quantize, args.force
    )
    note = "" if report["tokenizer"] else " (the base had no tokenizer files: weights only)"
    print(f"merged model written to {args.out} (safetensors){note}; load it with from_pretrained")
    if report["base_quantize"] != "none":
        print(
            f"merged into the {report['base_quantize']} base dequantized; logits vs the QLoRA "
            f"model: max |diff| {report['max_abs_logit_diff']:.4g}, mean "
            f"{report['mean_abs_logit_diff']:.4g} (max |logit| {report['max_abs_logit']:.3g}; "
            f"{report['probe']}); saved in {REPORT_FILE}"
        )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lorafit.tuner import describe_adapter

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
