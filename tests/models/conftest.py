"""Tiny model folders for the models/ tests."""

import pytest
import torch
from transformers import BertConfig, BertModel

from helpers import WORDS, word_llama, word_tokenizer


@pytest.fixture
def llama_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    word_llama().save_pretrained(folder)
    word_tokenizer(pad=False).save_pretrained(folder)  # no pad token: load must fall back to eos
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
    word_tokenizer(pad=True).save_pretrained(folder)
    return folder
