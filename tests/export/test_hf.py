import torch

from lorafit.export import export
from lorafit.infer.merging import merged_model


def test_hf_export_is_sharded_loadable_and_has_a_model_card(adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    export(str(adapter), "hf", str(out), shard_size="2MB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    card = (out / "README.md").read_text()
    assert "r=4, alpha=8" in card and "system prompt: Be brief." in card and "sha256" in card
    ids = torch.tensor([[1, 504, 3458, 28, 260]])
    net, _, _ = merged_model(str(adapter), None, "float32")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, net(input_ids=ids).logits)


def test_shard_size_is_refused_for_gguf(adapter, tmp_path):
    import pytest

    with pytest.raises(ValueError, match="--format hf only"):
        export(str(adapter), "gguf", str(tmp_path / "m.gguf"), shard_size="1GB")
    assert not list(tmp_path.iterdir())
