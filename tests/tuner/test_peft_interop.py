"""Adapters cross between lorafit and PEFT 0.21 both ways with equal logits (fp32, 1e-5)."""

import pytest
import torch

from helpers import model_input, outputs, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from lorafit import LoraConfig, inject, load_adapter, save_adapter

peft = pytest.importorskip("peft")

CASES = {
    "llama-plain": ("llama", dict(target_modules="all-linear")),
    "llama-rslora-patterns": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True,
                                             rank_pattern={"v_proj": 2, "up_proj": 6}, alpha_pattern={"q_proj": 5})),
    "llama-dora-embedding": ("llama", dict(target_modules=["q_proj", "o_proj", "embed_tokens"], use_dora=True)),
    "llama-modules-to-save": ("llama", dict(target_modules=["k_proj"], modules_to_save=["lm_head"])),
    "gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_fc", "wte"])),
    "gpt2-dora": ("gpt2", dict(target_modules=["c_attn", "c_proj"], use_dora=True)),
    "bert-head": ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "bert-dora-head": ("bert", dict(target_modules=["query", "key", "dense"], use_dora=True,
                                    modules_to_save=["classifier"])),
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
    peft_model = peft.get_peft_model(MAKE[arch](), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    with torch.no_grad():  # make DoRA magnitudes and saved modules differ from their starting values too
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
    peft_model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], bias="all",
                                                                  task_type="SEQ_CLS", init_lora_weights=False))
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
