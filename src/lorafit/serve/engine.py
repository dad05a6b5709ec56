"""Continuous batching of generation requests for many adapters on one base model.

One thread owns the model. Each loop: run queued control calls (adapter load / unload), admit
waiting requests into free KV slots (one prefill forward each, its first token sampled), then ONE
decoding forward for every running request together — each batch row with its own adapter
(`tuner.adapter_rows`) and its own position (`serve.kv.Decode`) — and sample each row's next
token. A request that finishes (end token, a stop string, max_tokens, the context limit) or whose
client went away leaves at that step; a new one joins at the next. A request's tokens do not
depend on what else is in the batch (up to float rounding of a different batch size).
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafit.serve.decoder import Decoder, unsupported
from lorafit.serve.kv import Decode, KVSlots, Prefill
from lorafit.tuner import adapter_rows


@dataclass
class Request:
    """One generation: prompt token ids, the adapter (BASE: none) and the sampling options.
    `emit(event)` is called from the engine thread with ("text", delta) events, then one
    ("done", finish_reason) or ("error", message)."""

    prompt: list[int]
    adapter: str
    emit: Callable[[tuple], None]
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks; vLLM's option)
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted

    def cancel(self) -> None:
        """Leave at the next step (the client went away)."""
        self.cancelled = True


def _send(req: Request, event: tuple) -> None:
    """Hand `event` to the request's client; a client that cannot take it is cancelled (one
    broken connection never stops the others)."""
    try:
        req.emit(event)
    except Exception:
        req.cancelled = True


def free_openmp_pool() -> bool:
    """Free the calling thread's OpenMP worker threads (OpenMP 5's `omp_pause_resource_all`);
    False where the OpenMP runtime torch uses lacks it.

    The engine thread decodes; the thread that loaded the model keeps its own pool of workers.
    With more OpenMP-managed threads than cores (2 + 2 on a 2-core machine), libgomp stops
    letting idle workers spin between parallel regions, so each of a decoding step's hundreds of
    small matmuls waits for a sleeping worker to wake: measured here, a 3072x576 matmul on the
    engine thread took 227 us instead of 162 us until the loading thread's pool was freed."""
    try:
        pause = ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError):
        return False
    return pause(2) == 0  # omp_pause_hard: the pool's threads exit; a later region makes new ones


class _Running:
    __slots__ = ("req", "position", "generator")

    def __init__(self, req: Request, position: int, generator: torch.Generator | None):
        self.req, self.position, self.generator = req, position, generator


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        slots: int = 16,
        max_len: int = 2048,
        compile: bool = False,
        weights: str = "float",
    ):
        self.model, self.tokenizer = model, tokenizer
        p = next(model.parameters())
        self.device = p.device
        cfg = model.config
        self.max_len = min(max_len, getattr(cfg, "max_position_embeddings", max_len) or max_len)
        self.cache = KVSlots(cfg, slots, self.max_len, p.dtype, p.device)
        self.slots = slots
        # the lean decoding step where the model allows it (decoder.py), else transformers' forward
        # (4-bit decode weights exist only in the lean step: a model it cannot run is refused)
        self._compile, self.weights = compile, weights
        self.lean_blocker = unsupported(model)
        self._check_weights()
        self.decoder = None if self.lean_blocker else Decoder(model, self.cache, compile, weights)
        ends = model.generation_config.eos_token_id if model.generation_config else None
        ends = ends if isinstance(ends, list) else [ends]
        self.end_ids = {t for t in [*ends, tokenizer.eos_token_id] if t is not None}
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._controls: queue.Queue[tuple[Callable, Future]] = queue.Queue()
        self._running: list[_Running] = []
        self._wake = threading.Event()
        self._stop = False
        self.steps = 0
        free_openmp_pool()  # decoding runs on the engine thread, not this one
        self._thread = threading.Thread(target=self._loop, name="lorafit-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------- public API --
    @property
    def load(self) -> int:
        """Requests running or waiting."""
        return len(self._running) + self._waiting.qsize()

    def submit(self, req: Request) -> None:
        if len(req.prompt) >= self.max_len:
            raise ValueError(
                f"the prompt has {len(req.prompt)} tokens; this server holds {self.max_len} per request"
            )
        self._waiting.put(req)
        self._wake.set()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between two steps (model changes: adapters)."""
        future: Future = Future()
        self._controls.put((fn, future))
        self._wake.set()
        return future

    def adapters_changed(self) -> None:
        """Called on the engine thread after adapters were loaded or removed. ValueError: the
        decode weights cannot serve the model as it is now (the caller undoes its change)."""
        self.lean_blocker = unsupported(self.model)
        self._check_weights()
        if self.lean_blocker:
            self.decoder = None
        elif self.decoder is None:
            self.decoder = Decoder(self.model, self.cache, self._compile, self.weights)
        else:
            self.decoder.refresh()

    def _check_weights(self) -> None:
        if self.lean_blocker and self.weights != "float":
            raise ValueError(
                f"--decode-weights {self.weights} needs the lean decoding step, which cannot "
                f"run this: {self.lean_blocker}"
            )

    def adapters_in_use(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for r in [*(x.req for x in self._running), *list(self._waiting.queue)]:
            used[r.adapter] = used.get(r.adapter, 0) + 1
        return used

    def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop the loop; with `drain`, after the running and waiting requests finish."""
        deadline = time.monotonic() + timeout
        while drain and self.load and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------- loop --
    def _loop(self) -> None:
        while not self._stop:
            self._run_controls()
            self._admit()
            if not self._running:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._decode()
            except Exception as exc:  # a failing step fails its requests, not the server
                for r in self._running:
                    _send(r.req, ("error", f"generation failed: {type(exc).__name__}: {exc}"))
                self._running.clear()

    def _run_controls(self) -> None:
        while True:
            try:
                fn, future = self._controls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def _admit(self) -> None:
        while len(self._running) < self.slots:
            try:
                req = self._waiting.get_nowait()
            except queue.Empty:
                return
            if req.cancelled:
                continue
            try:
                self._prefill(req)
            except Exception as exc:
                _send(req, ("error", f"generation failed: {type(exc).__name__}: {exc}"))

    @torch.no_grad()
    def _prefill(self, req: Request) -> None:
        slot, n = len(self._running), len(req.prompt)
        ids = torch.tensor([req.prompt], device=self.device)  # (1, n)
        with adapter_rows([req.adapter], self.model):
            logits = self.model(
                input_ids=ids,
                position_ids=torch.arange(n, device=self.device)[None],
                lorafit_attention=Prefill(self.cache, slot),
                use_cache=False,
                logits_to_keep=1,
            ).logits[:, -1]  # (1, V)
        gen = None
        if req.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(req.seed if req.seed is not None else int(torch.seed()))
        run = _Running(req, n, gen)
        self._running.append(run)
        self._accept([run], self._sample([run], logits))

    @torch.no_grad()
    def _decode(self) -> None:
        if self.decoder is not None:  # rows in slot order, each picks its adapter by a mask
            rows = self._running
            ids = torch.tensor([r.req.generated[-1] for r in rows], device=self.device)  # (S,)
            positions = torch.tensor([r.position for r in rows], device=self.device)  # (S,)
            logits = self.decoder.step(ids, positions, [r.req.adapter for r in rows])
        else:
            rows, logits = self._decode_forward()
        self.steps += 1
        for r in rows:
            r.position += 1
        self._accept(rows, self._sample(rows, logits))

    def _decode_forward(self) -> tuple[list[_Running], torch.Tensor]:
        # The batch rows go sorted by adapter (running requests stay in slot order): each
        # layer then adds every adapter's update to one slice of rows, without gathering them.
        order = sorted(range(len(self._running)), key=lambda i: self._running[i].req.adapter)
        rows = [self._running[i] for i in order]
        ids = torch.tensor([[r.req.generated[-1]] for r in rows], device=self.device)  # (S, 1)
        positions = torch.tensor([r.position for r in rows], device=self.device)  # (S,)
        slots = (
            None if order == list(range(len(order))) else torch.tensor(order, device=self.device)
        )
        with adapter_rows([r.req.adapter for r in rows], self.model):
            logits = self.model(
                input_ids=ids,
                position_ids=positions[:, None],
                lorafit_attention=Decode(self.cache, positions, slots),
                use_cache=False,
                logits_to_keep=1,
            ).logits[:, -1]  # (S, V)
        return rows, logits

    def _sample(self, rows: list[_Running], logits: torch.Tensor) -> list[int]:
        tokens = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            if r.generator is None:
                continue
            p = (logits[i].float() / r.req.temperature).softmax(-1)
            if r.req.top_p < 1.0:
                sorted_p, order = p.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < r.req.top_p  # the top token always stays
                p = torch.zeros_like(p).scatter(0, order[keep], sorted_p[keep])
            tokens[i] = int(torch.multinomial(p, 1, generator=r.generator))
        return tokens

    def _accept(self, rows: list[_Running], tokens: list[int]) -> None:
        """Record each row's new token, emit its text, and retire finished rows."""
        done = []
        for r, token in zip(rows, tokens):
            req = r.req
            if req.cancelled:
                done.append(r)
                continue
            if token in self.end_ids and not req.ignore_eos:
                self._flush(req)
                reason = "stop"
            else:
                req.generated.append(token)
                reason = self._emit_text(req)  # "stop" at a stop string: the text ends before it
                if reason is None and (
                    len(req.generated) >= req.max_tokens or r.position + 1 >= self.max_len
                ):
                    self._flush(req)
                    reason = "length"
            if reason is not None:
                _send(req, ("done", reason))
                done.append(r)
        for r in done:
            self._retire(r)

    def _text(self, req: Request) -> str:
        return self.tokenizer.decode(req.generated, skip_special_tokens=True)

    def _emit_text(self, req: Request) -> str | None:
        """Emit the new text that can no longer turn into a stop string; "stop" when one appeared."""
        text = self._text(req)
        hits = [i for i in (text.find(s) for s in req.stop) if i >= 0]
        if hits:
            cut = min(hits)
            if cut > req.sent:
                _send(req, ("text", text[req.sent : cut]))
            req.sent = len(text)
            return "stop"
        if text.endswith("\ufffd"):
            return None  # an incomplete multi-byte character: wait for the rest
        hold = max((len(s) - 1 for s in req.stop), default=0)
        safe = len(text) - hold
        if safe > req.sent:
            _send(req, ("text", text[req.sent : safe]))
            req.sent = safe
        return None

    def _flush(self, req: Request) -> None:
        text = self._text(req)
        if len(text) > req.sent:
            _send(req, ("text", text[req.sent :]))
            req.sent = len(text)

    def _retire(self, run: _Running) -> None:
        """Drop a finished row; the last row moves into its slot so slots stay contiguous."""
        i = self._running.index(run)
        last = len(self._running) - 1
        if i != last:
            moved = self._running[last]
            self.cache.move(last, i, moved.position)
            self._running[i] = moved
        self._running.pop()
