"""infer/merging.py: a QLoRA adapter merged into its base dequantized equals the QLoRA model (up
to bf16 rounding), the report says by how much, and refusals write nothing."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import write_chat_data, write_tiny_chat_model
from lorafit.infer import load_for_inference
from lorafit.infer.merging import REPORT_FILE, merge_to_folder
from lorafit.train.config import load_run_config
from lorafit.train.trainer import train


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    model, data = write_tiny_chat_model(root / "model"), write_chat_data(root / "data.jsonl")
    cfg = load_run_config(
        None,
        [
            f"model.name={model}",
            f"data.train={data}",
            f"train.output_dir={root / 'run'}",
            "model.quantize=nf4",
            "lora.r=4",
            "lora.target_modules=all-linear",
            "train.max_steps=8",
            "train.batch_size=4",
            "train.lr=0.02",
            "train.eval_every=0",
            "train.tensorboard=false",
        ],
    )
    train(cfg, progress=False)
    return root, root / "run" / "adapter"


def test_the_adapter_records_its_quantized_base_and_is_plain_peft(qlora_adapter):
    _, adapter = qlora_adapter
    base = json.loads((adapter / "lorafit_base.json").read_text())
    assert base["quantize"] == "nf4" and base["quantize_backend"] == "bitsandbytes"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "quantize" not in json.dumps(config)  # an ordinary PEFT adapter


def _ids():
    return torch.tensor([[3, 9, 14, 2, 7, 11, 5, 8]])


def test_merged_model_matches_the_qlora_model(qlora_adapter, tmp_path):
    root, adapter = qlora_adapter
    out = tmp_path / "merged"
    report = merge_to_folder(str(adapter), str(out))
    assert report["base_quantize"] == "nf4"
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["max_abs_logit_diff"] == report["max_abs_logit_diff"]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32
    # The QLoRA model computing in fp32 (dequantized weights, the adapter unmerged) is the same
    # function as the merged model: equal to fp32 rounding.
    qlora32, _ = load_for_inference(adapter=str(adapter), quantize="nf4", dtype="float32")
    base = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    with torch.no_grad():
        a, exact = merged(_ids()).logits, qlora32(_ids()).logits
        plain = base(_ids()).logits
    torch.testing.assert_close(a, exact, atol=1e-4, rtol=1e-4)
    assert report["max_abs_logit_diff"] <= 1e-4  # the report says so too
    bf16 = merge_to_folder(str(adapter), str(tmp_path / "bf16"), dtype="bfloat16")
    assert 0 < bf16["mean_abs_logit_diff"] <= 0.05 * bf16["max_abs_logit"]  # bf16's rounding
    # Merging into the full-precision base instead gives a different model (NF4's error).
    assert (plain - a).abs().max() > 10 * (a - exact).abs().max()


def test_merge_into_the_float_base_on_request(qlora_adapter, tmp_path):
    _, adapter = qlora_adapter
    report = merge_to_folder(str(adapter), str(tmp_path / "f"), base_quantize="none")
    assert report["base_quantize"] == "none" and "max_abs_logit_diff" not in report
    assert (tmp_path / "f" / "model.safetensors").is_file()


def test_refusals_write_nothing(qlora_adapter, tmp_path):
    _, adapter = qlora_adapter
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        merge_to_folder(str(adapter), str(taken))
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="unknown base quantization 'fp4'"):
        merge_to_folder(str(adapter), str(tmp_path / "x"), base_quantize="fp4")
    with pytest.raises(ValueError, match="unknown dtype"):
        merge_to_folder(str(adapter), str(tmp_path / "x"), dtype="int4")
    assert not (tmp_path / "x").exists()


def test_the_tuner_refuses_to_merge_into_a_quantized_layer(qlora_adapter):
    from lorafit.tuner import MergeError, merge

    _, adapter = qlora_adapter
    model, _ = load_for_inference(adapter=str(adapter), quantize="nf4")
    with pytest.raises(MergeError, match="quantized"):
        merge(model)
