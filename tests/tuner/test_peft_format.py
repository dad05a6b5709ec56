import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import model_input, outputs, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from lorafit import AdapterFileError, LoraConfig, LoraLayer, inject, load_adapter, save_adapter
from lorafit.tuner.peft_format import PEFT_FORMAT_VERSION


def _trained(make=tiny_llama, **kw):
    model = make()
    inject(model, LoraConfig(r=4, lora_alpha=8, **kw))
    randomize_adapters(model)
    return model


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_round_trip_exact(tmp_path):
    model = _trained(
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        use_dora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 3},
    )
    x = model_input("llama")
    want = outputs(model, x)
    save_adapter(model, tmp_path / "ad")
    names = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    assert keys["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape == (2, 32)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(outputs(fresh, x), want, atol=0, rtol=0)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_pissa_saved_as_plain_lora_on_original_base(tmp_path):
    model = _trained(target_modules=["q_proj"], init_lora_weights="pissa")
    x = model_input("llama")
    want = outputs(model, x)
    save_adapter(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True
    fresh = tiny_llama()  # the original W0, not the PiSSA residual
    load_adapter(fresh, tmp_path / "p")
    torch.testing.assert_close(outputs(fresh, x), want, atol=1e-5, rtol=1e-5)


def test_bad_files_change_nothing(tmp_path):
    model = _trained(target_modules=["q_proj"])
    save_adapter(model, tmp_path / "ok")
    victim = tiny_llama()
    before = _snapshot(victim)

    def check(folder, match):
        with pytest.raises((AdapterFileError, ValueError), match=match):
            load_adapter(victim, folder)
        after = victim.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
        assert not any(isinstance(m, LoraLayer) for m in victim.modules())
        assert not getattr(victim, "lorafit_configs", None)

    check(tmp_path / "missing", "does not exist")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    (pickled / "adapter_config.json").write_text("{}")
    check(pickled, "never unpickles")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(
        (tmp_path / "ok" / "adapter_config.json").read_text()
    )
    (corrupt / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    check(corrupt, "not a readable safetensors")
    badjson = tmp_path / "badjson"
    badjson.mkdir()
    (badjson / "adapter_config.json").write_text("{not json")
    (badjson / "adapter_model.safetensors").write_bytes(
        (tmp_path / "ok" / "adapter_model.safetensors").read_bytes()
    )
    check(badjson, "not valid JSON")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    (unknown / "adapter_config.json").write_text(json.dumps({**cfg, "lora_dropuot": 0.1}))
    (unknown / "adapter_model.safetensors").write_bytes(
        (tmp_path / "ok" / "adapter_model.safetensors").read_bytes()
    )
    check(unknown, "lora_dropout")


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    model = _trained(target_modules=["q_proj"])
    save_adapter(model, tmp_path / "ad")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(
        AdapterFileError, match=r"q_proj.lora_A has shape \(4, 32\).*needs \(4, 48\)"
    ):
        load_adapter(other, tmp_path / "ad")
    assert not any(isinstance(m, LoraLayer) for m in other.modules())


def test_adapter_for_another_architecture(tmp_path):
    model = _trained(target_modules=["q_proj"])
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(AdapterFileError, match="another base model"):
        load_adapter(tiny_gpt2(), tmp_path / "ad")


def test_rank_config_mismatch(tmp_path):
    model = _trained(target_modules=["q_proj"])
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg["r"] = 5
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="rank 4 but the config says 5"):
        load_adapter(tiny_llama(), tmp_path / "ad")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = _trained(target_modules=["q_proj"])
    save_adapter(model, tmp_path / "ad")
    good = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model, seed=9)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("lorafit.tuner.peft_format.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_classifier_adapter_round_trip(tmp_path):
    model = _trained(
        tiny_bert,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        bias="lora_only",
    )
    x = model_input("bert")
    want = outputs(model, x)
    save_adapter(model, tmp_path / "cls")
    keys = load_file(tmp_path / "cls" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "cls")
    torch.testing.assert_close(outputs(fresh, x), want, atol=0, rtol=0)


def _llama(layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def test_all_linear_is_saved_resolved_with_the_peft_version(tmp_path):
    """Defect 9: "all-linear" and peft_version null were written as such; PEFT writes the resolved
    module list (condensed to leaf names from 20 modules on) and its version."""
    model = _llama(2)
    inject(model, LoraConfig(r=2, target_modules="all-linear"))
    save_adapter(model, tmp_path / "two")
    cfg = json.loads((tmp_path / "two" / "adapter_config.json").read_text())
    leaves = [
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    assert cfg["target_modules"] == [f"model.layers.{i}.{leaf}" for i in (0, 1) for leaf in leaves]
    assert cfg["peft_version"] == PEFT_FORMAT_VERSION == "0.21.2"
    assert model.lorafit_configs["default"].target_modules == "all-linear"  # in memory: as given
    big = _llama(3)  # 21 modules: PEFT writes the leaf names
    inject(big, LoraConfig(r=2, target_modules="all-linear"))
    save_adapter(big, tmp_path / "three")
    cfg = json.loads((tmp_path / "three" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    some = _llama(
        4
    )  # 27 modules; a leaf name that also names an unwrapped module is not written bare
    inject(
        some,
        LoraConfig(
            r=2, target_modules="all-linear", exclude_modules=["model.layers.3.self_attn.q_proj"]
        ),
    )
    save_adapter(some, tmp_path / "some")
    cfg = json.loads((tmp_path / "some" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [
        "0.self_attn.q_proj",
        "1.self_attn.q_proj",
        "2.self_attn.q_proj",
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "up_proj",
        "v_proj",
    ]


def test_suffix_targets_are_written_as_given(tmp_path):
    model = _trained(target_modules=["v_proj", "q_proj"])
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (
        cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["peft_version"] == PEFT_FORMAT_VERSION
    )
