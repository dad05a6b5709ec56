"""benchmarks/serve_load.py (issue #13) in --smoke mode: a real `lorafit serve` process on
SmolLM2 with 4 adapters (float and int4 decode weights), 4 clients at once and one at a time,
PEFT switching adapters; every request answered, every row in the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from helpers import needs_smollm2_and_data

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"

pytestmark = needs_smollm2_and_data()


def test_smoke_serves_every_request_and_prints_the_table():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["row"].split()[0] for r in rows] == ["(a)", "(b)", "(a-int4)", "(b-int4)", "(c)"]
    assert all(r["failed"] == 0 and r["tokens"] == 4 * 8 for r in rows)
    assert "| (a) lorafit serve, all clients at once |" in out.stdout
