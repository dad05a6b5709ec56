import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from lorafit.cli.main import main
from lorafit.export import export
from lorafit.export.check import check, serving_lint
from lorafit.export.gguf_file import _source_fields


@pytest.fixture(scope="module")
def exported(adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    export(str(adapter), "gguf", str(out), "f32", modelfile=False)
    return out


def test_a_faithful_gguf_passes(adapter, exported):
    result = check(str(adapter), str(exported), new_tokens=8)
    rows = {r.name: r for r in result["rows"]}
    assert result["ok"], [
        (r.name, r.greedy_equal, r.logit_error, r.notes, r.ok) for r in result["rows"]
    ]
    assert rows["merged"].greedy_equal == rows["merged"].prompts == 5
    assert rows["gguf"].greedy_equal == 5 and rows["gguf"].logit_error < 1e-2


def test_a_gguf_without_the_adapter_merged_in_fails(adapter, tiny_base, capsys):
    code = main(["check", "--adapter", str(adapter), "--gguf", str(tiny_base), "--tokens", "8"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out
    row = next(line for line in out.splitlines() if line.startswith("gguf"))
    assert "FAIL" in row


def _copy_gguf(src, dst, **changes):
    """`src` rewritten with some metadata values changed (tensors as they were)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, value, types in _source_fields(src):
        if key == "general.architecture":
            continue
        sub = types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, changes.get(key, value), types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(
            t.name, t.data, raw_shape=list(reversed(t.shape)), raw_dtype=t.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_wrong_chat_template_fails_even_with_equal_weights(adapter, exported, tmp_path):
    bad = tmp_path / "bad.gguf"
    _copy_gguf(exported, bad, **{"tokenizer.chat_template": "{{ messages }}"})
    result = check(str(adapter), str(bad), new_tokens=4)
    row = next(r for r in result["rows"] if r.name == "gguf")
    assert not result["ok"] and any("chat template" in n for n in row.notes)
    assert row.greedy_equal == row.prompts  # the weights are right: only the template is caught


class _Server:
    def __init__(self, answers):
        answers = iter(answers)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send({"data": [{"id": "m"}]})

            def do_POST(self):
                json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._send({"choices": [{"text": next(answers)}]})

            def _send(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"


def test_an_endpoint_is_compared_on_greedy_text(adapter, tmp_path):
    from lorafit.export import check as mod
    from lorafit.infer.loading import load_for_inference

    model, tok = load_for_inference(adapter=str(adapter), device="cpu", dtype="float32")
    ids = mod._prompt_ids(tok, mod.PROBES)
    _, outs = mod._torch_run(model, ids, 6)
    right = [tok.decode(o, skip_special_tokens=True) for o in outs]
    server = _Server(right + ["garbage"] * 5)
    try:
        good = check(str(adapter), url=server.url, new_tokens=6)
        bad = check(str(adapter), url=server.url, new_tokens=6)
    finally:
        server.httpd.shutdown()
    assert next(r for r in good["rows"] if r.name == "endpoint").greedy_equal == 5
    assert good["ok"] and not bad["ok"]


def test_serving_lint_names_what_each_runtime_refuses(adapter, tiny_base, make_adapter, tmp_path):
    assert serving_lint(adapter) == {"vllm": "ok", "llama.cpp": "ok", "peft": "ok"}
    dora = serving_lint(make_adapter(tiny_base, tmp_path / "d", use_dora=True, r=32))
    assert "DoRA" in dora["vllm"] and "--max-lora-rank 32" in dora["vllm"]
    assert "DoRA" in dora["llama.cpp"] and dora["peft"] == "ok"


def test_bad_inputs_get_one_line_and_exit_2(adapter, tmp_path, capsys):
    code = main(["check", "--adapter", str(adapter), "--gguf", str(tmp_path / "none.gguf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no GGUF file" in err and len(err.splitlines()) == 1
    empty = tmp_path / "p.txt"
    empty.write_text("\n")
    assert main(["check", "--adapter", str(adapter), "--prompts", str(empty)]) == 2
    assert "has no prompts" in capsys.readouterr().err


def test_check_passes_against_a_running_lorafit_serve(adapter):
    """The endpoint row against a real OpenAI-compatible server: `lorafit serve` with the adapter."""
    pytest.importorskip("uvicorn")
    from helpers import ServerThread
    from lorafit.serve import build
    from lorafit.serve.app import create_app

    registry = build(
        None, {"ad": str(adapter)}, device="cpu", dtype="float32", slots=2, max_len=128
    )
    server = ServerThread(create_app(registry))
    try:
        result = check(str(adapter), url=server.url, served_model="ad", new_tokens=6)
        base = check(str(adapter), url=server.url, new_tokens=6)  # its first model: the base
    finally:
        server.stop()
        registry.engine.close(drain=False)
    row = next(r for r in result["rows"] if r.name == "endpoint")
    assert row.greedy_equal == row.prompts and result["ok"]
    assert not base["ok"]  # the base model without the adapter answers otherwise
