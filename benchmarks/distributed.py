"""Data-parallel `lorafit train` on 1 vs 2 processes of this machine (issue #14): whole runs as
users launch them (`lorafit train CONFIG` and `lorafit train CONFIG --nproc 2`), SmolLM2-135M-
Instruct on E2E rows as chat, global batch 8 (4 per rank with 2 processes), r=16 all-linear, the
library's defaults otherwise. Rounds are interleaved.

    python benchmarks/distributed.py [--steps 20] [--rounds 2]

Per row: the job's tokens/s (median over the steps after the first 2, as the progress bar shows
it: all ranks' tokens over the step time), wall time of the whole command, peak RSS of the largest
process (each rank holds a whole model), and the final validation loss (the same run either way:
it must agree). On a 2-core CPU two processes share the same cores, so no speed-up is expected;
the point of the rows is that the job is correct and what it costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from short_examples import write_config  # the same user config: E2E as chat, library defaults

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"


ROWS = {  # key -> (processes, train.distributed)
    "1": (1, "ddp"),
    "2 ddp": (2, "ddp"),
    "2 fsdp": (2, "fsdp"),
}


def run(key: str, steps: int, scratch: Path, tag: str) -> dict:
    nproc, mode = ROWS[key]
    name = f"{key.replace(' ', '_')}_{tag}"
    out = scratch / name
    config = write_config(scratch / f"{name}.yaml", 8, 160, steps * 8 + 64)
    cmd = [sys.executable, "-m", "lorafit", "train", str(config), "--no-progress"]
    sets = [f"train.output_dir={out}", f"train.max_steps={steps}", "train.tensorboard=false"]
    for item in sets + [f"train.distributed={mode}"]:
        cmd += ["--set", item]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    log = open(scratch / f"{name}.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the largest of it and its children
    wall = time.perf_counter() - started
    log.close()
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (scratch / f"{name}.log").read_text().strip().splitlines()[-5:]
        raise SystemExit(f"{key} failed: {' | '.join(tail)}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 2]
    val = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    res = {
        "tokens_per_s": statistics.median(speed),
        "wall": wall,
        "peak_mb": usage.ru_maxrss / 1024,
        "val_loss": val,
    }
    print(f"  [{tag}] {key}: {res}", file=sys.stderr, flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--write", action="store_true", help="also write benchmarks/results/distributed.md"
    )
    args = p.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="lorafit_dist_"))
    results: dict[str, list[dict]] = {key: [] for key in ROWS}
    for r in range(args.rounds):
        for key in list(ROWS) if r % 2 == 0 else list(ROWS)[::-1]:
            results[key].append(run(key, args.steps, scratch, f"r{r}"))
    base = statistics.median(x["tokens_per_s"] for x in results["1"])
    lines = [
        f"{platform.machine()}, {os.cpu_count()} CPUs; SmolLM2-135M-Instruct, E2E as chat, global "
        f"batch 8, max_length 160, r=16 all-linear, {args.steps} steps, {args.rounds} interleaved "
        "round(s), medians",
        "",
        "| processes | batch per rank | tokens/s (job) | vs 1 | wall s | peak RSS per rank MB | final val loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, rs in results.items():
        tps = statistics.median(x["tokens_per_s"] for x in rs)
        lines.append(
            f"| {key} | {8 // ROWS[key][0]} | {tps:.0f} | {tps / base:.2f}x | "
            f"{statistics.median(x['wall'] for x in rs):.1f} | "
            f"{statistics.median(x['peak_mb'] for x in rs):.0f} | "
            f"{statistics.median(x['val_loss'] for x in rs):.5f} |"
        )
    print("\n".join(lines))
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "distributed.md").write_text(
            "# Data-parallel training, 1 vs 2 processes (issue #14)\n\n"
            "`python benchmarks/distributed.py --write`\n\n" + "\n".join(lines) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
