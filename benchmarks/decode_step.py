"""Decoding speed of `lorafit serve` / `generate --decode-weights` vs llama.cpp (issue #13).

    python benchmarks/decode_step.py                # every row, compiled ones included
    python benchmarks/decode_step.py --no-compile   # eager rows only (no minutes of warm-up)
    python benchmarks/decode_step.py --smoke        # tiny counts: proves the script runs

SmolLM2-135M-Instruct (fp32 in torch; llama.cpp runs the package's own Q4_1 GGUF), r=16
all-linear adapters with random B (values do not change speed), KV cache of 16 slots x 512.
Rows: transformers' forward (what the engine ran before the lean step), the lean step with the
model's float weights and with `--decode-weights int4`, each eager and compiled, and llama.cpp
(llama-cpp-python, 2 threads, one token per `eval`) when it is installed. Single stream: one row
at position ~40, every path stepped in turn (interleaved), median ms/step. Mixed: 16 rows, 4
adapters, interleaved likewise. Then "agreement": int4 vs float greedy decoding through the
engine on chat prompts (tokens equal before the first difference). Prints two tables.
"""

import argparse
import statistics
import time

import torch

from lorafit import LoraConfig, inject
from lorafit.models import load_model
from lorafit.models.sources import resolve_model_path
from lorafit.ops.attention import enable_lorafit_attention
from lorafit.serve.decoder import Decoder
from lorafit.serve.kv import Decode, KVSlots, Prefill
from lorafit.tuner import adapter_rows

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for learning to cook.",
    "name[The Mill], eatType[pub], food[English], area[riverside]",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish and German.",
    "What should I pack for a weekend hike?",
]


def _llama_cpp(steps: int):
    """ms per decoded token of llama.cpp on the same model's GGUF, or None if not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    gguf = resolve_model_path("smollm2")
    llm = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=2, n_batch=64, verbose=False)
    llm.eval(llm.tokenize(b"The history of the city begins in the year"))
    times = []
    for _ in range(steps):
        token = llm.sample(temp=0.0)
        t = time.perf_counter()
        llm.eval([token])
        times.append(time.perf_counter() - t)
    return times


def _agreement(model, tokenizer, n_prompts: int, new_tokens: int) -> tuple[int, float, int]:
    """(prompts whose int4 greedy answer equals float's, mean equal prefix, tokens per answer)."""
    from lorafit.data.chat import render_prompt
    from lorafit.serve.engine import Engine, Request

    def answers(weights: str) -> list[list[int]]:
        engine = Engine(model, tokenizer, slots=8, max_len=512, weights=weights)
        out = []
        try:
            for text in PROMPTS[:n_prompts]:  # one at a time: no batch effects
                done = []
                rendered = render_prompt(tokenizer, [{"role": "user", "content": text}])
                ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
                emit = done.append
                req = Request(ids, "__base__", emit, new_tokens, ignore_eos=True)
                engine.submit(req)
                while not any(e[0] != "text" for e in done):
                    time.sleep(0.01)
                out.append(list(req.generated))
        finally:
            engine.close(drain=False)
        return out

    floats, int4s = answers("float"), answers("int4")
    prefixes = []
    for a, b in zip(floats, int4s):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(n)
    same = sum(a == b for a, b in zip(floats, int4s))
    return same, statistics.mean(prefixes), new_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="few steps, no compile, 2 prompts")
    args = ap.parse_args()
    torch.set_num_threads(2)
    steps1, steps16 = (4, 2) if args.smoke else (48, 16)
    model, tokenizer = load_model("smollm2", device="cpu", dtype="float32")
    enable_lorafit_attention(model)
    model.eval()
    if not args.smoke:
        same, prefix, n = _agreement(model, tokenizer, len(PROMPTS), 64)
    else:
        same, prefix, n = _agreement(model, tokenizer, 2, 8)
    for a in "abcd":
        inject(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), a)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".B" in name:
                p.normal_(0, 0.02)
    cache = KVSlots(model.config, 16, 512, torch.float32, "cpu")
    names = ["abcd"[i % 4] for i in range(16)]
    with torch.no_grad():
        for s in range(16):
            with adapter_rows([names[s]], model):
                n_prompt = 30 + s
                model(
                    input_ids=torch.arange(n_prompt)[None] + 100,
                    position_ids=torch.arange(n_prompt)[None],
                    lorafit_attention=Prefill(cache, s),
                    use_cache=False,
                )
    pos0 = torch.tensor([30 + s for s in range(16)])

    def hf(rows, i):
        order = sorted(range(rows), key=lambda j: names[j])
        pos = pos0[order] + i
        with torch.no_grad(), adapter_rows([names[j] for j in order], model):
            model(
                input_ids=torch.full((rows, 1), 7),
                position_ids=pos[:, None],
                lorafit_attention=Decode(cache, pos, torch.tensor(order)),
                use_cache=False,
                logits_to_keep=1,
            )

    paths = {
        "transformers forward (before the lean step)": None,
        "lean step, float weights": Decoder(model, cache),
        "lean step, int4 weights": Decoder(model, cache, weights="int4"),
    }
    if not (args.no_compile or args.smoke):
        for weights in ("float", "int4"):
            t = time.perf_counter()
            dec = Decoder(model, cache, compile=True, weights=weights)
            dec.warm_up()
            warm = time.perf_counter() - t
            paths[f"lean step, {weights} weights, compiled (warm-up {warm:.0f} s)"] = dec

    def run(path, rows, i):
        if path is None:
            return hf(rows, i)
        path.step(torch.full((rows,), 7), pos0[:rows] + i, names[:rows])

    out = {}
    for rows, steps in ((1, steps1), (16, steps16)):
        times = {k: [] for k in paths}
        for i in range(steps):
            for k, path in paths.items():
                t = time.perf_counter()
                run(path, rows, i)
                times[k].append(time.perf_counter() - t)
        for k, v in times.items():
            out[(k, rows)] = statistics.median(v)
    llama = _llama_cpp(steps1)
    base1, base16 = (out[(next(iter(paths)), r)] for r in (1, 16))
    ref = statistics.median(llama) if llama else None
    print(
        "| path | 1 row: ms/step | tokens/s | vs before | vs llama.cpp "
        "| 16 rows x 4 adapters: ms/step | tokens/s | vs before |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in paths:
        a, b = out[(k, 1)], out[(k, 16)]
        vs = f"{ref / a:.2f}x" if ref else "-"
        print(
            f"| {k} | {1e3 * a:.1f} | {1 / a:.1f} | {base1 / a:.2f}x | {vs} | {1e3 * b:.1f} | "
            f"{16 / b:.0f} | {base16 / b:.2f}x |"
        )
    if ref:
        print(
            f"| llama.cpp (llama-cpp-python, Q4_1 GGUF, 2 threads) | {1e3 * ref:.1f} | "
            f"{1 / ref:.1f} | {base1 / ref:.2f}x | 1.00x | - | - | - |"
        )
    else:
        print("(llama.cpp row skipped: pip install llama-cpp-python to add it)")
    print()
    print(
        f"int4 vs float greedy decoding (base model, engine, one request at a time): "
        f"{same}/{min(len(PROMPTS), 2 if args.smoke else len(PROMPTS))} chat prompts give the "
        f"same {n} tokens; mean equal prefix {prefix:.1f} tokens"
    )


if __name__ == "__main__":
    main()
