"""The causal-LM task: loss normaliser, evaluation, and generation with a per-row adapter."""

import pytest
import torch

from helpers import chat_llama, chat_tokenizer, randomize_adapters, tiny_llama
from lorafit import LoraConfig, inject
from lorafit.tasks import get_task
from lorafit.tasks.causal_lm import generate

TASK = get_task("causal-lm")


@pytest.fixture
def model_and_tokenizer():
    tok = chat_tokenizer()
    return chat_llama(tok), tok


def test_target_count_skips_position_zero_and_ignored():
    batch = {"labels": torch.tensor([[3, 4, -100, 5], [-100, -100, 6, -100]])}
    assert TASK.target_count(batch) == 3  # labels[:, 0] is never predicted


def test_evaluate_of_nothing_is_empty():
    assert TASK.evaluate(tiny_llama(), [], collator=None) == {}


def test_per_row_adapters_in_one_generate_call(model_and_tokenizer):
    model, tok = model_and_tokenizer
    for name in ("a", "b"):
        inject(
            model,
            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
            name,
        )
    randomize_adapters(model, scale=2.0)
    prompts = ["hello there", "name a colour", "what is the capital of France?"]
    rows = ["a", "__base__", "b"]
    mixed = generate(model, tok, prompts, max_new_tokens=6, adapter_names=rows)
    from lorafit.tuner import disable_adapter, set_active

    alone = []
    for prompt, name in zip(prompts, rows):
        if name == "__base__":
            with disable_adapter(model):
                alone += generate(model, tok, [prompt], max_new_tokens=6)
        else:
            set_active(model, name)
            alone += generate(model, tok, [prompt], max_new_tokens=6)
    assert mixed == alone
    # The choice matters: every prompt reads differently under each adapter and the base.
    each = [
        generate(model, tok, prompts, max_new_tokens=6, adapter_names=[n] * 3)
        for n in ("a", "b", "__base__")
    ]
    assert all(len({out[i] for out in each}) == 3 for i in range(3))
    with pytest.raises(ValueError, match="adapter names for 3 prompts"):
        generate(model, tok, prompts, adapter_names=["a"])
