"""Which library should store and dequantize a frozen weight on this device? (lorafit.quant)

Times forward + backward (the input gradient, as LoRA training needs it) of one frozen projection
of SmolLM2-1.7B's MLP size (out 8192, in 2048) at T=512 tokens, bf16, for every registered backend
of every scheme, beside the plain bf16 layer; also the dequantize call alone and the bytes stored.
Rounds are interleaved (every backend once per round) and medians reported, so a noisy neighbour
slows all rows alike. The fastest backend per scheme is what `lorafit.quant.backends.PREFERRED`
should name for this device type.

    python benchmarks/quant_backends.py [--rounds 7] [--device cpu] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def _time(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> int:
    from lorafit.quant import PREFERRED, SCHEMES, QuantizedLinear, backends_for

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--smoke", action="store_true", help="a small layer, 2 rounds: checks the script"
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    n_out, n_in, T = (256, 128, 16) if args.smoke else (8192, 2048, 512)
    rounds = 2 if args.smoke else args.rounds
    torch.manual_seed(0)
    w = (torch.randn(n_out, n_in) * 0.02).to(device, torch.bfloat16)
    x0 = torch.randn(T, n_in, device=device, dtype=torch.bfloat16)
    dy = torch.randn(T, n_out, device=device, dtype=torch.bfloat16)

    layers = {"bf16 (reference)": None}
    for scheme in SCHEMES:
        for backend in backends_for(scheme):
            if backend.available() and device.type in backend.devices:
                layers[f"{scheme} {backend.library}"] = QuantizedLinear.quantize(
                    w, None, scheme, device, backend.library
                )

    def fwd_bwd(layer):
        x = x0.clone().requires_grad_(True)
        y = F.linear(x, w) if layer is None else layer(x)
        y.backward(dy)

    times = {name: {"fb": [], "deq": []} for name in layers}
    for name, layer in layers.items():  # warm-up
        fwd_bwd(layer)
    for _ in range(rounds):
        for name, layer in layers.items():
            times[name]["fb"].append(_time(lambda: fwd_bwd(layer), device))
            if layer is not None:
                times[name]["deq"].append(_time(layer.dequantize, device))

    ref = statistics.median(times["bf16 (reference)"]["fb"])
    print(f"device {device}, {torch.get_num_threads()} threads, weight ({n_out}, {n_in}), T={T}")
    print(f"{rounds} interleaved rounds, medians\n")
    print("| layer | f+b ms | vs bf16 | dequantize ms | MB stored | default here |")
    print("|---|---:|---:|---:|---:|---|")
    for name, layer in layers.items():
        fb = statistics.median(times[name]["fb"]) * 1e3
        deq = f"{statistics.median(times[name]['deq']) * 1e3:.1f}" if layer is not None else ""
        mb = (w.numel() * 2 if layer is None else layer.nbytes()) / 2**20
        default = ""
        if (
            layer is not None
            and PREFERRED.get((layer.scheme, device.type)) == layer.backend.library
        ):
            default = "yes"
        print(f"| {name} | {fb:.1f} | {fb / (ref * 1e3):.2f}x | {deq} | {mb:.1f} | {default} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
