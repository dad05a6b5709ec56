"""benchmarks/single_stream.py (issue #13) in --smoke mode: one request per fresh process through
`lorafit generate`'s transformers path and the serve engine (float and int4 weights), base and
with an adapter, each row a measured tokens/s."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers import needs_smollm2_and_data

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "single_stream.py"

pytestmark = needs_smollm2_and_data()


def test_smoke_measures_every_path_with_and_without_an_adapter():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for row in (
        "lorafit generate (transformers",
        "--decode-weights float",
        "--decode-weights int4",
    ):
        line = next(x for x in out.stdout.splitlines() if x.startswith("| ") and row in x)
        speeds = re.findall(r"\| (\d+\.\d) \|", line)
        assert len(speeds) == 2 and all(float(s) > 0 for s in speeds), line
