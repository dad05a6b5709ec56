"""QLoRA on a CPU: lorafit's bf16 / NF4 / int8 bases beside PEFT (+ bitsandbytes 4-bit), on real
model shapes; load peaks, step times, peak memory; and E2E quality of NF4 vs bf16 LoRA.

Models: SmolLM2-135M-Instruct (the real weights, through `lorafit.models.load_model`: the real
streaming load), and for scale the real *configs* of SmolLM2-1.7B and Llama-3-8B with random
weights (speed and memory do not depend on the values; the random tensors go through the same
streaming loader, one at a time, as a checkpoint's would). Every (model, row, round) runs in a
fresh process, so peak RSS (VmHWM) is that run's alone; rounds are interleaved. One step = batch 1
x T tokens, gradient checkpointing, LoRA r=8 on all linear layers, AdamW, bf16 autocast.

    python benchmarks/qlora.py                      # 135m + 1.7b rows, 2 rounds, then 8b nf4
    python benchmarks/qlora.py --models 1.7b --rounds 3
    python benchmarks/qlora.py --quality            # + E2E BLEU, bf16 LoRA vs NF4 (~25 min)
    python benchmarks/qlora.py --smoke              # tiny shapes: checks the script (tests run it)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

CONFIGS = {  # the real configs (hidden, layers, intermediate, vocab, heads, kv heads, tied)
    "1.7b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        intermediate_size=8192,
        vocab_size=49152,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=True,
        rope_theta=130000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        vocab_size=128256,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
    "smoke": dict(
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=256,
        vocab_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
MODEL_TITLES = {
    "135m": "SmolLM2-135M-Instruct (real weights)",
    "1.7b": "SmolLM2-1.7B config, random weights",
    "8b": "Llama-3-8B config, random weights",
    "smoke": "tiny config (smoke)",
}
ROWS = {  # row -> (library, quantize)
    "lorafit bf16": ("lorafit", "none"),
    "lorafit nf4": ("lorafit", "nf4"),
    "lorafit int8": ("lorafit", "int8"),
    "peft + bnb nf4": ("peft", "nf4"),
    "peft bf16": ("peft", "none"),
}
# The 8B bf16 rows would need 16 GB of bf16 weights (PEFT also builds the bf16 model before
# bitsandbytes quantizes it): only the quantized lorafit rows run at that size.
ROWS_FOR = {"8b": ["lorafit nf4", "lorafit int8"]}


def vm_hwm() -> int:
    """Peak RSS of this process in bytes (VmHWM; unlike ru_maxrss it does not survive exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS
        f.write("5")


class RandomWeights:
    """A checkpoint-like tensor source with random values, for configs without released weights
    here: N(0, 0.02) matrices, ones for norms; one tensor at a time, like a file would give."""

    def __init__(self, model, seed: int = 0):
        import torch

        tied = getattr(model.config, "tie_word_embeddings", False)
        self.shapes = {
            k: tuple(v.shape)
            for k, v in model.state_dict(keep_vars=True).items()
            if not (tied and k == "lm_head.weight")
        }
        self.gen = torch.Generator().manual_seed(seed)

    def keys(self):
        return list(self.shapes)

    def shape(self, name):
        return self.shapes[name]

    def read(self, name, dtype):
        import torch

        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        return torch.randn(shape, generator=self.gen, dtype=dtype or torch.float32) * 0.02


def model_nbytes(model) -> int:
    """Bytes of the model's tensors: quantized layers by their storage, the rest by theirs."""
    from lorafit.quant import QuantizedLinear

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.nbytes()
            seen.update(id(t) for t in [*module.buffers(), *module.parameters()])
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            try:  # bitsandbytes' packed Params4bit included; wrapper subclasses have no storage
                total += t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):
                pass
    return total


# ------------------------------------------------------------------------------ one child run --
def build_lorafit(model_key: str, quantize: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lorafit.models import load_model
    from lorafit.models.streaming import build_empty, load_streaming

    if model_key == "135m":
        model, _ = load_model("smollm2", dtype="bfloat16", device="cpu", quantize=quantize)
        return model, None
    config = LlamaConfig(**CONFIGS[model_key])
    model = build_empty(AutoModelForCausalLM, config, torch.bfloat16, "sdpa")
    source = RandomWeights(model)
    largest = max(4 * __import__("math").prod(source.shape(k)) for k in source.keys())
    q = None if quantize == "none" else quantize
    load_streaming(
        model,
        source,
        torch.bfloat16,
        torch.device("cpu"),
        q,
        keep_float=lambda path: path == "lm_head",
    )
    return model, largest


def build_peft(model_key: str, quantize: str):
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, LlamaConfig

    if model_key == "135m":
        from lorafit.models.gguf_cache import cache_folder
        from lorafit.models.sources import resolve_model_path

        folder = cache_folder(resolve_model_path("smollm2"), None)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    else:
        torch.set_default_dtype(torch.bfloat16)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIGS[model_key]))
        torch.set_default_dtype(torch.float32)
    if quantize == "nf4":  # what transformers' BitsAndBytesConfig(load_in_4bit=True) builds
        for path, m in list(model.named_modules()):
            if type(m) is nn.Linear and path != "lm_head":
                q = bnb.nn.Linear4bit(
                    m.in_features,
                    m.out_features,
                    bias=m.bias is not None,
                    compute_dtype=torch.bfloat16,
                    quant_type="nf4",
                    compress_statistics=True,
                )
                q.weight = bnb.nn.Params4bit(
                    m.weight.data,
                    requires_grad=False,
                    quant_type="nf4",
                    compress_statistics=True,
                    blocksize=64,
                )
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, q.to("cpu"))
    return model, None


def child(model_key: str, row: str, seq: int, steps: int, out: Path) -> None:
    import torch

    library, quantize = ROWS[row]
    torch.manual_seed(0)
    base_rss = vm_rss()
    reset_hwm()
    t0 = time.perf_counter()
    build = build_lorafit if library == "lorafit" else build_peft
    model, largest = build(model_key, quantize)
    load_s = time.perf_counter() - t0
    load_peak, resident = vm_hwm(), vm_rss()
    final = model_nbytes(model)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    if library == "lorafit":
        from lorafit.train.step import forward_backward, prepare_for_training
        from lorafit.tuner import LoraConfig, inject

        inject(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        prepare_for_training(model, "bf16", gradient_checkpointing=True)

        def fb():
            return forward_backward(model, [batch], "causal-lm", "bf16")[0]
    else:
        import peft

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
        )
        model.config.use_cache = False

        def fb():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            return loss.item()

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for i in range(steps + 1):  # the first step warms up (allocator, lazy init)
        t = time.perf_counter()
        losses.append(fb())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    result = {
        "model": model_key,
        "row": row,
        "seq": seq,
        "load_s": load_s,
        "load_peak": load_peak,
        "resident": resident,
        "start_rss": base_rss,
        "final_bytes": final,
        "largest_fp32": largest,
        "step_s": times,
        "first_loss": losses[0],
        "peak": vm_hwm(),
        "trainable": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps(result) + "\n")


# ---------------------------------------------------------------------------------- parent --
def spawn(model_key: str, row: str, seq: int, steps: int, scratch: Path, tag: str) -> dict:
    out = scratch / f"{model_key}_{row.replace(' ', '_').replace('+', '')}_{tag}.json"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        model_key,
        row,
        "--seq",
        str(seq),
        "--steps",
        str(steps),
        "--child-out",
        str(out),
    ]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"  {model_key} {row}: FAILED ({' | '.join(tail)})", file=sys.stderr)
        return {"model": model_key, "row": row, "error": " | ".join(tail)[-300:]}
    res = json.loads(out.read_text())
    print(
        f"  {model_key} {row} [{tag}]: load {res['load_s']:.0f}s, steps "
        f"{', '.join(f'{t:.1f}' for t in res['step_s'])} s, peak {res['peak'] / 1e9:.2f} GB "
        f"({time.perf_counter() - started:.0f}s)",
        file=sys.stderr,
        flush=True,
    )
    return res


def plan_estimate(model_key: str, quantize: str, seq: int) -> float | None:
    """lorafit plan's estimate of the same run's peak (GB), when the planner is available."""
    try:
        import torch
        from transformers import AutoConfig, LlamaConfig

        from lorafit.train.plan import estimate_memory
    except ImportError:
        return None
    if model_key == "135m":
        from lorafit.models.gguf_cache import cache_folder
        from lorafit.models.sources import resolve_model_path

        config = AutoConfig.from_pretrained(cache_folder(resolve_model_path("smollm2"), None))
    else:
        config = LlamaConfig(**CONFIGS[model_key])
    est = estimate_memory(
        config,
        quantize=quantize,
        compute_dtype=torch.bfloat16,
        batch_size=1,
        seq_len=seq,
        gradient_checkpointing=True,
        lora_r=8,
        target_modules="all-linear",
        load_dtype=torch.bfloat16,  # the benchmark loads straight into bf16
    )
    return est.total / 1e9


def merge_rounds(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    steps = [t for r in ok for t in r["step_s"]]
    return {
        **ok[-1],
        "step_s": steps,
        "step_median": statistics.median(steps),
        "peak": max(r["peak"] for r in ok),
        "load_peak": max(r["load_peak"] for r in ok),
        "load_s": statistics.median(r["load_s"] for r in ok),
        "rounds": len(ok),
    }


def table(results: dict, seq: int, plans: dict) -> list[str]:
    lines = [
        "| model | row | load s | load transient GB | bound GB | step s (median) | vs lorafit bf16 "
        "| tokens/s | peak RSS GB | plan estimate GB | first loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (model_key, row), r in results.items():
        if "error" in r:
            lines.append(f"| {model_key} | {row} | failed: {r['error'][:120]} |" + " |" * 8)
            continue
        ref = results.get((model_key, "lorafit bf16"), {}).get("step_median")
        ratio = f"{r['step_median'] / ref:.2f}x" if ref else ""
        transient = (r["load_peak"] - r["resident"]) / 1e9
        bound = ""
        if r["row"].startswith("lorafit") and r.get("largest_fp32"):
            bound = f"{(r['largest_fp32'] + 300e6) / 1e9:.2f}"
        est = plans.get((model_key, row))
        lines.append(
            f"| {model_key} | {row} | {r['load_s']:.0f} | "
            f"{transient:.2f} | {bound} | "
            f"{r['step_median']:.2f} | {ratio} | {seq / r['step_median']:.0f} | "
            f"{r['peak'] / 1e9:.2f} | {'' if est is None else f'{est:.2f}'} | "
            f"{r['first_loss']:.3f} |"
        )
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {k: v for k, v in results.items() if "error" not in v}
    models = sorted({m for m, _ in ok}, key=list(MODEL_TITLES).index)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in (
        (axes[0], "step_median", "step time (s)"),
        (axes[1], "peak", "peak RSS (GB)"),
    ):
        for i, m in enumerate(models):
            rows = [r for (mm, r) in ok if mm == m]
            vals = [ok[(m, r)][key] / (1e9 if key == "peak" else 1) for r in rows]
            ax.bar([f"{m}\n{r}" for r in rows], vals, color=f"C{i}")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=70, labelsize=7)
    fig.suptitle("LoRA vs QLoRA on a 2-core CPU (batch 1, checkpointing, r=8 all-linear)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def quality(out: Path, smoke: bool) -> list[str]:
    """E2E BLEU: the E2E LoRA recipe (benchmarks/lora_vs_full.py's budget x0.7) with a bf16 base
    and with an NF4 base; the QLoRA adapter is scored on the NF4 base it was trained on."""
    rows = []
    for name, extra in (("bf16 LoRA", []), ("QLoRA nf4", ["model.quantize=nf4"])):
        run_dir = out / f"e2e_{name.split()[0].lower()}"
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        sys.path.insert(0, str(REPO / "benchmarks"))
        import lora_vs_full as lvf

        overrides, limit = lvf.run_overrides("e2e", "lora", 0.7, smoke)
        cmd = [
            sys.executable,
            str(REPO / "benchmarks" / "lora_vs_full.py"),
            "--child",
            "e2e",
            "lora",
            "--run-dir",
            str(run_dir),
            "--overrides",
            json.dumps(overrides + extra),
        ]
        cmd += ["--limit", str(limit)] if limit else []
        print(f"[{time.strftime('%H:%M:%S')}] E2E {name} ...", file=sys.stderr, flush=True)
        with open(run_dir / "run.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=True)
        res = json.loads((run_dir / "result.json").read_text())
        rows.append((name, res))
    lines = [
        "| E2E (SmolLM2-135M) | steps x batch | train s | peak MB | BLEU | ROUGE-L | METEOR | CIDEr |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        m = r["metrics"]
        lines.append(
            f"| {name} | {r['steps']} x {r['batch_size']} | {r['train_wall_s']:.0f} | "
            f"{r['peak_memory_mb']:.0f} | {m['bleu']:.1f} | {m['rouge_l']:.1f} | "
            f"{m['meteor']:.3f} | {m['cider']:.2f} |"
        )
    gap = rows[0][1]["metrics"]["bleu"] - rows[1][1]["metrics"]["bleu"]
    lines.append(f"\nBLEU gap (bf16 LoRA - QLoRA nf4): {gap:+.2f} (target: within 1.0)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="135m,1.7b,8b")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (after 1 warm-up)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--quality", action="store_true", help="also run the E2E BLEU comparison")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--scratch", default="runs/qlora_bench")
    p.add_argument(
        "--from-runs", help="rebuild the table from a runs.json of an earlier run (no training)"
    )
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.seq, args.steps, Path(args.child_out))
        return 0
    if args.smoke:
        args.models, args.rounds, args.steps, args.seq = "smoke", 1, 1, 32
    models = args.models.split(",")
    rows = args.rows.split(",")
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: dict = {}
    if args.from_runs:
        saved = json.loads(Path(args.from_runs).read_text())
        runs = {tuple(k.split("|")): v for k, v in saved.items()}
    for rnd in range(
        0 if args.from_runs else args.rounds
    ):  # every row once per round, so drift hits all rows alike
        for m in models:
            for row in ROWS_FOR.get(m, rows):
                if row not in rows:
                    continue
                steps = args.steps if m != "8b" else max(1, min(args.steps, 2))
                if m == "8b" and rnd > 0:
                    continue  # one round at that size: two timed steps take minutes
                runs.setdefault((m, row), []).append(
                    spawn(m, row, args.seq, steps, scratch, f"r{rnd}")
                )
    results = {k: merge_rounds(v) for k, v in runs.items()}
    (scratch / "runs.json").write_text(json.dumps({f"{m}|{r}": v for (m, r), v in runs.items()}))
    plans = {}
    for m, row in results:
        if row.startswith("lorafit"):
            try:
                plans[(m, row)] = plan_estimate(m, ROWS[row][1], args.seq)
            except Exception as exc:  # the measurements must not be lost to the estimate
                print(f"plan estimate for {m} {row} failed: {exc}", file=sys.stderr)
    import torch

    lines = [
        "# QLoRA on a 2-core CPU: lorafit bf16 / nf4 / int8 vs PEFT",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1 x T={args.seq}, "
        "gradient checkpointing, LoRA r=8 on all linear layers, AdamW, bf16 autocast; "
        f"{args.rounds} interleaved rounds (8B: one) x {args.steps} timed steps after a warm-up.",
        "",
        *table(results, args.seq, plans),
        "",
        "Load transient: "
        "the peak RSS while loading minus the RSS once loaded (the issue's bound: the largest "
        "tensor in fp32 + 300 MB; shown for lorafit's loader). Peak RSS: VmHWM of the "
        "run's own process (load + steps). Plan estimate: `lorafit.train.plan.estimate_memory` for "
        "the same run. Random-weight models: first losses differ by row only through quantization.",
    ]
    if args.quality:
        lines += ["", *quality(scratch, args.smoke)]
    lines += ["", f"Total wall time: {(time.perf_counter() - started) / 60:.1f} min."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.smoke:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "qlora.md").write_text(text)
        (out / "qlora.json").write_text(
            json.dumps({f"{m}|{r}": v for (m, r), v in results.items()}, indent=1) + "\n"
        )
        plot(results, out / "qlora.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
