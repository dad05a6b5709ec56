"""Short chat examples end to end: whole `lorafit train` processes vs the PEFT loop a user would
write (issue #16), on the real SmolLM2-135M-Instruct and the real E2E NLG rows.

    python benchmarks/short_examples.py                 # 2 interleaved rounds, ~25 min on 2 cores
    python benchmarks/short_examples.py --profile       # + torch.profiler top ops of lorafit's step
    python benchmarks/short_examples.py --smoke         # 1 round, 4 vs 1 steps of batch 2: plumbing

The workload is what a new user runs: E2E rows as chat (a system prompt + the meaning
representation -> one reference sentence, 60-110 tokens), batch 8, max_length 160, r=16 on all
linear layers, lr 2e-4 cosine, no options beyond the library's defaults. Every row is a whole
process, timed from the outside: examples/s = (LONG - SHORT) * batch / (wall(LONG steps) -
wall(SHORT steps)), so the model load, tokenization, the final evaluation and saving cancel out.
Peak RSS is the LONG process's own (os.wait4's ru_maxrss; the driver never imports torch, so the
child's starting image is small).

PEFT rows: transformers' `AutoModelForCausalLM.from_pretrained` on the same safetensors folder, PEFT's
`get_peft_model`, a plain loop (AdamW, the same cosine schedule and clipping, `model(**batch).loss`,
padding to the longest). The PEFT script takes its batches from lorafit's data functions, so both
libraries train on the very same token ids in the same order; only the model side differs.

Quality check (issue #16 item 4): every LONG run ends with the validation loss on the same 128
devset rows (16 batches of 8); a row claimed faster must land within 2% of PEFT fp32's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "e2e_nlg"
RESULTS = HERE / "results"
VAL_TOLERANCE = 0.02

ROWS = {  # key -> (label, library, extra: PEFT precision or lorafit --set overrides)
    "peft-fp32": ("PEFT fp32 (plain loop, padding to the longest)", "peft", ["fp32"]),
    "peft-bf16": ("PEFT + bf16 autocast", "peft", ["bf16"]),
    "lorafit": ("lorafit default", "lorafit", []),
    "lorafit-gc": (
        "lorafit + gradient checkpointing",
        "lorafit",
        ["train.gradient_checkpointing=true"],
    ),
}
BASELINE = "peft-fp32"
BEFORE = "lorafit-before"  # --before REF: lorafit's default at an earlier commit, side by side


def write_config(path: Path, batch: int, max_length: int, n_examples: int) -> Path:
    """The user's run config: only what the workload needs, the library's defaults otherwise."""
    path.write_text(
        "model:\n  name: smollm2\n"
        "data:\n"
        f"  train: {DATA / 'trainset.csv'}\n"
        f"  validation: {DATA / 'devset.csv'}\n"
        "  columns: {mr: prompt, ref: completion}\n"
        "  system_prompt: Write one sentence describing the restaurant.\n"
        f"  max_length: {max_length}\n"
        f"  max_examples: {n_examples}\n"
        "train:\n"
        f"  batch_size: {batch}\n"
        "  eval_every: 0\n"
        "  eval_batches: 16\n"
        "  save_every: 0\n"
        "  seed: 0\n"
    )
    return path


# ------------------------------------------------------------------------------ PEFT child --
def peft_child(precision: str, config: str, steps: int, out: Path) -> None:
    """What a PEFT user writes, on lorafit's batches (identical token ids and order)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    from lorafit.data import CausalLMCollator, build_causal_lm_examples
    from lorafit.data.batching import batches
    from lorafit.models import gguf_cache
    from lorafit.models.loading import load_tokenizer
    from lorafit.models.sources import resolve_model_path
    from lorafit.train.config import load_run_config
    from lorafit.train.setup import read_splits

    cfg = load_run_config(config, [f"train.max_steps={steps}"])
    d, t = cfg.data, cfg.train
    gguf = resolve_model_path(cfg.model.name)
    folder = gguf_cache.cache_folder(gguf, cfg.model.cache_dir)
    if not folder.is_dir():
        gguf_cache.convert(gguf, folder, cfg.model.cache_dir)
    tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
    train_rec, val_rec, _ = read_splits(cfg)
    build = dict(max_length=d.max_length, system_prompt=d.system_prompt)
    train = build_causal_lm_examples(train_rec, tok, **build)
    val = build_causal_lm_examples(val_rec, tok, **build)[: t.eval_batches * t.batch_size]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules="all-linear",
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, round(t.warmup_ratio * steps), steps)
    collate = CausalLMCollator(tok.pad_token_id)
    amp = precision == "bf16"
    losses = []
    for step, batch in enumerate(batches(train, t.batch_size, collate, seed=t.seed, epoch=0)):
        if step == steps:
            break
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        for batch in batches(val, t.batch_size, collate, seed=0, epoch=0, shuffle=False):
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * n
            count += n
    model.save_pretrained(str(out.parent / "peft_adapter"))
    out.write_text(json.dumps({"losses": losses, "val_loss": total / max(count, 1)}))


# ---------------------------------------------------------------------------------- driver --
def checkout(ref: str, scratch: Path) -> Path:
    """The source tree of commit `ref` (a detached worktree in scratch), for the --before row."""
    tree = scratch / "before"
    if tree.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
        subprocess.run(["rm", "-rf", str(tree)], check=True)
    subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=True)
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-q", str(tree), ref], cwd=REPO, check=True
    )
    return tree


def run_once(key: str, steps: int, config: Path, scratch: Path, tag: str) -> dict:
    """One whole process: (wall seconds, peak RSS MB, final validation loss)."""
    label, lib, extra = ROWS[key]
    env = dict(os.environ)
    if key == BEFORE:
        env["PYTHONPATH"] = str(scratch / "before" / "src")
    run_dir = scratch / f"{key}_{steps}_{tag}"
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    if lib == "peft":
        result = run_dir / "result.json"
        cmd = [sys.executable, __file__, "--peft-child", extra[0], str(config), str(steps)]
        cmd.append(str(result))
    else:
        cmd = [sys.executable, "-m", "lorafit", "train", str(config), "--no-progress"]
        sets = [f"train.max_steps={steps}", f"train.output_dir={run_dir / 'run'}", *extra]
        for s in sets:
            cmd += ["--set", s]
    log = open(run_dir / "log.txt", "w")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = (run_dir / "log.txt").read_text().strip().splitlines()[-3:]
        raise SystemExit(f"{label} ({steps} steps) failed: {' | '.join(tail)}")
    if lib == "peft":
        val = json.loads((run_dir / "result.json").read_text())["val_loss"]
    else:
        rows = [json.loads(x) for x in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]
        val = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    res = {"wall": wall, "peak_mb": usage.ru_maxrss / 1024, "val_loss": val}
    print(
        f"  [{time.strftime('%H:%M:%S')}] {label} {steps} steps [{tag}]: {wall:.1f} s, "
        f"peak {res['peak_mb']:.0f} MB, val loss {val:.4f}",
        file=sys.stderr,
        flush=True,
    )
    return res


def table(results: dict, keys: list[str], batch: int, long: int, short: int) -> list[str]:
    per_round = {}
    for key in keys:
        walls = [lg["wall"] - sh["wall"] for lg, sh in zip(results[key][long], results[key][short])]
        per_round[key] = {
            "ex_s": statistics.median((long - short) * batch / w for w in walls),
            "peak": statistics.median(r["peak_mb"] for r in results[key][long]),
            "val": statistics.median(r["val_loss"] for r in results[key][long]),
        }
    base = per_round[BASELINE] if BASELINE in per_round else per_round[keys[0]]
    lines = [
        "| row | examples/s | vs PEFT fp32 | peak RSS MB | vs PEFT fp32 | val loss | vs PEFT fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key in keys:
        r = per_round[key]
        lines.append(
            f"| {ROWS[key][0]} | {r['ex_s']:.2f} | {r['ex_s'] / base['ex_s']:.2f}x | "
            f"{r['peak']:,.0f} | {r['peak'] / base['peak']:.2f}x | {r['val']:.4f} | "
            f"{(r['val'] - base['val']) / base['val']:+.1%} |"
        )
    bad = [
        ROWS[k][0]
        for k in keys
        if abs(per_round[k]["val"] - base["val"]) / base["val"] > VAL_TOLERANCE
    ]
    lines.append(
        "\nValidation loss within 2% of PEFT fp32 for every row: "
        + ("yes" if not bad else f"NO ({', '.join(bad)})")
    )
    return lines


def profile(config: Path, scratch: Path, steps: int = 4) -> list[str]:
    """torch.profiler over lorafit's training steps (after 2 warm-ups): the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from lorafit.train.config import load_run_config
    from lorafit.train.trainer import Trainer

    out = scratch / "profile_run"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cfg = load_run_config(str(config), [f"train.max_steps={steps + 2}", f"train.output_dir={out}"])
    trainer = Trainer(cfg, progress=False, log=lambda s: None)
    trainer.setup()
    from lorafit.train.step import micro_batches

    stream = micro_batches(
        trainer.data.train, cfg.train.batch_size, trainer.data.collator, cfg.train.seed
    )
    trainer.model.train()
    for _ in range(2):
        trainer.train_step(stream)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step(stream)
    text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return ["```", *text.splitlines(), "```"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--long", type=int, default=26, help="optimizer steps of the long run")
    p.add_argument("--short", type=int, default=6, help="optimizer steps of the short run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--before", help="also time lorafit's default at this earlier commit (git ref)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--scratch", default="runs/short_examples")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--peft-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peft_child:
        precision, config, steps, out = args.peft_child
        peft_child(precision, config, int(steps), Path(out))
        return 0
    if not DATA.is_dir():
        raise SystemExit(f"needs the E2E NLG files in {DATA}")
    if args.smoke:
        args.rounds, args.long, args.short, args.batch = 1, 4, 1, 2
    scratch = Path(args.scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    config = write_config(
        scratch / "config.yaml", args.batch, args.max_length, args.long * args.batch + 32
    )
    keys = args.rows.split(",")
    if args.before:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", args.before], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        ROWS[BEFORE] = (f"lorafit default at {sha} (before)", "lorafit", [])
        checkout(args.before, scratch)
        keys.insert(keys.index("lorafit") if "lorafit" in keys else len(keys), BEFORE)
    started = time.perf_counter()
    results: dict = {k: {args.long: [], args.short: []} for k in keys}
    for rnd in range(args.rounds):  # every row once per round: drift hits all rows alike
        for steps in (args.short, args.long):
            for key in keys if rnd % 2 == 0 else keys[::-1]:
                results[key][steps].append(run_once(key, steps, config, scratch, f"r{rnd}"))
    import platform

    lines = [
        "# Short chat examples end to end: `lorafit train` vs a PEFT loop (SmolLM2-135M-Instruct, E2E)",
        "",
        f"{platform.machine()}, {os.cpu_count()} CPUs; batch {args.batch}, max_length "
        f"{args.max_length}, r=16 all-linear, {args.rounds} interleaved round(s); examples/s "
        f"from whole processes: ({args.long} - {args.short}) steps x {args.batch} / (wall of "
        f"{args.long} steps - wall of {args.short}). Peak RSS: the {args.long}-step process. "
        f"Val loss: the first {16 * args.batch} devset rows, after the long run.",
    ]
    if args.rounds:
        lines += ["", *table(results, keys, args.batch, args.long, args.short)]
    if args.profile:
        lines += ["", "## lorafit default: top ops by self CPU time", "", *profile(config, scratch)]
    lines += ["", f"Total wall time: {(time.perf_counter() - started) / 60:.1f} min."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke and args.rounds:
        RESULTS.mkdir(exist_ok=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "short_examples.md").write_text(text)
        raw = {k: {str(s): v for s, v in r.items()} for k, r in results.items()}
        Path(args.out, "short_examples.json").write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
