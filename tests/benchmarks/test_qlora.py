"""benchmarks/qlora.py and quant_backends.py in --smoke mode: every row (lorafit bf16 / nf4 / int8,
PEFT + bitsandbytes 4-bit, PEFT bf16) trains a step on a tiny config in its own process and lands
in the table with a peak and a plan estimate; the backend table names a default per scheme."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str, tmp_path: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_qlora_smoke_has_every_row(tmp_path):
    out = _run("qlora.py", "--scratch", str(tmp_path / "s"), tmp_path=tmp_path)
    rows = [line for line in out.splitlines() if line.startswith("| smoke |")]
    names = [r.split("|")[2].strip() for r in rows]
    assert names == ["lorafit bf16", "lorafit nf4", "lorafit int8", "peft + bnb nf4", "peft bf16"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert "failed" not in r and float(cells[8]) > 0.1  # a real peak RSS in GB
        if cells[1].startswith("lorafit"):
            assert float(cells[9]) > 0.1  # the planner's estimate beside it


def test_quant_backends_smoke_names_a_default_per_scheme(tmp_path):
    out = _run("quant_backends.py", tmp_path=tmp_path)
    rows = [
        line for line in out.splitlines() if line.startswith("| nf4") or line.startswith("| int8")
    ]
    assert len(rows) == 4
    defaults = [r.split("|")[1].split()[0] for r in rows if r.rstrip().endswith("yes |")]
    assert sorted(defaults) == ["int8", "nf4"]
