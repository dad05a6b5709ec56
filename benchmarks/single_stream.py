"""One stream, as users run it: `lorafit generate` / one request to `lorafit serve` vs llama.cpp
(issue #13's single-stream target: the server's and generate's decoding >= 0.5x llama.cpp).

    python benchmarks/single_stream.py              # 3 rounds x 128 tokens
    python benchmarks/single_stream.py --smoke      # 1 round x 8 tokens: plumbing only

SmolLM2-135M-Instruct; "adapter" rows add one r=16 all-linear adapter with random B (values do
not change speed). Every measurement runs in a fresh process, as a user's command does (no other
row's threads, pools or caches), rows interleaved round by round. In each process: load, one
8-token warm-up, then one chat request decoding exactly --tokens tokens greedily (end tokens do
not stop it); tokens/s = tokens / (request start to last token), prefill included. Rows:
  lorafit generate                       transformers' generate (the default float path)
  lorafit serve / generate --decode-weights float | int4   the serve engine's lean step
  llama.cpp                              llama-cpp-python, the package's Q4_1 GGUF, 2 threads,
                                         sample + eval per token; the adapter as a LoRA GGUF
                                         (`lorafit export --format gguf-lora`)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
ROWS = {
    "generate": "lorafit generate (transformers generate, float)",
    "float": "lorafit serve / generate --decode-weights float (engine, lean step)",
    "int4": "lorafit serve / generate --decode-weights int4 (engine, lean step)",
    "llama.cpp": "llama.cpp (llama-cpp-python, Q4_1 GGUF, 2 threads)",
}


def child_engine(weights: str, adapter: str | None, tokens: int) -> float:
    import threading

    from lorafit.serve import build
    from lorafit.serve.engine import Request

    registry = build("smollm2", {"a": adapter} if adapter else {}, slots=1, decode_weights=weights)
    name = "a" if adapter else registry.base_name
    ids = registry.render(registry.resolve(name), MESSAGES)

    def run(n: int) -> float:
        done = threading.Event()
        finished = lambda e: e[0] != "text" and done.set()  # noqa: E731
        req = Request(ids, registry.resolve(name), finished, n, ignore_eos=True)
        t = time.perf_counter()
        registry.engine.submit(req)
        done.wait()
        elapsed = time.perf_counter() - t
        assert len(req.generated) == n, (len(req.generated), n)
        return elapsed

    try:
        run(8)
        return run(tokens)
    finally:
        registry.engine.close(drain=False)


def child_generate(adapter: str | None, tokens: int) -> float:
    import torch

    from lorafit.data.chat import render_prompt
    from lorafit.infer import load_for_inference

    model, tok = load_for_inference("smollm2" if adapter is None else None, adapter, "cpu", "auto")
    text = render_prompt(tok, MESSAGES)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def run(n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
        elapsed = time.perf_counter() - t
        assert out.shape[1] - ids.shape[1] == n
        return elapsed

    run(8)
    return run(tokens)


def child_llama_cpp(lora: str | None, tokens: int) -> float:
    import llama_cpp

    from lorafit.data.chat import render_prompt
    from lorafit.infer import load_for_inference
    from lorafit.models.sources import resolve_model_path

    _, tok = load_for_inference("smollm2", None, "cpu", "auto")
    text = render_prompt(tok, MESSAGES)
    llm = llama_cpp.Llama(
        str(resolve_model_path("smollm2")),
        n_ctx=512,
        n_threads=2,
        n_batch=64,
        lora_path=lora,
        verbose=False,
    )
    prompt = llm.tokenize(text.encode(), add_bos=False, special=True)

    def run(n: int) -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        for _ in range(n):
            llm.eval([llm.sample(temp=0.0)])
        return time.perf_counter() - t

    run(8)
    return run(tokens)


def measure(row: str, adapter: Path | None, lora: Path | None, tokens: int) -> float:
    """tokens/s of `row` in a fresh process."""
    cmd = [sys.executable, __file__, "--child", row, "--tokens", str(tokens)]
    if adapter is not None:
        cmd += ["--adapter", str(lora if row == "llama.cpp" else adapter)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{row} failed:\n{proc.stderr[-3000:]}")
    return tokens / json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="1 round x 8 tokens")
    ap.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child == "llama.cpp":
            seconds = child_llama_cpp(args.adapter, args.tokens)
        elif args.child == "generate":
            seconds = child_generate(args.adapter, args.tokens)
        else:
            seconds = child_engine(args.child, args.adapter, args.tokens)
        print(json.dumps({"seconds": seconds}))
        return
    if args.smoke:
        args.rounds, args.tokens = 1, 8
    try:
        import llama_cpp  # noqa: F401

        rows = list(ROWS)
    except ImportError:
        rows = [r for r in ROWS if r != "llama.cpp"]
    sys.path.insert(0, str(HERE))
    from serve_load import make_adapters

    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapters(Path(tmp), 1)["a0"]
        lora = Path(tmp) / "a0.lora.gguf"
        if "llama.cpp" in rows:
            subprocess.run(
                [sys.executable, "-m", "lorafit", "export", "--adapter", str(adapter)]
                + ["--format", "gguf-lora", "--out", str(lora), "--no-modelfile"],
                check=True,
                capture_output=True,
            )
        speeds: dict[tuple[str, bool], list[float]] = {}
        for _ in range(args.rounds):
            for with_adapter in (False, True):
                for row in rows:
                    a = adapter if with_adapter else None
                    speeds.setdefault((row, with_adapter), []).append(
                        measure(row, a, lora, args.tokens)
                    )
    ref = {w: statistics.median(speeds[("llama.cpp", w)]) for w in (False, True)}
    ref = ref if "llama.cpp" in rows else None
    print(
        f"One stream, {args.tokens} new tokens after a chat prompt, median of {args.rounds} "
        "round(s), each in a fresh process (tokens/s; prefill included)\n"
    )
    print("| path | base: tokens/s | vs llama.cpp | + r=16 adapter: tokens/s | vs llama.cpp |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        cells = []
        for w in (False, True):
            v = statistics.median(speeds[(row, w)])
            cells += [f"{v:.1f}", f"{v / ref[w]:.2f}x" if ref else "-"]
        print(f"| {ROWS[row]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
