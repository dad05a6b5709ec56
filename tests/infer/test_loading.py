"""load_for_inference must really apply the adapter, and find the adapter's base offline."""

import json

import pytest
import torch

from helpers import write_random_adapter, write_tiny_chat_model
from lorafit.infer import load_for_inference
from lorafit.infer.loading import base_of
from lorafit.models import load_model
from lorafit.tuner import load_adapter

IDS = torch.tensor([[5, 6, 7, 8, 9]])


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    model = write_tiny_chat_model(root / "model")
    return model, write_random_adapter(model, root / "adapter")


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("merged", [True, False])
def test_outputs_are_those_of_the_adapter(base_and_adapter, merged):
    model_dir, adapter = base_and_adapter
    net, _ = load_for_inference(adapter=str(adapter), merged=merged)
    base, _ = load_model(str(model_dir))
    reference, _ = load_model(str(model_dir))
    load_adapter(reference, adapter)
    assert not torch.allclose(logits(net), logits(base), atol=1e-3)
    torch.testing.assert_close(logits(net), logits(reference), atol=1e-5, rtol=1e-5)


def test_base_is_the_recorded_local_folder(base_and_adapter):
    model_dir, adapter = base_and_adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir)
    assert base_of(adapter, config["base_model_name_or_path"]) == str(model_dir)


def test_missing_base_falls_back_to_the_alias_of_the_same_source(tmp_path):
    (tmp_path / "lorafit_base.json").write_text(
        json.dumps({"alias": "smollm2", "sha256": "ab" * 32})
    )
    assert base_of(tmp_path, "/elsewhere/cache/SmolLM2") == "smollm2"
    # Adapters written before the base was recorded as a folder name the hub id.
    assert base_of(tmp_path / "old", "HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2"


def test_missing_base_without_alias_names_the_source(tmp_path):
    identity = {"source_file": "my.gguf", "sha256": "cd" * 32, "alias": None}
    (tmp_path / "lorafit_base.json").write_text(json.dumps(identity))
    with pytest.raises(FileNotFoundError, match=r"my\.gguf, sha256 cdcdcd.*pass --model"):
        base_of(tmp_path, "/elsewhere/model")


def test_adapter_records_the_base_identity_and_loads_in_peft_offline(base_and_adapter):
    import hashlib

    from peft import AutoPeftModelForCausalLM

    model_dir, adapter = base_and_adapter
    identity = json.loads((adapter / "lorafit_base.json").read_text())
    weights = (model_dir / "model.safetensors").read_bytes()
    assert identity["sha256"] == hashlib.sha256(weights).hexdigest()
    assert (
        identity["local_path"] == str(model_dir) and identity["source_file"] == "model.safetensors"
    )
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()  # no hub: offline
    net, _ = load_for_inference(adapter=str(adapter), merged=False)
    torch.testing.assert_close(logits(peft_model), logits(net), atol=1e-5, rtol=1e-5)


def test_a_malformed_base_identity_file_is_a_clear_error(tmp_path):
    (tmp_path / "lorafit_base.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        base_of(tmp_path, "/elsewhere/model")
    (tmp_path / "lorafit_base.json").write_text("{oops")
    with pytest.raises(ValueError, match="not readable JSON"):
        base_of(tmp_path, "/elsewhere/model")
