"""LoRA beyond text: images (a pretrained CNN) and recommendation (embedding tables), real data.

    vision   EfficientNet-Lite0 (ImageNet) on Fashion-MNIST at 96 px: LoRA on the convolutions +
             head, full fine-tuning, linear probe (head only), from examples/fashion_mnist_*.yaml;
             scored on the official 10,000-image test set (confusion matrices kept)
    recsys   MovieLens ml-latest-small, time split (examples/movielens_split.py): a matrix
             factorisation pretrained on the early 70% (examples/movielens_pretrain.yaml), then on
             the later period: frozen (no training), LoRA on both embedding tables, full
             fine-tuning; scored on each user's last 20% of later ratings (later_test); the LoRA
             and full rows are the mean (± std) of --seeds training seeds (default 3)

    python benchmarks/beyond_text.py                 # both (~25 min on an idle 2-core CPU)
    python benchmarks/beyond_text.py --tasks recsys  # one
    python benchmarks/beyond_text.py --smoke         # tiny budgets, the same pipeline (~2 min)

Every run is a whole `lorafit train` process (wall time and peak RSS from os.wait4: the driver
never imports torch), every score a `lorafit eval` process on the report split. The runs of a task
share images / interactions, epochs, batch and seed; each method's learning rate was picked on
validation (recipes say how). Nothing is trained or tuned on a test split. Writes <out>/results.md
(also printed), results.json and results.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
MOVIELENS = REPO.parent / "shared" / "data" / "movielens_latest_small"
VISION = {
    "lora": "LoRA (convs r=8 + head)",
    "full": "full fine-tuning",
    "probe": "linear probe (head)",
}
RECSYS = {
    "frozen": "frozen pretrained",
    "lora": "LoRA (embeddings r=8 + biases)",
    "full": "full fine-tuning",
}


def run(cmd: list[str], log: Path) -> dict:
    """One lorafit process: wall seconds and peak RSS (its own, via wait4)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"failed ({log}): {' '.join(cmd)}\n{log.read_text()[-2000:]}")
    return {"wall_s": time.perf_counter() - started, "peak_rss_mb": usage.ru_maxrss / 1024}


def lorafit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorafit", *args]


def train(recipe: str, out: Path, overrides: list[str], name: str | None = None) -> dict:
    folder = out / (name or Path(recipe).stem)
    sets = [f"train.output_dir={folder}", *overrides]
    res = run(
        lorafit("train", recipe, *sum((["--set", s] for s in sets), [])), out / f"{folder.name}.log"
    )
    summary = json.loads((folder / "summary.json").read_text())
    product = Path(summary["adapter_dir"])
    weights = product / (
        "adapter_model.safetensors"
        if (product / "adapter_config.json").exists()
        else "model.safetensors"
    )
    return {
        **res,
        "folder": str(folder),
        "product": str(product),
        "trainable": summary["trainable_params"],
        "total": summary["total_params"],
        "file_mb": weights.stat().st_size / 2**20,
        "train_s": summary["wall_time_s"],
    }


def score(
    recipe: str, product: str, data: str, out: Path, name: str, overrides: list[str], report: bool
) -> dict:
    args = [
        "eval",
        recipe,
        "--adapter",
        product,
        "--data",
        data,
        *sum((["--set", s] for s in overrides), []),
    ]
    if report:
        args += ["--report", str(out / f"{name}_test")]
    log = out / f"{name}_eval.log"
    run(lorafit(*args), log)
    text = log.read_text()
    return json.loads(text[text.rindex("{") :])  # `lorafit eval` prints the metrics last


def vision(out: Path, smoke: bool) -> list[dict]:
    test = str(FASHION / "t10k-images-idx3-ubyte.gz")
    small = (
        ["data.max_examples=96", "data.image_size=32", "train.max_steps=2", "train.eval_every=0"]
        if smoke
        else []
    )
    rows = []
    for key, label in VISION.items():
        recipe = f"examples/fashion_mnist_{key}.yaml"
        r = train(recipe, out, small)
        r.update(
            score(
                recipe,
                r["product"],
                test,
                out,
                f"fashion_mnist_{key}",
                small[:2] + (["data.max_examples=64"] if smoke else []),
                True,
            )
        )
        rows.append({"task": "vision", "method": label, **r})
    return rows


def recsys(out: Path, smoke: bool, seeds: int) -> list[dict]:
    splits = out / "movielens"
    subprocess.run(
        [
            sys.executable,
            "examples/movielens_split.py",
            "--data",
            str(MOVIELENS),
            "--out",
            str(splits),
        ],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    paths = {
        k: str(splits / f"{k}.csv")
        for k in ("early_train", "early_val", "later_train", "later_val", "later_test")
    }
    data = [
        f"data.{k}={v}"
        for k, v in (("train", paths["later_train"]), ("validation", paths["later_val"]))
    ]
    data.append(f"data.history=[{paths['early_train']}, {paths['early_val']}]")
    budget = ["train.max_steps=3", "train.eval_every=0"] if smoke else []
    pre = train(
        "examples/movielens_pretrain.yaml",
        out,
        [
            f"data.train={paths['early_train']}",
            f"data.validation={paths['early_val']}",
            f"data.history=[{paths['later_train']}]",
            *budget,
        ],
    )
    pretrained = str(Path(pre["folder"]) / ("model" if smoke else "best_model"))
    rows = [{"task": "recsys", "method": "pretraining (early 70%)", **pre, "product": pretrained}]
    for key, label in RECSYS.items():
        recipe = f"examples/movielens_{'lora' if key == 'frozen' else key}.yaml"
        sets = [f"model.name={pretrained}", *data]
        runs = []
        for seed in [0] if key == "frozen" else range(seeds):
            if key == "frozen":
                r = {
                    "trainable": 0,
                    "file_mb": 0.0,
                    "train_s": 0.0,
                    "wall_s": 0.0,
                    "peak_rss_mb": 0.0,
                    "product": pretrained,
                }
            else:
                name = f"movielens_{key}_seed{seed}"
                r = train(recipe, out, [*sets, f"train.seed={seed}", *budget], name)
            product = (
                r["product"]
                if key == "frozen" or smoke
                else str(Path(r["folder"]) / ("best_adapter" if key == "lora" else "best_model"))
            )
            name = f"movielens_{key}" + ("" if key == "frozen" else f"_seed{seed}")
            r.update(score(recipe, product, paths["later_test"], out, name, sets, False))
            runs.append(r)
        rows.append({"task": "recsys", "method": label, **mean_of(runs)})
    return rows


def mean_of(runs: list[dict]) -> dict:
    """The seeds' runs as one row: numbers averaged, each metric's per-seed values and std kept."""
    row = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            values = [r[k] for r in runs]
            row[k] = sum(values) / len(values)
            if k in METRICS:
                mean = row[k]
                row[f"{k}_seeds"] = values
                row[f"{k}_std"] = (
                    sum((x - mean) ** 2 for x in values) / max(len(values) - 1, 1)
                ) ** 0.5
    row["seeds"] = len(runs)
    return row


METRICS = ("accuracy", "macro_f1", "rmse", "recall@10", "ndcg@10")


def recovered(rows: list[dict], metric: str) -> float | None:
    by = {r["method"]: r for r in rows if r["task"] == "recsys"}
    f, lo, fu = (by.get(RECSYS[k], {}).get(metric) for k in ("frozen", "lora", "full"))
    if None in (f, lo, fu) or fu == f:
        return None
    return (lo - f) / (fu - f)


def table(rows: list[dict]) -> str:
    lines = [
        "| task | method | trainable params | % of model | adapter / model file | train time | peak RSS | metrics (report split) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        metrics = ", ".join(
            f"{k} {r[k]:.4f}" + (f" ± {r[k + '_std']:.4f}" if r.get("seeds", 1) > 1 else "")
            for k in METRICS
            if k in r
        )
        if "pretraining" in r["method"]:
            metrics = "(scored below as the frozen row)"
        share = 100 * r["trainable"] / r["total"] if r.get("total") else 0.0
        lines.append(
            f"| {r['task']} | {r['method']} | {round(r['trainable']):,} | {share:.1f}% | {r['file_mb']:.2f} MB | "
            f"{r['train_s']:.0f} s | {r['peak_rss_mb']:,.0f} MB | {metrics} |"
        )
    notes = []
    for metric in ("ndcg@10", "rmse"):
        share = recovered(rows, metric)
        if share is not None:
            notes.append(
                f"LoRA recovers {100 * share:.0f}% of full fine-tuning's change over the frozen model in {metric}"
            )
    return "\n".join(lines) + ("\n\n" + "; ".join(notes) + "." if notes else "")


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for ax, task, metric in ((axes[0], "vision", "accuracy"), (axes[1], "recsys", "ndcg@10")):
        data = [
            (r["method"], r[metric], round(r["trainable"]))
            for r in rows
            if r["task"] == task and metric in r
        ]
        if not data:
            ax.set_visible(False)
            continue
        bars = ax.bar(range(len(data)), [d[1] for d in data], color="#4c72b0")
        for bar, d in zip(bars, data):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                bar.get_height(),
                f"{d[1]:.3f}\n{d[2]:,} trained",
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xticks(range(len(data)), [d[0] for d in data], fontsize=7, rotation=12)
        ax.set_ylabel(f"test {metric}")
        ax.set_ylim(0, max(d[1] for d in data) * 1.3)
        ax.set_title(
            {"vision": "Fashion-MNIST, EfficientNet-Lite0", "recsys": "MovieLens later period"}[
                task
            ],
            fontsize=9,
        )
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="vision,recsys")
    ap.add_argument("--out", default="runs/beyond_text")
    ap.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="recsys: LoRA and full rows as the mean of this many seeds",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny budgets: checks the pipeline only")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; give another --out")
    out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    missing = [
        str(p)
        for t, p in (("vision", FASHION), ("recsys", MOVIELENS))
        if t in tasks and not p.is_dir()
    ]
    if missing:
        raise SystemExit(f"missing data: {', '.join(missing)} (see ../shared/data/README.md)")
    rows = (vision(out, args.smoke) if "vision" in tasks else []) + (
        recsys(out, args.smoke, 1 if args.smoke else args.seeds) if "recsys" in tasks else []
    )
    md = table(rows)
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, out / "results.png")
    print(md)


if __name__ == "__main__":
    main()
