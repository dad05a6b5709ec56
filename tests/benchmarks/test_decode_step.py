"""benchmarks/decode_step.py (issue #13) in --smoke mode: SmolLM2's decoding step through every
eager path (transformers' forward, the lean step with float and int4 weights) and the int4 vs
float agreement line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import needs_smollm2_and_data

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_step.py"

pytestmark = needs_smollm2_and_data()


def test_smoke_times_every_eager_path_and_reports_the_int4_agreement():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("transformers forward", "lean step, float weights", "lean step, int4 weights"):
        assert f"| {row}" in out.stdout
    assert "chat prompts give the same 8 tokens" in out.stdout
