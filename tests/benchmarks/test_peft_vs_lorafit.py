"""benchmarks/peft_vs_lorafit.py (issue #5): runs end to end on a tiny random Llama, every row,
and lorafit's per-step losses agree with PEFT's. Nothing here looks at timings."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "peft_vs_lorafit.py"


def _bench():
    spec = importlib.util.spec_from_file_location("peft_vs_lorafit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # top level imports only the standard library
    return module


def test_smoke_runs_every_row_and_losses_agree(tmp_path):
    pytest.importorskip("peft")
    bench = _bench()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    markdown = (tmp_path / "peft_vs_lorafit.md").read_text()
    for row in bench.ROWS.values():
        assert f"| {row.label} | 32 |" in proc.stdout and f"| {row.label} | 32 |" in markdown, (
            row.label
        )
    assert (tmp_path / "peft_vs_lorafit.png").stat().st_size > 1000

    data = json.loads((tmp_path / "peft_vs_lorafit.json").read_text())
    results = {r["row"]: r for r in data["results"]}
    assert set(results) == set(bench.ROWS)
    steps = data["args"]["warmup"] + data["args"]["steps"]
    assert results["lorafit-mmap-cap"]["env"] == bench.MMAP_CAP_ENV  # reached its process
    for r in results.values():
        assert len(r["losses"]) == steps and all(math.isfinite(x) and x > 0 for x in r["losses"]), (
            r["row"]
        )
    # Recheck agreement from the raw losses, independently of the script's own verdict.
    for key, row in bench.ROWS.items():
        if row.lib != "lorafit":
            continue
        ours, ref = results[key], results[bench.BASELINE[key]]
        rel = [abs(a - b) / b for a, b in zip(ours["losses"], ref["losses"])]
        if ours["precision"] == ref["precision"]:
            assert max(rel) <= bench.SAME_RTOL, (key, ours["losses"], ref["losses"])
        else:
            assert rel[0] <= bench.CROSS_RTOL, (key, ours["losses"], ref["losses"])
    # The fp32 rows always give an all-steps, tight comparison with PEFT.
    tight = {
        c["row"]
        for c in data["loss_checks"]
        if c["steps_checked"] == steps and c["rtol"] == bench.SAME_RTOL
    }
    assert {"lorafit-fp32", "lorafit-dora-fp32"} <= tight
    assert data["losses_agree"] is True


def test_loss_check_flags_a_disagreement():
    bench = _bench()

    def result(key, precision, losses):
        return {"row": key, "T": 32, "precision": precision, "losses": losses}

    good = [2.0, 1.9, 1.8]
    results = {
        ("peft-fp32", 32): result("peft-fp32", "fp32", good),
        ("lorafit-fp32", 32): result(
            "lorafit-fp32", "fp32", [2.0, 1.9, 1.8 * 1.01]
        ),  # 1% off at step 3
        ("lorafit", 32): result("lorafit", "bf16", [2.0 * 1.01, 1.5, 1.5]),
    }  # bf16: step 1 only
    _, checks = bench.check_losses(results)
    verdict = {c["row"]: c["agree"] for c in checks}
    assert verdict == {"lorafit-fp32": False, "lorafit": True}
    results["lorafit", 32]["losses"][0] = 2.0 * 1.03  # 3% off at step 1: beyond the bf16 tolerance
    assert {c["row"]: c["agree"] for c in bench.check_losses(results)[1]} == {
        "lorafit-fp32": False,
        "lorafit": False,
    }
