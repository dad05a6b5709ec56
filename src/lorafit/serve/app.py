"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI; uvicorn runs it).

Routes: POST /v1/chat/completions, POST /v1/completions (both with `stream: true` as server-sent
events in OpenAI's chunk format, ending with `data: [DONE]`), GET /v1/models, GET /health,
POST /v1/adapters and DELETE /v1/adapters/{name} (hot load / unload), and GET / : a chat page
(page.html, no build step) that streams two models' answers side by side. With an API key, every
route but /health and the page wants `Authorization: Bearer KEY` (compared in constant time); the
page is a static file that holds no data, and its calls carry the key its user types in. Every
error is OpenAI's error object with a 4xx/5xx status; no traceback reaches a client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorafit.serve.engine import Request
from lorafit.serve.registry import AdapterError, Registry


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", headers=None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def _error(status: int, message: str, kind: str, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str


class AdapterRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    path: str = Field(min_length=1)


OPEN_PATHS = frozenset({"/", "/health"})  # no key needed: the liveness probe and the static page


def _page() -> tuple[str, str]:
    """The chat page and its Content-Security-Policy: only its own inline script (by hash) runs,
    and it talks to this server only."""
    html = resources.files("lorafit.serve").joinpath("page.html").read_text(encoding="utf-8")
    script = html.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html, policy


def create_app(
    registry: Registry,
    api_key: str | None = None,
    max_tokens: int = 512,
    max_prompt_tokens: int = 1536,
    max_body: int = 1 << 20,
    max_concurrent: int = 32,
) -> FastAPI:
    engine, renderer = registry.engine, registry.render

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        await asyncio.to_thread(engine.close, True)  # shutdown: running requests finish first

    app = FastAPI(
        title="lorafit serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.registry = registry

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return _error(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(AdapterError)
    async def _adapter_error(_, exc: AdapterError):
        kind = "rate_limit_error" if exc.status == 429 else "invalid_request_error"
        return _error(exc.status, str(exc), kind)

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        return _error(500, "internal server error", "server_error")

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            want = f"Bearer {api_key}"
            if not hmac.compare_digest(given.encode(), want.encode()):
                return _error(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    "authentication_error",
                )
        try:
            return await call_next(request)
        except Exception:  # anything a handler did not turn into an error response
            return _error(500, "internal server error", "server_error")

    async def _body(request: HTTPRequest, schema):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body:
            raise ApiError(413, f"request body over {max_body} bytes")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > max_body:
                raise ApiError(413, f"request body over {max_body} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ApiError(400, f"{where}: {first['msg']}") from None

    def _start(body: _Sampling, prompt: list[int]):
        adapter = registry.resolve(body.model)  # ApiError 404 for an unknown model
        if len(prompt) > max_prompt_tokens:
            raise ApiError(
                400, f"the prompt has {len(prompt)} tokens; the limit is {max_prompt_tokens}"
            )
        limit = body.max_completion_tokens or body.max_tokens or max_tokens
        if limit > max_tokens:
            raise ApiError(400, f"max_tokens {limit} is over this server's limit of {max_tokens}")
        if engine.load >= max_concurrent:
            raise ApiError(
                429,
                "too many requests in flight; retry shortly",
                "rate_limit_error",
                {"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = Request(
            prompt=prompt,
            adapter=adapter,
            emit=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
            max_tokens=limit,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=list(body.stop or []),
            ignore_eos=body.ignore_eos,
        )
        try:
            engine.submit(req)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return req, events

    def _usage(req: Request) -> dict:
        p, c = len(req.prompt), len(req.generated)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def _respond(body, req, events, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created, kind = int(time.time()), "chat.completion" if chat else "text_completion"
        if not body.stream:
            parts, reason = [], None
            try:
                while True:
                    event = await events.get()
                    if event[0] == "text":
                        parts.append(event[1])
                    elif event[0] == "done":
                        reason = event[1]
                        break
                    else:
                        raise ApiError(500, event[1], "server_error")
            finally:
                req.cancel()  # a client gone mid-wait frees its slot at the next step
            text = "".join(parts)
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason,
                }
                if chat
                else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            )
            return {
                "id": rid,
                "object": kind,
                "created": created,
                "model": body.model,
                "choices": [choice],
                "usage": _usage(req),
            }

        def chunk(delta: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if delta is not None:
                    d["content"] = delta
                choice = {"index": 0, "delta": d, "finish_reason": reason}
                obj = "chat.completion.chunk"
            else:
                choice = {
                    "index": 0,
                    "text": delta or "",
                    "logprobs": None,
                    "finish_reason": reason,
                }
                obj = "text_completion"
            out = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": body.model,
                "choices": [choice],
            }
            if reason is not None:
                out["usage"] = _usage(req)
            return f"data: {json.dumps(out)}\n\n"

        async def stream():
            try:
                if chat:
                    yield chunk(None, None, first=True)
                while True:
                    event = await events.get()
                    if event[0] == "text":
                        yield chunk(event[1], None)
                    elif event[0] == "done":
                        yield chunk(None if chat else "", event[1])
                        break
                    else:
                        err = {
                            "error": {
                                "message": event[1],
                                "type": "server_error",
                                "param": None,
                                "code": 500,
                            }
                        }
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                req.cancel()  # normal end: a no-op; a disconnect: the slot frees at the next step

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await _body(request, ChatRequest)
        messages = [m.model_dump() for m in body.messages]
        prompt = renderer(body.model, messages)
        req, events = _start(body, prompt)
        return await _respond(body, req, events, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await _body(request, CompletionRequest)
        prompt = registry.tokenize(body.prompt)
        if not prompt:
            raise ApiError(400, "prompt is empty")
        req, events = _start(body, prompt)
        return await _respond(body, req, events, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": registry.models()}

    page, policy = _page()

    @app.get("/")
    async def chat_page():
        return HTMLResponse(
            page,
            headers={
                "Content-Security-Policy": policy,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.load}

    @app.post("/v1/adapters")
    async def load_adapter(request: HTTPRequest):
        body = await _body(request, AdapterRequest)
        try:
            info = await asyncio.wrap_future(
                engine.call(lambda: registry.load(body.name, body.path))
            )
        except AdapterError as exc:
            raise ApiError(exc.status, str(exc)) from None
        return info

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        try:
            await asyncio.wrap_future(engine.call(lambda: registry.unload(name)))
        except AdapterError as exc:
            raise ApiError(exc.status, str(exc)) from None
        return {"id": name, "object": "model", "deleted": True}

    return app
