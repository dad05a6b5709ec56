"""One decoding step of `lorafit serve`, in process: transformers' forward vs the lean step (issue #13).

    python benchmarks/decode_step.py             # rows: transformers' forward, lean, lean compiled
    python benchmarks/decode_step.py --no-compile

SmolLM2-135M-Instruct fp32, r=16 all-linear adapters (random B: values do not change speed), KV
cache of 16 slots x 512. Single stream: one row at position ~40, 48 timed steps (median).
Mixed: 16 rows, 4 adapters, the two paths interleaved step by step (median of 16). Prints a table.
"""

import argparse
import time

import torch

from lorafit import LoraConfig, inject
from lorafit.models import load_model
from lorafit.ops.attention import enable_lorafit_attention
from lorafit.serve.decoder import Decoder
from lorafit.serve.kv import Decode, KVSlots, Prefill
from lorafit.tuner import adapter_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    model, _ = load_model("smollm2", device="cpu", dtype="float32")
    for a in "abcd":
        inject(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), a)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".B" in n:
                p.normal_(0, 0.02)
    model.eval()
    enable_lorafit_attention(model)
    cache = KVSlots(model.config, 16, 512, torch.float32, "cpu")
    names = ["abcd"[i % 4] for i in range(16)]
    with torch.no_grad():
        for s in range(16):
            with adapter_rows([names[s]], model):
                n = 30 + s
                model(
                    input_ids=torch.arange(n)[None] + 100,
                    position_ids=torch.arange(n)[None],
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

    paths = {"transformers forward (before)": None, "lean step": Decoder(model, cache)}
    if not args.no_compile:
        t = time.perf_counter()
        dec = Decoder(model, cache, compile=True)
        dec.warm_up()
        paths[f"lean step, compiled (warm-up {time.perf_counter() - t:.0f} s)"] = dec

    def run(path, rows, i):
        if path is None:
            return hf(rows, i)
        path.step(torch.full((rows,), 7), pos0[:rows] + i, names[:rows])

    out = {}
    for rows, steps in ((1, 48), (16, 16)):
        times = {k: [] for k in paths}
        for i in range(steps):
            for k, path in paths.items():
                t = time.perf_counter()
                run(path, rows, i)
                times[k].append(time.perf_counter() - t)
        for k, v in times.items():
            out[(k, rows)] = sorted(v)[len(v) // 2]
    base1, base16 = (out[(next(iter(paths)), r)] for r in (1, 16))
    print(
        "| path | 1 row: ms/step | tokens/s | vs before | 16 rows x 4 adapters: ms/step | tokens/s | vs before |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in paths:
        a, b = out[(k, 1)], out[(k, 16)]
        print(
            f"| {k} | {1e3 * a:.1f} | {1 / a:.1f} | {base1 / a:.2f}x | {1e3 * b:.1f} | "
            f"{16 / b:.0f} | {base16 / b:.2f}x |"
        )


if __name__ == "__main__":
    main()
