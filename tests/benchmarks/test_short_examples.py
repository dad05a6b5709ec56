"""benchmarks/short_examples.py (issue #16) in --smoke mode: a whole `lorafit train` process and
the PEFT loop each run twice on the real E2E rows and SmolLM2, and the table has both rows with a
examples/s figure, a peak RSS and a validation loss on the same devset rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


from helpers import needs_smollm2_and_data

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "short_examples.py"

pytestmark = needs_smollm2_and_data()


def test_smoke_times_lorafit_and_peft_as_whole_processes(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--rows",
            "peft-fp32,lorafit",
            "--scratch",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [
        line
        for line in proc.stdout.splitlines()
        if line.startswith("| PEFT") or line.startswith("| lorafit")
    ]
    assert [r.split("|")[1].strip() for r in rows] == [
        "PEFT fp32 (plain loop, padding to the longest)",
        "lorafit default",
    ]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        float(cells[1])  # examples/s (its sign is noise at smoke size: seconds of steps)
        assert float(cells[3].replace(",", "")) > 200  # peak RSS MB of a real process
        assert 0.5 < float(cells[5]) < 10  # a real cross-entropy on the devset rows
    assert (tmp_path / "s" / "peft-fp32_4_r0" / "peft_adapter" / "adapter_config.json").is_file()
