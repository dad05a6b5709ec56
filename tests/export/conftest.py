"""Shared by the export tests: a tiny random Llama with SmolLM2's real tokenizer as a GGUF base,
and adapters trained on it."""

import json

import pytest
import torch

from helpers import randomize_adapters
from lorafit import LoraConfig, inject, save_adapter
from lorafit.export.gguf_file import write_model
from lorafit.models import load_model
from lorafit.models.sources import resolve_model_path


def _make_adapter(base, folder, **config):
    """A random non-zero adapter on `base`, saved in `folder` beside a run config whose system
    prompt is "Be brief."."""
    model, _ = load_model(str(base), device="cpu")
    torch.manual_seed(1)
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    inject(model, LoraConfig(**{**lora, **config}))
    randomize_adapters(model, seed=2, scale=0.5)
    save_adapter(model, folder)
    (folder / "config.json").write_text(json.dumps({"data": {"system_prompt": "Be brief."}}))
    return folder


@pytest.fixture(scope="module")
def smollm2_gguf():
    try:
        return resolve_model_path("smollm2")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tiny_base(cache, tmp_path_factory, smollm2_gguf):
    """A tiny random Llama with SmolLM2's real tokenizer, as a GGUF base file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)  # norms that are not all ones
    path = tmp_path_factory.mktemp("base") / "tiny.gguf"
    write_model(model, path, "f32", smollm2_gguf)
    return path


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # module scope: before the module's fixtures load
        mp.setenv("LORAFIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_base):
    return _make_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "run")


@pytest.fixture
def make_adapter(cache):
    return _make_adapter
