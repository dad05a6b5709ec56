"""The quickstart demo, on a tiny model: it trains, reports, and never loses the previous run."""

import json

import pytest

from helpers import write_tiny_chat_model
from lorafit.cli import quickstart


def test_quickstart_runs_and_a_failed_rerun_keeps_the_previous_run(tmp_path, monkeypatch):
    model = write_tiny_chat_model(tmp_path / "model")
    out = tmp_path / "qs"
    report = quickstart.run(str(out), steps=2, model=str(model))
    assert report["steps"] == 2 and len(report["samples"]) == len(quickstart.DEMO_PROMPTS)
    adapter = out / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((out / "quickstart.json").read_text())["adapter"] == str(adapter)
    config = json.loads((out / "run" / "config.json").read_text())
    assert config["train"]["output_dir"] == str(out / "run")  # the run names where it lives

    def crash(cfg, **kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr("lorafit.train.train", crash)
    with pytest.raises(RuntimeError, match="killed"):
        quickstart.run(str(out), steps=2, model=str(model))
    assert (adapter / "adapter_model.safetensors").is_file()  # the old run is still there
    assert sorted(p.name for p in out.iterdir()) == ["pirate.jsonl", "quickstart.json", "run"]
