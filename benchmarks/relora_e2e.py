"""ReLoRA vs LoRA on E2E NLG (issue 15): the same budget and seed, three adapters on SmolLM2-135M.

    lora-r8      LoRA r=8  (alpha 16)                     the recipe examples/e2e_lora.yaml
    relora-r8    LoRA r=8  + train.relora every steps/4   3 restarts: one saved update of rank 32
    lora-r64     LoRA r=64 (alpha 128)

Every run: the recipe's data, lr, batch and seed, --steps optimizer steps; the final adapter is
scored with greedy decoding (64 new tokens) on the first --mrs distinct MRs of the E2E test set,
each output against all of its references (BLEU / ROUGE-L / METEOR / CIDEr, as in
benchmarks/lora_vs_full.py). Each run is its own process, one after the other.

    python benchmarks/relora_e2e.py                  # 120 steps, 100 test MRs: ~25 min on 2 cores
    python benchmarks/relora_e2e.py --steps 250 --mrs 630
    python benchmarks/relora_e2e.py --smoke          # 4 steps, 4 MRs: the pipeline (~2 min)

Writes <out>/results.md (printed) and <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "e2e_lora.yaml"
TEST = "../shared/data/e2e_nlg/testset_w_refs.csv"


def variants(steps: int) -> dict[str, list[str]]:
    every = max(2, steps // 4)
    return {
        "lora-r8": ["lora.r=8", "lora.lora_alpha=16"],
        "relora-r8": [
            "lora.r=8",
            "lora.lora_alpha=16",
            f"train.relora={{every: {every}, warmup_steps: {max(1, every // 10)}}}",
        ],
        "lora-r64": ["lora.r=64", "lora.lora_alpha=128"],
    }


def child(name: str, overrides: list[str], out: Path, mrs: int) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from lora_vs_full import score_generation

    from lorafit.train import load_run_config, train

    cfg = load_run_config(str(RECIPE), overrides)
    result = train(cfg, progress=False)
    started = time.perf_counter()
    scores = score_generation(cfg, str(result.adapter_dir), TEST, mrs, out / "predictions.jsonl")
    from lorafit.tuner.peft_format import read_adapter

    config, _ = read_adapter(result.adapter_dir)
    row = {
        "name": name,
        "steps": result.steps,
        "trainable_params": result.trainable_params,
        "saved_rank": config.r,
        "adapter_mb": sum(p.stat().st_size for p in result.adapter_dir.glob("*.safetensors"))
        / 2**20,
        "train_s": result.wall_time_s,
        "peak_mb": result.peak_memory_mb,
        "val_loss": result.final.get("val_loss"),
        "scores": scores,
        "eval_s": time.perf_counter() - started,
    }
    (out / "result.json").write_text(json.dumps(row, indent=2) + "\n")


def markdown(rows: list[dict], args) -> str:
    lines = [
        "# ReLoRA vs LoRA on E2E NLG (SmolLM2-135M-Instruct)",
        "",
        f"Recipe examples/e2e_lora.yaml (lr 2e-3, batch 8, seed 0), {args.steps} steps for every "
        f"run; ReLoRA restarts every {max(2, args.steps // 4)} steps. Final adapters, greedy "
        f"decoding on the first {args.mrs} test MRs, scored against all references.",
        "",
        "| run | trainable params | saved rank | adapter MB | train s | peak MB | val loss | "
        "BLEU | ROUGE-L | METEOR | CIDEr |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["scores"]
        lines.append(
            f"| {r['name']} | {r['trainable_params']:,} | {r['saved_rank']} | "
            f"{r['adapter_mb']:.1f} | {r['train_s']:.0f} | {r['peak_mb']:.0f} | "
            f"{r['val_loss']:.4f} | {s['bleu']:.1f} | {100 * s['rouge_l']:.1f} | {s['meteor']:.3f} | "
            f"{s['cider']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/relora_e2e")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--mrs", type=int, default=100, help="distinct test MRs generated and scored")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.mrs = 4, 4
    runs = variants(args.steps)
    common = [f"train.max_steps={args.steps}", "train.eval_every=0", "train.save_every=0"]
    if args.smoke:
        common += ["data.max_examples=64", "train.eval_batches=1"]
    if args.child:
        name, folder = args.child
        out = Path(folder)
        child(name, [*runs[name], *common, f"train.output_dir={out / 'run'}"], out, args.mrs)
        return 0
    out = Path(args.out).resolve()
    rows = []
    for name in runs:
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)  # this benchmark's own folder: a fresh run
        folder.mkdir(parents=True)
        cmd = [sys.executable, __file__, "--child", name, str(folder), "--steps", str(args.steps)]
        cmd += ["--mrs", str(args.mrs)] + (["--smoke"] if args.smoke else [])
        print(f"{name}: training {args.steps} steps", flush=True)
        with open(folder / "log.txt", "w") as log:
            code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if code:
            raise SystemExit(f"{name} failed ({code}); see {folder / 'log.txt'}")
        rows.append(json.loads((folder / "result.json").read_text()))
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    text = markdown(rows, args)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
