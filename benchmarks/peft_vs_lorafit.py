"""PEFT vs lorafit: the same LoRA training steps, timed side by side (issue #5).

Both libraries train the same base model on the same token batches with the same LoRA
hyperparameters (r=16, alpha=32, all-linear, no dropout), the same initial adapter (lorafit's init,
copied into PEFT's lora_A / lora_B / lora_magnitude_vector) and AdamW(lr, weight_decay=0).

    python benchmarks/peft_vs_lorafit.py                          # SmolLM2-135M, T=256 and 1024
    python benchmarks/peft_vs_lorafit.py --seq-lens 256 --steps 1 --warmup 1
    python benchmarks/peft_vs_lorafit.py --model llama1b          # random 1B Llama, needs CUDA
    python benchmarks/peft_vs_lorafit.py --smoke                  # tiny random Llama, seconds

Every (row, T) runs in its own subprocess, so its peak memory is its own (peak RSS on CPU, max
allocated on CUDA). Rows alternate within each round; the report takes medians over rounds. lorafit is measured through
`lorafit.train.step.forward_backward` with the library's defaults, so library changes show up here.

Loss agreement (exit 1 when broken): a lorafit row and its PEFT fp32 reference must agree within
SAME_RTOL at every step when they run the same arithmetic (the "lorafit fp32" rows always do), and
within CROSS_RTOL at step 1 when lorafit autocasts to bf16: at step 1 both hold identical weights,
so only bf16 rounding separates them. Later bf16 steps are printed, not checked: in bf16 the tiny
early LoRA outputs are partly rounded away when added to the base output (in PEFT exactly as in
lorafit), so the bf16 loss curve drifts from the fp32 one by a few percent in the first steps.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
E2E = HERE.parents[1] / "shared" / "data" / "e2e_nlg" / "trainset.csv"
SAME_RTOL = 1e-3  # same arithmetic: only summation order differs
CROSS_RTOL = 2e-2  # bf16 autocast vs fp32 on identical weights (step 1)


# The heap as it was before the steps kept large blocks (models/heap.py `keep_large_blocks`):
# every block >= 8 MiB a fresh mmap that faults its pages in on each use. Set in the environment,
# glibc's values hold from the process's start and lorafit leaves them alone.
MMAP_CAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(8 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 10)}


@dataclass(frozen=True)
class Row:
    label: str
    lib: str  # "peft" | "lorafit"
    dora: bool = False
    precision: str = "default"  # "fp32" | "bf16" | "default" (lorafit's own default: TrainOptions)
    gc: bool = False  # gradient checkpointing (lorafit rows without it use the library's default)
    recompute_mlp: bool | None = None  # lorafit: train.recompute_mlp (None: the library's default)
    every_len: bool = True  # False: only at --extra-seq-lens
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables for the row's process


ROWS = {
    "peft-fp32": Row("PEFT default fp32", "peft", precision="fp32"),
    "peft-bf16-gc": Row(
        "PEFT bf16 autocast + gradient checkpointing", "peft", precision="bf16", gc=True
    ),
    "lorafit": Row("lorafit default", "lorafit"),
    "lorafit-gc": Row("lorafit + gradient checkpointing", "lorafit", gc=True),
    "lorafit-keep-h": Row("lorafit, SwiGLU output kept", "lorafit", recompute_mlp=False),
    "lorafit-mmap-cap": Row(
        "lorafit, large blocks not kept (8 MiB mmap cap)",
        "lorafit",
        every_len=False,
        env=tuple(MMAP_CAP_ENV.items()),
    ),
    "lorafit-fp32": Row("lorafit fp32", "lorafit", precision="fp32", every_len=False),
    "peft-dora-fp32": Row(
        "PEFT DoRA default fp32", "peft", dora=True, precision="fp32", every_len=False
    ),
    "lorafit-dora": Row("lorafit DoRA default", "lorafit", dora=True, every_len=False),
    "lorafit-dora-fp32": Row(
        "lorafit DoRA fp32", "lorafit", dora=True, precision="fp32", every_len=False
    ),
}
BASELINE = {k: "peft-dora-fp32" if r.dora else "peft-fp32" for k, r in ROWS.items()}
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")


# ---------------------------------------------------------------- child side (imports torch) --
def build_model(args):
    """(model, tokenizer or None, device) with identical weights in every process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.model == "smollm2":
        from lorafit.models.loading import load_model

        model, tok = load_model("smollm2", device=args.device)
        return model, tok, next(model.parameters()).device
    if args.model == "tiny":
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            initializer_range=0.5,
        )  # wide init: a mis-shifted or mis-masked loss is >4% off
    else:  # llama1b: a Llama-3.2-1B-shaped model, randomly initialised (no download)
        cfg = LlamaConfig(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            rope_theta=500000.0,
        )
    cfg._attn_implementation = "sdpa"
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--model {args.model} is sized for a CUDA GPU and this torch sees none (--device cpu: slow)"
        )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.eval(), None, device


def make_batches(args, tok, vocab: int, T: int):
    """(warmup + steps, B, T) token ids: packed E2E NLG text when there is a tokenizer and the file, else random."""
    import torch

    n, ids = (args.warmup + args.steps) * args.batch_size * T, []
    if tok is not None and E2E.is_file():
        with open(E2E, newline="", encoding="utf-8") as f:
            for rec in csv.DictReader(f):
                ids += tok(f"{rec['mr']}\n{rec['ref']}{tok.eos_token}", add_special_tokens=False)[
                    "input_ids"
                ]
                if len(ids) >= n:
                    return torch.tensor(ids[:n]).view(
                        -1, args.batch_size, T
                    ), "e2e_nlg trainset (packed)"
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab, (n,), generator=g).view(-1, args.batch_size, T), "random tokens"


def flops_per_token(model, adapters: dict, T: int) -> float:
    """Useful FLOPs per token of one LoRA step on a frozen base (recomputation not counted):
    base matmuls 2N forward + 2N backward (activation grads only, no weight grads), causal attention
    (QK^T and AV over (T+1)/2 keys on average) forward + 2x in backward, LoRA 2r(d_in+d_out) forward
    + 2x in backward (grads of x, A and B). DoRA's per-step weight norms are not per token, left out."""
    from torch import nn

    cfg = model.config
    n_base = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)
    )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 2 * 2 * (T + 1) / 2 * cfg.num_attention_heads * head_dim * cfg.num_hidden_layers
    lora = sum(
        2 * a.shape[0] * (a.shape[1] + adapters[k[:-1] + "B"].shape[0])
        for k, a in adapters.items()
        if k.endswith(".A")
    )
    return 4 * n_base + 3 * attn + 3 * lora


def gemm_gflops(device, n: int, rounds: int = 3) -> float:
    """bf16 (n x n) @ (n x n) GFLOP/s at the benchmark's thread count: the best of `rounds`
    medians of 10 matmuls after ~0.5 s of warm-up (a ceiling is what the machine can reach),
    measured before the model loads (`child_init` says why)."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    start = _clock(device)
    while _clock(device) - start < 0.5:
        a @ b
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(10):
            t0 = _clock(device)
            a @ b
            times.append(_clock(device) - t0)
        medians.append(statistics.median(times))
    return 2 * n**3 / min(medians) / 1e9


def _clock(device) -> float:
    if device.type == "cuda":
        __import__("torch").cuda.synchronize()
    return time.perf_counter()


def adapter_state(model) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters() if ".adapters.default." in k}


def child_init(args, out: Path) -> dict:
    """Batches, lorafit's initial adapters (LoRA and DoRA), FLOPs per token and the GEMM ceiling."""
    import torch
    from lorafit import LoraConfig, delete_adapter, inject
    from lorafit.train.config import TrainOptions
    from lorafit.ops.precision import resolve_precision

    # The ceiling first: loading caps glibc's mmap threshold at 8 MiB for the process
    # (models/streaming.py), after which every 2,048^2 bf16 output is a fresh mmap that faults its
    # pages in: the same matmul then measured ~1,050 instead of ~2,100 GFLOP/s here.
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    first = torch.device(auto if args.device == "auto" else args.device)
    ready = first.type != "cuda" or torch.cuda.is_available()  # else build_model says what is wrong
    gemm = gemm_gflops(first, 2048 if first.type == "cpu" else 8192) if ready else 0.0
    model, tok, device = build_model(args)
    batches = {T: make_batches(args, tok, model.config.vocab_size, T) for T in args.seq_lens}
    init = {}
    for kind in ("lora", "dora"):  # the same seed, so the same A in both
        torch.manual_seed(args.seed)
        inject(model, LoraConfig(**LORA, use_dora=kind == "dora"))
        init[kind] = adapter_state(model)
        delete_adapter(model, "default")
    torch.save({"batches": {T: ids for T, (ids, _) in batches.items()}, **init}, out / "init.pt")
    lora, source = init["lora"], next(iter(batches.values()))[1]
    return {
        "flops_per_token": {T: flops_per_token(model, lora, T) for T in args.seq_lens},
        "gemm_gflops": gemm,
        "lorafit_precision": resolve_precision(TrainOptions().precision, device),
        "data": source,
        "device": str(device),
        "model": model.config._name_or_path or args.model,
        "torch": torch.__version__,
    }


def copy_into_peft(peft_model, state: dict) -> None:
    """lorafit `<path>.adapters.default.{A,B,magnitude}` -> PEFT `<path>.lora_A/lora_B/lora_magnitude_vector`."""
    import torch

    names = {"A": "lora_A", "B": "lora_B", "magnitude": "lora_magnitude_vector"}
    root = peft_model.base_model.model
    n_peft = sum(
        1 for _, m in root.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A
    )
    n_ours = sum(1 for k in state if k.endswith(".A"))
    assert n_peft == n_ours, (
        f"PEFT wrapped {n_peft} modules, lorafit {n_ours}: the rows would not compare"
    )
    with torch.no_grad():
        for key, value in state.items():
            path, _, tensor = key.rpartition(".adapters.default.")
            target = getattr(root.get_submodule(path), names[tensor])["default"].weight
            assert target.shape == value.shape, (
                f"{key}: PEFT {tuple(target.shape)} vs lorafit {tuple(value.shape)}"
            )
            target.copy_(value)


def child_run(args, key: str, T: int, out: Path) -> dict:
    import torch

    row = ROWS[key]
    init = torch.load(out / "init.pt")
    state = init["dora" if row.dora else "lora"]
    model, _, device = build_model(args)
    if row.lib == "lorafit":
        from lorafit import LoraConfig, inject
        from lorafit.ops.precision import resolve_precision
        from lorafit.train.config import TrainOptions
        from lorafit.train.step import forward_backward, prepare_for_training

        defaults = TrainOptions()
        precision = resolve_precision(
            defaults.precision if row.precision == "default" else row.precision, device
        )
        torch.manual_seed(args.seed)
        inject(model, LoraConfig(**LORA, use_dora=row.dora))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        prepare_for_training(
            model,
            precision,
            row.gc or defaults.gradient_checkpointing,  # what `train` runs
            defaults.recompute_mlp if row.recompute_mlp is None else row.recompute_mlp,
        )

        def step(batch):
            return forward_backward(
                model, [batch], "causal-lm", precision, defaults.loss_chunk, None
            )[0]
    else:
        import peft

        precision = row.precision
        if row.gc:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model = peft.get_peft_model(
            model, peft.LoraConfig(**LORA, lora_dropout=0.0, use_dora=row.dora)
        )
        copy_into_peft(model, state)
        autocast = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
            if precision == "bf16"
            else contextlib.nullcontext
        )

        def step(batch):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss = model(**batch).loss  # HF default: labels = input_ids, shifted inside
            loss.backward()
            return loss.item()

    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0
    )
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for ids in init["batches"][T]:  # (B, T) each
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        t0 = _clock(device)
        losses.append(step(batch))
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(_clock(device) - t0)
    step_s = statistics.median(times[args.warmup :])
    peak, mem_kind = (
        (torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated")
        if device.type == "cuda"
        else (peak_rss_mb(), "peak RSS")
    )
    return {
        "row": key,
        "T": T,
        "precision": precision,
        "losses": losses,
        "step_times": times,
        "step_s": step_s,
        "tokens_per_s": args.batch_size * T / step_s,
        "peak_mb": peak,
        "memory": mem_kind,
        "env": {k: os.environ.get(k) for k, _ in row.env},  # what the row's process ran with
    }


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries the parent's peak into a child's
    ru_maxrss across fork+exec, so a heavy parent would inflate every row."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
            2**20 if sys.platform == "darwin" else 1024
        )


# ------------------------------------------------------------ parent side (no torch import) --
def spawn(args, scratch: Path, what: str, T: int = 0, tag: str = "", extra_env: tuple = ()) -> dict:
    """Run one child (`init` or a row at one T) in a fresh interpreter; its JSON result."""
    result = scratch / f"{what}_{T}_{tag}.json"
    cmd = [
        sys.executable,
        __file__,
        "--child",
        what,
        "--child-seq-len",
        str(T),
        "--child-result",
        str(result),
        "--out",
        str(scratch),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        **dict(extra_env),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{what} T={T} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(result.read_text())


def check_losses(results: dict) -> tuple[list[str], list[dict]]:
    """Side-by-side per-step losses, and each lorafit row checked against its PEFT fp32 reference."""
    lines, checks = (
        [
            f"Per-step losses. Checked: |lorafit - PEFT| / PEFT <= {SAME_RTOL:.1%} at every step "
            f"in the same precision; <= {CROSS_RTOL:.0%} at step 1 for bf16 vs fp32.",
            "",
        ],
        [],
    )
    for T in sorted({t for _, t in results}):
        keys = [k for k in ROWS if (k, T) in results]
        lines += [
            f"T={T}",
            "",
            "| step | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for i in range(len(results[keys[0], T]["losses"])):
            lines.append(
                f"| {i + 1} | "
                + " | ".join(f"{results[k, T]['losses'][i]:.5f}" for k in keys)
                + " |"
            )
        lines.append("")
        for ours in (k for k in keys if ROWS[k].lib == "lorafit" and (BASELINE[k], T) in results):
            a, b = results[ours, T], results[BASELINE[ours], T]
            same = a["precision"] == b["precision"]
            rel = [abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"])]
            tol, n = (SAME_RTOL, len(rel)) if same else (CROSS_RTOL, 1)
            good = len(a["losses"]) == len(b["losses"]) and max(rel[:n]) <= tol
            checks.append(
                {
                    "row": ours,
                    "ref": BASELINE[ours],
                    "T": T,
                    "steps_checked": n,
                    "rtol": tol,
                    "rel_diff": rel,
                    "agree": good,
                }
            )
            lines.append(
                f"- {ours} ({a['precision']}) vs {BASELINE[ours]} ({b['precision']}), T={T}: worst relative "
                f"difference {max(rel[:n]):.4%} over {'all steps' if same else 'step 1'} -> "
                f"{'agree' if good else 'DISAGREE'}"
                + ("" if same else f" (last step: {rel[-1]:.2%})")
            )
        lines.append("")
    return lines, checks


def table(args, meta: dict, results: dict) -> list[str]:
    gemm = meta["gemm_gflops"]
    mem = next(iter(results.values()))["memory"]
    lines = [
        f"# PEFT vs lorafit: {meta['model']} on {meta['device']}",
        "",
        f"batch {args.batch_size}, {args.warmup} warmup + {args.steps} timed steps, {args.rounds} round(s), "
        f"{args.threads} threads, r=16 alpha=32 all-linear, AdamW lr {args.lr}, data: {meta['data']}, "
        f"torch {meta['torch']}, lorafit default precision here: {meta['lorafit_precision']}",
        "",
        f"bf16 GEMM measured in this run: {gemm:.1f} GFLOP/s. 1-min load average before the run: "
        f"{meta['load_average_before']:.2f}"
        + (
            " (BUSY MACHINE: timings are not trustworthy)"
            if meta["load_average_before"] > 0.5
            else ""
        ),
    ]
    for T, f in meta["flops_per_token"].items():
        lines.append(
            f"T={T}: {f / 1e9:.3f} GFLOP/token (frozen base, LoRA step) -> "
            f"bf16 ceiling {gemm * 1e9 / f:.0f} tokens/s"
        )
    lines += [
        "",
        "Ratios compare with PEFT default fp32 at the same T (DoRA rows: with PEFT DoRA default fp32).",
        "",
        f"| row | T | precision | tokens/s | step s | {mem} MB | loss at step {args.warmup + args.steps} "
        "| tokens/s vs base | memory vs base | % of bf16 ceiling |",
        "|---" * 10 + "|",
    ]
    for T in args.seq_lens:
        for key in ROWS:
            r = results.get((key, T))
            if r is None:
                continue
            base = results.get((BASELINE[key], T))
            ceiling = gemm * 1e9 / meta["flops_per_token"][T]
            speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            memory = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base else "-"
            lines.append(
                f"| {ROWS[key].label} | {T} | {r['precision']} | {r['tokens_per_s']:.1f} | {r['step_s']:.3f} "
                f"| {r['peak_mb']:.0f} | {r['losses'][-1]:.4f} | {speed} | {memory} "
                f"| {100 * r['tokens_per_s'] / ceiling:.1f}% |"
            )
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(results, key=lambda kt: (kt[1], list(ROWS).index(kt[0])))
    names = [f"{ROWS[k].label}\nT={T}" for k, T in keys]
    colors = ["tab:orange" if ROWS[k].lib == "lorafit" else "tab:blue" for k, _ in keys]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.5 * len(keys) + 2))
    for ax, field, title in (
        (axes[0], "tokens_per_s", "tokens/s (higher is better)"),
        (axes[1], "peak_mb", "peak memory MB (lower is better)"),
    ):
        ax.barh(range(len(keys)), [results[k][field] for k in keys], color=colors)
        ax.set_yticks(range(len(keys)), names if ax is axes[0] else [""] * len(keys), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["smollm2", "llama1b", "tiny"], default="smollm2")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024])
    p.add_argument(
        "--extra-seq-lens",
        type=int,
        nargs="+",
        help="T for the DoRA and lorafit fp32 rows (default: the smallest --seq-lens)",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--jobs", type=int, default=1, help="children at once (>1 spoils timings; --smoke uses 2)"
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument(
        "--smoke", action="store_true", help="tiny random Llama, T=32, 2 steps: checks the plumbing"
    )
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-seq-len", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.seq_lens, args.steps, args.warmup, args.rounds, args.jobs = (
            "tiny",
            [32],
            2,
            1,
            1,
            2,
        )
    if args.model == "llama1b" and args.device == "auto":  # sized for a GPU
        args.device = "cuda"
    args.extra_seq_lens = args.extra_seq_lens or [min(args.seq_lens)]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:  # a subprocess: options and shared inputs come from the parent's scratch folder
        import torch

        what, T, result, scratch = args.child, args.child_seq_len, args.child_result, args.out
        args = argparse.Namespace(**json.loads((scratch / "args.json").read_text()))
        torch.set_num_threads(args.threads)
        data = child_init(args, scratch) if what == "init" else child_run(args, what, T, scratch)
        result.write_text(json.dumps(data))
        return 0
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    plan = [
        (rnd, key, T)
        for rnd in range(args.rounds)
        for T in args.seq_lens
        for key in (
            args.rows if rnd % 2 == 0 else args.rows[::-1]
        )  # alternate; flip to cancel drift
        if ROWS[key].every_len or T in args.extra_seq_lens
    ]
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="peft_vs_lorafit-") as tmp:
        scratch = Path(tmp)
        saved = {k: v for k, v in vars(args).items() if not k.startswith("child") and k != "out"}
        (scratch / "args.json").write_text(json.dumps(saved))
        meta = {**spawn(args, scratch, "init"), "load_average_before": load}
        with ThreadPoolExecutor(args.jobs) as pool:
            done = pool.map(
                lambda job: spawn(args, scratch, job[1], job[2], str(job[0]), ROWS[job[1]].env),
                plan,
            )
            for (rnd, key, T), r in zip(plan, done):
                runs.setdefault((key, T), []).append(r)
                print(
                    f"round {rnd + 1}: {ROWS[key].label:45s} T={T:<5d} {r['tokens_per_s']:9.1f} tok/s "
                    f"{r['peak_mb']:8.0f} MB  loss {r['losses'][-1]:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
    meta["flops_per_token"] = {int(T): f for T, f in meta["flops_per_token"].items()}
    results = {
        kt: {
            **rs[0],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "step_s": statistics.median(r["step_s"] for r in rs),
            "peak_mb": statistics.median(r["peak_mb"] for r in rs),
            "rounds": rs,
        }
        for kt, rs in runs.items()
    }
    loss_lines, checks = check_losses(results)
    ok = all(c["agree"] for c in checks)
    text = "\n".join(table(args, meta, results) + [""] + loss_lines)
    print(text)
    (out / "peft_vs_lorafit.md").write_text(text + "\n")
    (out / "peft_vs_lorafit.json").write_text(
        json.dumps(
            {
                "args": saved,
                "meta": meta,
                "losses_agree": ok,
                "loss_checks": checks,
                "results": [
                    results[kt]
                    for kt in sorted(results, key=lambda kt: (kt[1], list(ROWS).index(kt[0])))
                ],
            },
            indent=1,
        )
    )
    plot(results, out / "peft_vs_lorafit.png")
    if not ok:
        print("lorafit's losses disagree with PEFT's beyond the stated tolerance", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
