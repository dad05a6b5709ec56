"""Serving many adapters on one base: `lorafit serve` under a bounded load (issue #13).

    python benchmarks/serve_load.py              # SmolLM2 + 4 adapters, 16 clients x 64 tokens
    python benchmarks/serve_load.py --smoke      # 4 clients x 8 tokens: plumbing only

Loopback only; every run stops by itself. The four adapters are random (non-zero) r=16
all-linear adapters on SmolLM2-135M-Instruct: their values do not change the speed. Each client
sends one chat request (a different E2E meaning representation, adapter i % 4, greedy, max_tokens
and exactly that many tokens generated: end tokens are not allowed to stop early, so every row
does the same work). Rows:
  (a) lorafit serve, all clients at once (continuous batching across adapters)
  (b) lorafit serve, the same requests one at a time
  (c) transformers + PEFT, one request at a time, `set_adapter` per request (what a user of PEFT
      without a server framework does)
  (d) llama.cpp's llama-server, all clients at once: SmolLM2's own Q4_1 GGUF with the adapters as
      LoRA GGUFs (`lorafit export --format gguf-lora`), each request naming its adapter in
      `"lora": [{"id", "scale"}]`; 2 threads, one slot per client
  (e) the same llama-server, one request at a time (its single-stream speed)
(d) and (e) run when a llama-server binary is found: --llama-server PATH, $LLAMA_SERVER or PATH.
Generated tokens/s over the wall time of the whole row, and per-request latency p50 / p95.
Single-stream decoding: (b)'s tokens/s for one request.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data" / "e2e_nlg" / "devset.csv"
SYSTEM = "Write one sentence describing the restaurant."


def make_adapters(root: Path, n: int) -> dict[str, Path]:
    import torch

    from lorafit import LoraConfig, inject, save_adapter
    from lorafit.models import load_model
    from lorafit.tuner import delete_adapter

    model, _ = load_model("smollm2", device="cpu")
    out = {}
    for i in range(n):
        name = f"a{i}"
        torch.manual_seed(i)
        inject(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), name)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".adapters.{name}." in pname and ".B" in pname:
                    p.normal_(0, 0.02)
        save_adapter(model, root / name, name)
        delete_adapter(model, name)
        out[name] = root / name
    return out


def prompts(n: int) -> list[str]:
    import csv

    with open(DATA, newline="", encoding="utf-8") as f:
        rows = [r["mr"] for r in csv.DictReader(f)]
    seen, out = set(), []
    for mr in rows:
        if mr not in seen:
            seen.add(mr)
            out.append(mr)
        if len(out) == n:
            break
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    adapters: dict[str, Path], slots: int, extra: list[str] = ()
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "lorafit",
        "serve",
        "--port",
        str(port),
        "--slots",
        str(slots),
        "--adapters",
        *[f"{k}={v}" for k, v in adapters.items()],
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, "lorafit serve")
    return proc, url


def one_request(client, model: str, text: str, tokens: int, lora=None) -> tuple[float, int]:
    started = time.perf_counter()
    extra = {"ignore_eos": True}
    if lora is not None:  # llama-server: the request's adapter by id (the others get scale 0)
        extra["lora"] = [{"id": lora, "scale": 1.0}]
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
        max_tokens=tokens,
        temperature=0,
        extra_body=extra,
    )
    return time.perf_counter() - started, r.usage.completion_tokens


def run_clients(url: str, jobs, concurrent: bool, lora_ids=None):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    results = [None] * len(jobs)

    def call(i, name, text, tokens):
        lora = None if lora_ids is None else lora_ids[name]
        results[i] = one_request(client, name, text, tokens, lora)

    started = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=call, args=(i, *j)) for i, j in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
    else:
        for i, j in enumerate(jobs):
            call(i, *j)
    wall = time.perf_counter() - started
    failed = sum(r is None for r in results)
    ok = [r for r in results if r is not None]
    return wall, ok, failed


def wait_healthy(proc: subprocess.Popen, url: str, what: str) -> None:
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{what} did not start in 300 s")


def llama_server_rows(binary: str, adapters: dict[str, Path], jobs, scratch: Path, ctx: int):
    """Rows (d) and (e): llama-server on the base's own GGUF with the adapters as LoRA GGUFs."""
    from lorafit.models.sources import resolve_model_path

    files = []
    for name, folder in adapters.items():
        out = scratch / f"{name}.lora.gguf"
        subprocess.run(
            [sys.executable, "-m", "lorafit", "export", "--adapter", str(folder)]
            + ["--format", "gguf-lora", "--out", str(out), "--no-modelfile"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        files.append(out)
    port = free_port()
    slots = len(jobs)
    cmd = [binary, "-m", str(resolve_model_path("smollm2")), "--lora-init-without-apply"]
    cmd += ["--lora", ",".join(str(f) for f in files)]
    cmd += ["-np", str(slots), "-c", str(slots * ctx), "-t", "2", "-tb", "2"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    ids = {name: i for i, name in enumerate(adapters)}
    try:
        wait_healthy(proc, url, "llama-server")
        run_clients(url, jobs[:2], concurrent=False, lora_ids=ids)  # warm-up
        d = run_clients(url, jobs, True, lora_ids=ids)
        e = run_clients(url, jobs, False, lora_ids=ids)
    finally:
        proc.terminate()
        proc.wait(60)
    return d, e


def find_llama_server(given: str | None) -> str | None:
    import shutil

    for candidate in (given, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def peft_rows(adapters: dict[str, Path], jobs) -> tuple[float, list, int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.models import gguf_cache
    from lorafit.models.sources import resolve_model_path

    folder = gguf_cache.cache_folder(resolve_model_path("smollm2"), None)
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(adapters[n]), adapter_name=n)
    model.eval()
    results = []
    started = time.perf_counter()
    for name, text, tokens in jobs:
        t0 = time.perf_counter()
        model.set_adapter(name)
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        ids = tok.apply_chat_template(
            msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
        results.append((time.perf_counter() - t0, out.shape[1] - ids["input_ids"].shape[1]))
    return time.perf_counter() - started, results, 0


def row(label, wall, ok, failed):
    tokens = sum(n for _, n in ok)
    lat = sorted(t for t, _ in ok)
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else float("nan")
    return {
        "row": label,
        "tokens_per_s": tokens / wall,
        "p50": statistics.median(lat) if lat else float("nan"),
        "p95": p95,
        "failed": failed,
        "tokens": tokens,
        "wall": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary (rows d, e)")
    p.add_argument(
        "--decode-weights",
        nargs="+",
        default=["float", "int4"],
        help="serve rows (a), (b) once per choice (default: float int4)",
    )
    args = p.parse_args()
    if args.smoke:
        args.clients, args.tokens = 4, 8
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scratch = Path(tempfile.mkdtemp(prefix="serve_load_"))
    adapters = make_adapters(scratch, args.adapters)
    texts = prompts(args.clients)
    names = list(adapters)
    jobs = [(names[i % len(names)], texts[i], args.tokens) for i in range(args.clients)]
    rows = []
    for weights in args.decode_weights:
        proc, url = start_server(adapters, args.clients, ["--decode-weights", weights])
        tag, how = (
            ("", "") if weights == "float" else (f"-{weights}", f" --decode-weights {weights}")
        )
        try:
            run_clients(url, jobs[:2], concurrent=False)  # warm-up
            all_at_once = run_clients(url, jobs, True)
            rows.append(row(f"(a{tag}) lorafit serve{how}, all clients at once", *all_at_once))
            one_by_one = run_clients(url, jobs, False)
            rows.append(row(f"(b{tag}) lorafit serve{how}, one request at a time", *one_by_one))
        finally:
            proc.terminate()
            proc.wait(60)
    if not args.no_peft:
        rows.append(
            row("(c) transformers + PEFT, set_adapter per request", *peft_rows(adapters, jobs))
        )
    binary = find_llama_server(args.llama_server)
    if binary:
        d, e = llama_server_rows(binary, adapters, jobs, scratch, ctx=256 + args.tokens)
        rows.append(row("(d) llama-server + LoRA GGUFs, all clients at once", *d))
        rows.append(row("(e) llama-server + LoRA GGUFs, one request at a time", *e))
    else:
        print("no llama-server binary: rows (d) and (e) skipped", file=sys.stderr)
    base = rows[1]["tokens_per_s"]
    print(
        f"\nSmolLM2-135M-Instruct + {args.adapters} adapters, {args.clients} clients x {args.tokens} tokens, greedy, 2 CPUs\n"
    )
    print("| row | tokens/s | vs (b) | p50 latency s | p95 latency s | failed |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['row']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | {r['p50']:.2f} | {r['p95']:.2f} | {r['failed']} |"
        )
    for r in rows:
        if r["row"].startswith("(b"):
            print(f"single-stream decoding ({r['row']}): {r['tokens'] / r['wall']:.1f} tokens/s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
