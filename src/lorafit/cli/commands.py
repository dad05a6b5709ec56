"""The sub-commands: each reads its arguments and calls the library's plain functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lorafit.train.config import load_run_config


def cmd_train(args: argparse.Namespace) -> int:
    from lorafit.train import train
    from lorafit.train.distributed import launch, launched

    cfg = load_run_config(args.config, args.set or [])  # a bad config fails before any launch
    if args.nproc is not None and not launched():
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        if args.nproc > 1:
            return launch(args.nproc, _train_argv(args))
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports for the job
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


def cmd_tune(args: argparse.Namespace) -> int:
    from lorafit.train.tune import parse_duration, tune

    budget = parse_duration(args.budget) if args.budget else None
    tune(args.config, args.set or [], budget, args.trials, args.study, args.seeds)
    return 0


def _train_argv(args: argparse.Namespace) -> list[str]:
    """`lorafit train` arguments for each process of a --nproc launch (without --nproc)."""
    argv = ["train"] + ([args.config] if args.config else [])
    for item in args.set or []:
        argv += ["--set", item]
    if args.resume is True:
        argv.append("--resume")
    elif args.resume:
        argv += ["--resume", str(args.resume)]
    return argv + (["--no-progress"] if args.no_progress else [])


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
        report=args.report,
    )
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lorafit.infer import chat, load_for_inference
    from lorafit.tasks import get_task

    if args.decode_weights != "float":
        return _generate_with_engine(args)

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


def _generate_with_engine(args: argparse.Namespace) -> int:
    """`lorafit generate --decode-weights ...`: the prompts go through lorafit serve's engine
    (unmerged adapter, the lean decoding step), so the replies are what the server answers."""
    from lorafit.serve import build, complete

    if not args.prompt:
        raise ValueError(f"--decode-weights {args.decode_weights} answers --prompt prompts only")
    if args.num_beams != 1:
        raise ValueError(f"--decode-weights {args.decode_weights} decodes without beam search")
    adapters = {"adapter": args.adapter} if args.adapter else {}
    registry = build(
        args.model,
        adapters,
        device=args.device,
        dtype=args.dtype,
        slots=min(len(args.prompt), 16),
        decode_weights=args.decode_weights,
    )
    try:
        name = "adapter" if args.adapter else registry.base_name
        system = [{"role": "system", "content": args.system}] if args.system else []
        chats = [[*system, {"role": "user", "content": p}] for p in args.prompt]
        replies = complete(registry, name, chats, args.max_new_tokens, args.temperature)
    finally:
        registry.engine.close(drain=False)
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


def cmd_export(args: argparse.Namespace) -> int:
    from lorafit.export import export

    report = export(
        args.adapter,
        args.format,
        args.out,
        args.dtype,
        args.model,
        args.force,
        modelfile=not args.no_modelfile,
        shard_size=args.shard_size,
    )
    size = Path(args.out).stat().st_size / 2**20 if Path(args.out).is_file() else None
    what = f" ({size:.1f} MiB, {report.get('dtype', 'f32')})" if size is not None else ""
    print(f"{args.format} written to {args.out}{what}")
    if report.get("modelfile"):
        note = "" if report["ollama_template"] else " (no TEMPLATE: Ollama reads the GGUF's)"
        print(f"Ollama Modelfile: {report['modelfile']}{note}; ollama create NAME -f Modelfile")
    if args.format == "gguf-lora":
        print(f"use it on its base: llama-cli -m {report['base_gguf']} --lora {args.out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lorafit.export.check import TOLERANCE, check

    if args.tokens < 1:
        raise ValueError("--tokens must be at least 1")
    result = check(args.adapter, args.gguf, args.url, args.prompts, args.tokens, args.served_model)
    rows = result["rows"]
    if args.json:
        out = {**result, "rows": [{**asdict(r), "ok": r.ok} for r in rows]}
        print(json.dumps(out, indent=2))
        return 0 if result["ok"] else 1
    print(
        f"{result['prompts']} probe prompts, {args.tokens} greedy tokens each; reference: the adapter unmerged, fp32"
    )
    print(
        f"{'row':9} {'runtime':28} {'dtype':8} {'greedy equal':>13} {'logit err':>10} {'limit':>7}  result"
    )
    for r in rows:
        max_err, share = TOLERANCE.get(r.dtype, TOLERANCE["f16"])
        err = "-" if r.logit_error is None else f"{r.logit_error:.2e}"
        limit = "-" if max_err is None else f"{max_err:.0e}"
        status = "ok" if r.ok else "FAIL"
        print(
            f"{r.name:9} {r.runtime[:28]:28} {r.dtype:8} {r.greedy_equal:>6}/{r.prompts:<6} {err:>10} {limit:>7}  {status} (needs {share:.0%} equal)"
        )
        for note in r.notes:
            print(f"          {note}")
    print("loads in: " + "; ".join(f"{k}: {v}" for k, v in result["lint"].items()))
    return 0 if result["ok"] else 1


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


def cmd_plan(args: argparse.Namespace) -> int:
    from lorafit.train.plan import fit_to_memory, human, parse_size, plan_run

    limit = parse_size(args.memory) if args.memory else None  # a typo fails before any work
    cfg = load_run_config(args.config, args.set or [])
    plan = plan_run(cfg, probe=not args.no_probe)
    est, fit, error = plan.estimate, None, None
    if limit is not None:
        try:
            sets, new = fit_to_memory(cfg, limit)
            fit = {"limit": limit, "fits": not sets, "set": sets, "total": new.total}
        except ValueError as exc:  # printed after the table, as the one-line error
            fit, error = {"limit": limit, "fits": False, "error": str(exc)}, exc
    if args.json:
        print(json.dumps({**plan.to_dict(), "fit": fit}, indent=2, default=str))
    else:
        s = plan.settings
        print(f"plan: {s['model']} ({s['head']}, {s['method']}), {s['device']}, {s['precision']}")
        print(
            f"  quantize {s['quantize']}, batch {s['batch_size']} x {s['seq_len']} tokens, "
            f"grad_accum {s['grad_accum']}, checkpointing {s['gradient_checkpointing']}, "
            f"loss_chunk {s['loss_chunk']}\n"
        )
        for label, n in est.rows():
            print(f"  {label:<62} {human(n):>10}")
        for note in est.notes:
            print(f"  note: {note}")
        if plan.step_time_s is not None:
            off = 100 * (plan.probe_peak / est.total - 1)
            print(
                f"\nprobe: {plan.step_time_s:.3g} s per optimizer step; measured peak "
                f"{human(plan.probe_peak)} ({off:+.0f}% vs the estimate) [{plan.probe_note}]"
            )
        else:
            print(f"\nprobe: {plan.probe_note}")
        if fit and fit["fits"]:
            print(f"\nfits in {human(limit)}: {human(limit - est.total)} headroom")
        elif fit and not error:
            sets = [*(args.set or []), *fit["set"]]
            train = " ".join(["lorafit train", *([args.config] if args.config else [])])
            print(f"\ndoes not fit in {human(limit)}; estimated {human(fit['total'])} with:")
            print(f"  {train} --set " + " --set ".join(sets))
    if error is not None:
        raise error
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lorafit.serve import build, check_binding, serve

    adapters = {}
    for item in args.adapters:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapters takes NAME=DIR items, got {item!r}")
        if name in adapters:
            raise ValueError(f"--adapters names {name!r} twice")
        adapters[name] = path
    api_key = args.api_key or os.environ.get("LORAFIT_API_KEY") or None
    check_binding(args.host, api_key)  # refuse before the model loads
    for flag in ("slots", "max_len", "max_adapters", "max_rank", "max_tokens", "max_concurrent"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    registry = build(
        args.model,
        adapters,
        args.adapter_dir,
        args.device,
        args.dtype,
        args.slots,
        args.max_len,
        args.max_adapters,
        args.max_rank,
        args.compile,
        args.decode_weights,
    )
    serve(
        registry,
        args.host,
        args.port,
        api_key,
        max_tokens=args.max_tokens,
        max_prompt_tokens=max(1, args.max_len - 1),
        max_concurrent=args.max_concurrent,
    )
    return 0
