"""`lorafit serve`: an OpenAI-compatible server for a base model and many adapters on it.

decoder.py   the decoding step written out lean for Llama-family models (optionally compiled),
             every row picking its adapter from stacked factors by a mask
kv.py        the KV cache as slots, one per running request (the attention of every layer)
engine.py    continuous batching: one decoding forward per step for every running request,
             each row with its own adapter and position
registry.py  the base and its adapters (hot load / unload, LRU eviction, path containment)
app.py       the FastAPI routes (chat / completions, streaming, models, adapters, health)
"""

from __future__ import annotations

import ipaddress
import os
import sys
from concurrent.futures import Future
from pathlib import Path

from lorafit.serve.engine import Engine, Request, free_openmp_pool
from lorafit.serve.registry import AdapterError, Registry

__all__ = ["AdapterError", "Engine", "Registry", "Request", "build", "complete", "serve"]

LOOPBACK = "127.0.0.1"


def build(
    model: str | None = None,
    adapters: dict[str, str] | None = None,
    adapter_dir: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    slots: int = 16,
    max_len: int = 2048,
    max_adapters: int = 8,
    max_rank: int = 64,
    compile: bool = False,
    decode_weights: str = "float",
) -> Registry:
    """Load the base (default: the first adapter's base), start the engine, load `adapters`.
    With `compile`, the decoding step is compiled (and warmed up) before this returns;
    `decode_weights` "int4" decodes with 4-bit copies of the projections (serve/weights.py)."""
    from lorafit.infer.loading import base_of, load_for_inference, read_base_identity
    from lorafit.ops.attention import enable_lorafit_attention
    from lorafit.tuner import read_adapter

    adapters = dict(adapters or {})
    if len(adapters) > max_adapters:
        raise ValueError(f"{len(adapters)} adapters given; --max-adapters is {max_adapters}")
    name = model
    if model is None and adapters:
        first = Path(next(iter(adapters.values())))
        model = base_of(first, read_adapter(first)[0].base_model_name_or_path)
        name = read_base_identity(first).get("alias") or model  # "smollm2", not a cache path
    net, tokenizer = load_for_inference(model, None, device, dtype, merged=False)
    if getattr(net, "lorafit_task", "causal-lm") != "causal-lm":
        raise ValueError("lorafit serve serves causal language models (chat / completions)")
    if not enable_lorafit_attention(net):
        raise ValueError(
            f"lorafit serve needs a model whose attention runs through transformers' attention "
            f"interface with SDPA (Llama, Mistral, Qwen2, ...); {type(net).__name__} does not"
        )
    if tokenizer is None:
        raise ValueError(f"{model}: no tokenizer found; serving needs one")
    engine = Engine(
        net, tokenizer, slots=slots, max_len=max_len, compile=compile, weights=decode_weights
    )
    registry = Registry(engine, name or "default", adapter_dir, max_adapters, max_rank)
    try:
        for name, path in adapters.items():
            if not Path(path).is_dir():
                raise ValueError(f"adapter {name}: {path} is not a folder")
            engine.call(lambda n=name, p=path: registry.load(n, p, trusted=True)).result()
    except AdapterError as exc:
        engine.close(drain=False)
        raise ValueError(str(exc)) from None
    except BaseException:
        engine.close(drain=False)
        raise
    if compile and engine.decoder is not None:
        print(
            "compiling the decoding step (base, one adapter, mixed rows; minutes) ...",
            file=sys.stderr,
        )
        engine.call(engine.decoder.warm_up).result()
    elif compile:
        print(f"--compile ignored: {engine.lean_blocker}", file=sys.stderr)
    return registry


def complete(
    registry: Registry,
    model: str,
    conversations: list[list[dict]],
    max_tokens: int = 128,
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[str]:
    """Answer each conversation with `model` (the base's or an adapter's name) through the
    engine, all submitted at once and decoded together as a server would; replies in order.
    `lorafit generate --decode-weights` answers its prompts this way."""
    adapter = registry.resolve(model)
    replies: list[Future] = []
    for messages in conversations:
        reply: Future = Future()
        parts: list[str] = []

        def emit(event, parts=parts, reply=reply):
            kind, value = event
            if kind == "text":
                parts.append(value)
            elif kind == "done":
                reply.set_result("".join(parts).strip())
            else:
                reply.set_exception(RuntimeError(value))

        prompt = registry.render(adapter, messages)
        request = Request(prompt, adapter, emit, max_tokens, temperature, seed=seed)
        registry.engine.submit(request)
        replies.append(reply)
    return [r.result() for r in replies]


def check_binding(host: str, api_key: str | None) -> str:
    """The host to bind: anything but loopback needs an API key."""
    if api_key:
        return host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(
            f"refusing to serve on {host} without an API key: pass --api-key or set "
            "LORAFIT_API_KEY (with no key the server binds to 127.0.0.1 only)"
        )
    return host


def serve(
    registry: Registry, host: str = LOOPBACK, port: int = 8000, api_key: str | None = None, **limits
) -> None:
    """Run the HTTP server until SIGINT / SIGTERM (which let running requests finish first)."""
    import uvicorn

    from lorafit.serve.app import create_app

    api_key = api_key or os.environ.get("LORAFIT_API_KEY") or None
    host = check_binding(host, api_key)
    app = create_app(registry, api_key, **limits)
    names = ", ".join(m["id"] for m in registry.models())
    auth = "API key required" if api_key else "no API key: bound to loopback only"
    print(f"lorafit serve on http://{host}:{port}/v1 ({auth}); models: {names}", file=sys.stderr)
    free_openmp_pool()  # this thread now only serves HTTP; the engine thread computes
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
