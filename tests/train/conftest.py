"""Shared fixtures of the training tests: a tiny chat model and data on disk, a run config, and a
recorded stand-in for glibc's heap controls."""

import pytest

from helpers import write_chat_data, write_tiny_chat_model
from lorafit.models import heap
from lorafit.train.config import load_run_config


@pytest.fixture(scope="session")
def chat_setup(tmp_path_factory):
    """(tiny Llama chat model folder, 48-row chat jsonl)."""
    root = tmp_path_factory.mktemp("chat")
    return write_tiny_chat_model(root / "model"), write_chat_data(root / "data.jsonl")


@pytest.fixture
def make_cfg(chat_setup):
    """make_cfg(out, *overrides) -> a small, fast RunConfig on the tiny chat model."""
    model, data = chat_setup

    def make(out, *extra):
        return load_run_config(
            None,
            [
                f"model.name={model}",
                f"data.train={data}",
                f"train.output_dir={out}",
                "train.batch_size=4",
                "train.lr=1e-2",
                "lora.r=4",
                "train.eval_every=5",
                "train.save_every=5",
                "train.tensorboard=false",
                *extra,
            ],
        )

    return make


class _Libc:
    """glibc's mallopt / malloc_trim, recorded instead of changing this test process's heap."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad):
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = _Libc()
    monkeypatch.setattr(heap, "_LIBC", fake)
    monkeypatch.setattr(heap, "_mode", "capped")  # as after loading a model
    return fake
