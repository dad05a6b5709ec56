"""`lorafit serve` as a command: refusals before anything loads (exit 2, one line), and a real
server process that answers and drains on SIGTERM."""

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import write_tiny_chat_model
from lorafit.cli.main import main

httpx = pytest.importorskip("httpx")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--host", "0.0.0.0"], "without an API key"),
        (["--adapters", "nameonly"], "NAME=DIR"),
        (["--adapters", "a=x", "a=y"], "twice"),
        (["--slots", "0"], "--slots must be >= 1"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, words, capsys, monkeypatch):
    monkeypatch.delenv("LORAFIT_API_KEY", raising=False)
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_a_server_process_answers_and_drains_on_sigterm(tmp_path):
    # 24 layers: a 200-token request runs long enough (a second or more) to be caught running.
    base = write_tiny_chat_model(tmp_path / "base", layers=24)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorafit", "serve", "--model", str(base), "--port", str(port)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        body = {"model": str(base), "prompt": "hello", "max_tokens": 5, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        long = {**body, "max_tokens": 200, "ignore_eos": True}
        result = {}
        client = threading.Thread(
            target=lambda: result.update(
                r=httpx.post(url + "/v1/completions", json=long, timeout=120)
            )
        )
        client.start()
        # The signal comes while the request runs: the server reports it running first.
        while httpx.get(url + "/health", timeout=2).json()["running"] == 0:
            assert client.is_alive(), "the long request ended before the server reported it"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        client.join(120)
        assert result["r"].status_code == 200  # drained: the running request finished
        assert result["r"].json()["usage"]["completion_tokens"] == 200
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once done
        assert "no API key" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
