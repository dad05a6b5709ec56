"""Adapters cross between lorafit and PEFT 0.21 both ways with equal logits (fp32, 1e-5)."""

import json

import pytest
import torch

from helpers import model_input, outputs, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from lorafit import LoraConfig, LoraLayer, inject, load_adapter, save_adapter
from lorafit.tuner.peft_format import PEFT_FORMAT_VERSION

peft = pytest.importorskip("peft")

CASES = {
    "llama-plain": ("llama", dict(target_modules="all-linear")),
    "llama-all-linear-exclude": (
        "llama",
        dict(target_modules="all-linear", exclude_modules=["model.layers.1.self_attn.q_proj"]),
    ),
    "llama-rslora-patterns": (
        "llama",
        dict(
            target_modules=["q_proj", "v_proj", "up_proj"],
            use_rslora=True,
            rank_pattern={"v_proj": 2, "up_proj": 6},
            alpha_pattern={"q_proj": 5},
        ),
    ),
    "llama-dora-embedding": (
        "llama",
        dict(target_modules=["q_proj", "o_proj", "embed_tokens"], use_dora=True),
    ),
    "llama-modules-to-save": (
        "llama",
        dict(target_modules=["k_proj"], modules_to_save=["lm_head"]),
    ),
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_fc", "wte"])),
    "gpt2-dora": ("gpt2", dict(target_modules=["c_attn", "c_proj"], use_dora=True)),
    "bert-head": ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "bert-dora-head": (
        "bert",
        dict(
            target_modules=["query", "key", "dense"], use_dora=True, modules_to_save=["classifier"]
        ),
    ),
}
MAKE = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


@pytest.mark.parametrize("case", list(CASES))
def test_lorafit_to_peft(case, tmp_path):
    arch, kw = CASES[case]
    model = MAKE[arch]()
    inject(model, LoraConfig(r=4, lora_alpha=8, **kw))
    randomize_adapters(model)
    x = model_input(arch)
    want = outputs(model, x)
    save_adapter(model, tmp_path / "ad")
    peft_model = peft.PeftModel.from_pretrained(MAKE[arch](), tmp_path / "ad").eval()
    torch.testing.assert_close(outputs(peft_model, x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_lorafit(case, tmp_path):
    arch, kw = CASES[case]
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(
        MAKE[arch](), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)
    )
    with (
        torch.no_grad()
    ):  # make DoRA magnitudes and saved modules differ from their starting values too
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.eval()
    x = model_input(arch)
    want = outputs(peft_model, x)
    peft_model.save_pretrained(tmp_path / "ad")
    model = MAKE[arch]()
    load_adapter(model, tmp_path / "ad")
    torch.testing.assert_close(outputs(model, x), want, atol=1e-5, rtol=1e-5)


def test_peft_checkpoint_with_bias_all_loads(tmp_path):
    peft_model = peft.get_peft_model(
        tiny_bert(),
        peft.LoraConfig(
            r=2, target_modules=["query"], bias="all", task_type="SEQ_CLS", init_lora_weights=False
        ),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.05)
    peft_model.eval()
    x = model_input("bert")
    want = outputs(peft_model, x)
    peft_model.save_pretrained(tmp_path / "ad")
    model = tiny_bert()
    load_adapter(model, tmp_path / "ad")
    torch.testing.assert_close(outputs(model, x), want, atol=1e-5, rtol=1e-5)


def test_format_version_is_the_installed_peft():
    """peft_version says whose format the files follow; a PEFT upgrade must be looked at."""
    assert PEFT_FORMAT_VERSION == peft.__version__


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


def _gpt2(layers):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=96,
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()


@pytest.mark.parametrize(
    "make,arch",
    [
        (lambda: _llama(2), "llama"),
        (lambda: _llama(3), "llama"),
        (lambda: _gpt2(5), "gpt2"),
        (tiny_bert, "bert"),
    ],
)
def test_all_linear_targets_are_what_peft_writes(make, arch, tmp_path):
    peft_model = peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules="all-linear"))
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    model = make()
    inject(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "ours")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert isinstance(ours["target_modules"], list)
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])  # PEFT: list(set)
    assert ours["peft_version"] == theirs["peft_version"]
    x = model_input(arch)
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(outputs(loaded, x), outputs(model, x), atol=1e-5, rtol=1e-5)


def test_condensed_targets_with_an_exclusion_load_the_same_modules_in_peft(tmp_path):
    model = _llama(4)
    inject(
        model,
        LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules="all-linear",
            exclude_modules=["model.layers.3.self_attn.q_proj"],
        ),
    )
    randomize_adapters(model)
    save_adapter(model, tmp_path / "ad")
    loaded = peft.PeftModel.from_pretrained(_llama(4), tmp_path / "ad").eval()
    theirs = sorted(
        n.removeprefix("base_model.model.")
        for n, m in loaded.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    assert theirs == sorted(p for p, m in model.named_modules() if isinstance(m, LoraLayer))
    x = model_input("llama")
    torch.testing.assert_close(outputs(loaded, x), outputs(model, x), atol=1e-5, rtol=1e-5)
