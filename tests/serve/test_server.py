"""`lorafit serve` over real HTTP on 127.0.0.1, called with the official `openai` client (and
httpx for what the client hides): a tiny Llama chat model with two adapters."""

import json
import threading
import time

import pytest

from helpers import SERVE_KEY, SERVE_SYSTEM, ServerThread
from lorafit import LoraConfig, inject, save_adapter
from lorafit.cli.main import main
from lorafit.models import load_model
from lorafit.serve import AdapterError, build
from lorafit.serve.app import create_app
from lorafit.tasks.causal_lm import generate
from lorafit.tuner import LoraLayer, load_adapter, merge

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

KEY, SYSTEM = SERVE_KEY, SERVE_SYSTEM


class _Server(ServerThread):
    def __init__(self, registry, **kw):
        self.registry = registry
        super().__init__(create_app(registry, **kw))

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def server(serve_registry):
    registry = serve_registry(max_adapters=3)
    srv = _Server(
        registry, api_key=KEY, max_tokens=64, max_prompt_tokens=200, max_body=4096, max_concurrent=8
    )
    yield srv
    srv.stop()


def _reference(files, adapter, messages, n):
    """What `lorafit generate` answers: the adapter merged into its own copy of the base."""
    model, tok = load_model(str(files["base"]), device="cpu", dtype="float32")
    system = None
    if adapter:
        load_adapter(model, files[adapter])
        merge(model)
        system = SYSTEM if adapter == "alpha" else None
    model.eval()
    return generate(model, tok, [messages], max_new_tokens=n, system=system)[0]


MESSAGES = [{"role": "user", "content": "hello there, how are you"}]


@pytest.mark.parametrize("name", ["alpha", "beta", None])
def test_chat_equals_lorafit_generate(server, files, name):
    model = name or str(files["base"])
    out = server.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=0
    )
    want = _reference(files, name, MESSAGES, 12)
    assert out.choices[0].message.content.strip() == want
    assert out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 0
    assert out.choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_for_different_adapters_equal_their_lone_runs(server, files):
    """Mixed batch: 6 requests on base / alpha / beta with different lengths (rows leave the
    batch at different steps, so the KV slots are compacted) give what each gives alone."""
    client = server.client()
    jobs = [
        (m, f"question {i} about things", 6 + 3 * i)
        for i, m in enumerate(["alpha", "beta", str(files["base"])] * 2)
    ]

    def ask(model, text, n):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=n, temperature=0
        )
        return r.choices[0].message.content

    alone = [ask(*job) for job in jobs]
    results = [None] * len(jobs)
    steps_before = server.registry.engine.steps
    threads = [
        threading.Thread(target=lambda i=i, job=job: results.__setitem__(i, ask(*job)))
        for i, job in enumerate(jobs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == alone
    batched_steps = server.registry.engine.steps - steps_before
    assert batched_steps < sum(n for _, _, n in jobs)  # decoding steps were shared


def test_streaming_chat_and_completions(server, files):
    client = server.client()
    full = client.chat.completions.create(
        model="beta", messages=MESSAGES, max_tokens=16, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="beta", messages=MESSAGES, max_tokens=16, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    plain = client.completions.create(
        model="alpha", prompt="once upon a time", max_tokens=10, temperature=0
    )
    streamed = list(
        client.completions.create(
            model="alpha", prompt="once upon a time", max_tokens=10, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert plain.usage.completion_tokens == 10 and plain.choices[0].finish_reason == "length"


def test_seed_makes_sampling_repeatable_and_stop_cuts(server):
    client = server.client()
    kw = dict(model="alpha", prompt="the cat", max_tokens=20, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    assert a == b
    full = client.completions.create(
        model="alpha", prompt="the cat", max_tokens=20, temperature=0
    ).choices[0]
    stop = full.text[3:6]
    if not stop.strip():
        pytest.skip("greedy text too short to cut")
    cut = client.completions.create(
        model="alpha", prompt="the cat", max_tokens=20, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]


def test_models_lists_the_base_and_the_adapters(server, files):
    ids = [m.id for m in server.client().models.list().data]
    assert ids[0] == str(files["base"]) and {"alpha", "beta"} <= set(ids)


def _http(server, method, path, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/adapters"),
        ("DELETE", "/v1/adapters/alpha"),
    ],
)
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_every_route_but_health_and_the_page_needs_the_key(server, method, path, key):
    r = _http(server, method, path, key=key, json={})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert _http(server, "GET", "/health", key=None).status_code == 200
    assert "alpha" in [m["id"] for m in _http(server, "GET", "/v1/models").json()["data"]]


def test_an_unknown_path_needs_the_key_too(server):
    assert _http(server, "GET", "/v1/secret", key=None).status_code == 401
    assert _http(server, "GET", "/v1/secret").status_code == 404


def test_the_chat_page_is_static_and_runs_only_its_own_script(server, files):
    import base64
    import hashlib

    r = _http(server, "GET", "/", key=None)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "alpha" not in page and str(files["base"]) not in page  # no data without the key
    policy = r.headers["content-security-policy"]
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy.split("script-src", 1)[1].split(";", 1)[0]


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"model": "alpha", "messages": []}).encode(), 400, "messages"),
        (json.dumps({"model": "alpha", "messages": "hi"}).encode(), 400, "messages"),
        (json.dumps({"model": "nope", "messages": MESSAGES}).encode(), 404, "not served"),
        (
            json.dumps({"model": "alpha", "messages": MESSAGES, "max_tokens": 65}).encode(),
            400,
            "limit",
        ),
        (
            json.dumps(
                {"model": "alpha", "messages": [{"role": "user", "content": "word " * 300}]}
            ).encode(),
            400,
            "tokens",
        ),
        (
            json.dumps({"model": "alpha", "messages": MESSAGES, "temperature": "hot"}).encode(),
            400,
            "temperature",
        ),
        (b"x" * 5000, 413, "bytes"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, words):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and "Traceback" not in r.text


def test_adapter_paths_must_stay_inside_the_adapter_dir(server, files, tmp_path):
    root = files["root"] / "adapters"
    (root / "escape").symlink_to(files["root"] / "outside")
    try:
        for path in ["../outside", str(files["root"] / "outside"), "escape", "missing", "."]:
            r = _http(server, "POST", "/v1/adapters", json={"name": "x", "path": path})
            assert r.status_code == 404, (path, r.text)
            assert "outside" not in r.json()["error"]["message"] or path != "escape"
    finally:
        (root / "escape").unlink()


def test_hot_load_use_and_unload(server, files):
    import shutil

    shutil.copytree(files["alpha"], files["root"] / "adapters" / "gamma")
    r = _http(server, "POST", "/v1/adapters", json={"name": "gamma", "path": "gamma"})
    assert r.status_code == 200, r.text
    client = server.client()
    a = client.chat.completions.create(
        model="gamma", messages=MESSAGES, max_tokens=8, temperature=0
    )
    b = client.chat.completions.create(
        model="alpha", messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert (
        a.choices[0].message.content == b.choices[0].message.content
    )  # same weights, same system prompt
    assert (
        _http(server, "POST", "/v1/adapters", json={"name": "gamma", "path": "gamma"}).status_code
        == 409
    )
    assert _http(server, "DELETE", "/v1/adapters/gamma").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gamma", messages=MESSAGES, max_tokens=4)
    assert _http(server, "DELETE", "/v1/adapters/gamma").status_code == 404


def test_least_recently_used_adapter_is_evicted(server, files):
    import shutil

    for name in ("d1", "d2"):
        shutil.copytree(files["beta"], files["root"] / "adapters" / name, dirs_exist_ok=True)
    client = server.client()
    client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=2)
    client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2)  # beta older
    for name in ("d1", "d2"):  # max_adapters=3: the fourth evicts the least recently used
        assert (
            _http(server, "POST", "/v1/adapters", json={"name": name, "path": name}).status_code
            == 200
        )
    ids = {m["id"] for m in _http(server, "GET", "/v1/models").json()["data"]}
    assert "beta" not in ids and {"alpha", "d1", "d2"} <= ids
    for name in ("d1", "d2"):
        assert _http(server, "DELETE", f"/v1/adapters/{name}").status_code == 200
    r = _http(server, "POST", "/v1/adapters", json={"name": "beta", "path": "beta"})
    assert r.status_code == 200, r.text


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    engine = server.registry.engine
    body = {
        "model": "alpha",
        "messages": MESSAGES,
        "max_tokens": 64,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 20
    while engine.load and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.load == 0


def test_too_many_requests_in_flight_get_429(files):
    registry = build(str(files["base"]), dtype="float32", device="cpu", slots=2, max_len=128)
    srv = _Server(registry, max_tokens=64, max_concurrent=1)
    try:
        registry.engine.call(lambda: time.sleep(3))  # the engine is busy: requests wait
        body = {"model": str(files["base"]), "prompt": "a", "max_tokens": 4}
        first = threading.Thread(
            target=lambda: httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        )
        first.start()
        deadline = time.monotonic() + 10
        while registry.engine.load == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        second = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert second.json()["error"]["type"] == "rate_limit_error"
        first.join(30)
    finally:
        srv.stop()


def test_int4_decode_weights_answer_as_lorafit_generate_does(serve_registry, files, capsys):
    """`lorafit serve --decode-weights int4` and `lorafit generate --decode-weights int4` decode a
    lone request the same way (the engine's lean step with 4-bit projections): equal text."""
    srv = _Server(serve_registry(decode_weights="int4"), api_key=KEY)
    try:
        out = srv.client().chat.completions.create(
            model="alpha", messages=MESSAGES, max_tokens=12, temperature=0
        )
    finally:
        srv.stop()
    served = out.choices[0].message.content.strip()
    assert served and out.usage.completion_tokens >= 1
    argv = ["generate", "--model", str(files["base"]), "--adapter", str(files["alpha"])]
    argv += ["--prompt", MESSAGES[0]["content"], "--max-new-tokens", "12", "--device", "cpu"]
    argv += ["--dtype", "float32", "--decode-weights", "int4"]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"### {MESSAGES[0]['content']}\n{served}\n\n"


def test_int4_server_refuses_an_adapter_it_cannot_decode_and_keeps_the_rest(
    serve_registry, files, tmp_path
):
    base, _ = load_model(str(files["base"]), device="cpu")
    inject(base, LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    save_adapter(base, tmp_path / "dora")
    registry = serve_registry(decode_weights="int4")
    try:
        with pytest.raises(AdapterError, match="'dora'.*int4 needs the lean decoding step"):
            registry.engine.call(
                lambda: registry.load("dora", str(tmp_path / "dora"), True)
            ).result()
        assert "dora" not in registry.adapters
        names = {
            n for m in registry.model.modules() if isinstance(m, LoraLayer) for n in m.adapters
        }
        assert names == {"alpha", "beta"} and registry.engine.decoder is not None
    finally:
        registry.engine.close(drain=False)


def test_generate_with_decode_weights_refuses_what_the_engine_does_not_do(files, capsys):
    base = ["generate", "--model", str(files["base"]), "--decode-weights", "int4"]
    assert main(base) == 2  # no --prompt: the interactive chat decodes in float
    assert "--prompt" in capsys.readouterr().err
    assert main([*base, "--prompt", "hi", "--num-beams", "2"]) == 2
    assert "beam" in capsys.readouterr().err
