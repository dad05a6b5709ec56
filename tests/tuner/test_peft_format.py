import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import model_input, outputs, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from lorafit import AdapterFileError, LoraConfig, LoraLayer, inject, load_adapter, save_adapter
from lorafit.atomic import WriteError
from lorafit.tuner.peft_format import PEFT_FORMAT_VERSION, PICKLED_SUFFIXES


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


def _fail_config_write(monkeypatch):
    """The adapter_config.json bytes cannot be written (whatever writes them)."""
    write_text = Path.write_text

    def failing(self, *a, **k):
        if "adapter_config.json" in self.name:
            raise OSError(errno.ENOSPC, "disk full")
        return write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", failing)


def _fail_config_rename(monkeypatch):
    """adapter_config.json is complete but cannot be put in place."""
    replace = os.replace

    def failing(src, dst, *a, **k):
        if Path(dst).name == "adapter_config.json":
            raise OSError(errno.EIO, "disk full")
        return replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing)


def _fail_weights(monkeypatch):
    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "disk full")

    monkeypatch.setattr("lorafit.tuner.peft_format.save_file", boom)


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("fail", [_fail_weights, _fail_config_write, _fail_config_rename])
@pytest.mark.parametrize("new_base", [None, {"source": "new.gguf"}])
def test_save_is_atomic_on_failure(tmp_path, monkeypatch, fail, new_base):
    """A failed save leaves the folder exactly as it was (weights and config are one pair); a
    successful one replaces the pair and lorafit_base.json (or removes a stale one), keeps the
    user's other files, and puts the config in place last."""
    model = _trained(target_modules=["q_proj"])
    folder = tmp_path / "ad"
    save_adapter(model, folder)
    (folder / "lorafit_base.json").write_text('{"source": "old.gguf"}\n')  # the old adapter's
    (folder / "labels.json").write_text('["a", "b"]\n')  # written by others next to the adapter
    before = _files(folder)
    randomize_adapters(model, seed=9)
    model.lorafit_base = new_base
    x = model_input("llama")
    want = outputs(model, x)

    with monkeypatch.context() as m:
        fail(m)
        with pytest.raises(OSError, match="disk full"):
            save_adapter(model, folder)
    assert _files(folder) == before  # nothing new, nothing left behind

    placed = []
    replace = os.replace

    def recording(src, dst, *a, **k):
        if Path(dst).parent == folder and not Path(dst).name.startswith("."):
            placed.append(Path(dst).name)
        return replace(src, dst, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", recording)
        save_adapter(model, folder)
    after = _files(folder)
    assert placed[0] == "adapter_model.safetensors" and placed[-1] == "adapter_config.json"
    assert after["labels.json"] == before["labels.json"]
    assert after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    if new_base is None:
        assert sorted(after) == ["adapter_config.json", "adapter_model.safetensors", "labels.json"]
    else:
        assert json.loads(after["lorafit_base.json"]) == new_base
        assert placed == ["adapter_model.safetensors", "lorafit_base.json", "adapter_config.json"]
    fresh = tiny_llama()
    load_adapter(fresh, folder)
    torch.testing.assert_close(outputs(fresh, x), want, atol=0, rtol=0)


def test_save_failure_names_the_file_not_the_temporary(tmp_path, monkeypatch):
    model = _trained(target_modules=["q_proj"])
    _fail_config_rename(monkeypatch)
    with pytest.raises(WriteError, match=r"cannot write \S*/ad/adapter_config.json: disk full"):
        save_adapter(model, tmp_path / "ad")
    assert list((tmp_path / "ad").iterdir()) == []  # a first save that fails leaves nothing


def test_bad_regex_in_an_adapter_config_is_an_adapter_file_error(tmp_path):
    model = _trained(target_modules=["q_proj"])
    save_adapter(model, tmp_path / "ad")
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for field, value in (("exclude_modules", "q_proj("), ("rank_pattern", {"q_proj(": 4})):
        cfg_path.write_text(json.dumps({**cfg, field: value}))
        victim = tiny_llama()
        with pytest.raises(AdapterFileError, match=rf"{field}.*not a valid regular expression"):
            load_adapter(victim, tmp_path / "ad")
        assert not any(isinstance(m, LoraLayer) for m in victim.modules())


@pytest.mark.parametrize("suffix", PICKLED_SUFFIXES)
def test_pickled_weights_are_never_read(tmp_path, suffix):
    assert set(PICKLED_SUFFIXES) == {".bin", ".pt", ".pth", ".ckpt"}
    (tmp_path / f"adapter_model{suffix}").write_bytes(b"\x80\x04not really")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterFileError, match=rf"only pickled weights \(adapter_model\{suffix}\)"):
        load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("name", ["", "a.b", "__base__", "default"])
def test_load_adapter_checks_the_new_name_before_reading(tmp_path, name):
    model = _trained(target_modules=["q_proj"])
    with pytest.raises(ValueError, match="adapter name|reserved|already has"):
        load_adapter(model, tmp_path / "does-not-exist", name)  # the name is checked first


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


@pytest.mark.parametrize(
    "kw, label",
    [({}, "LoRA"), ({"use_rslora": True}, "rsLoRA"), ({"use_dora": True}, "DoRA")],
)
def test_describe_adapter_names_the_variant_and_counts_what_the_file_holds(tmp_path, kw, label):
    from lorafit.tuner.peft_format import describe_adapter

    model = _trained(target_modules=["q_proj", "v_proj"], **kw)
    save_adapter(model, tmp_path / "ad")
    info = describe_adapter(tmp_path / "ad")
    assert info["variant"] == label and info["r"] == 4
    assert info["scale"] == pytest.approx(8 / 2 if kw.get("use_rslora") else 8 / 4)
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert info["parameters"] == sum(t.numel() for t in tensors.values())
    assert info["target_names"] == ["q_proj", "v_proj"]
