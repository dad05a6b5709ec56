"""Shared by the serve tests: a tiny Llama chat model with two adapters (alpha with its own
system prompt, beta) inside an adapter root, and a third adapter outside it."""

import json

import pytest
import torch

from helpers import SERVE_SYSTEM, randomize_adapters, write_tiny_chat_model
from lorafit import LoraConfig, inject, save_adapter
from lorafit.models import load_model
from lorafit.serve import build


def _adapter(base, folder, seed, system=None):
    model, _ = load_model(str(base), device="cpu")
    torch.manual_seed(seed)
    inject(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model, seed=seed, scale=0.8)
    save_adapter(model, folder)
    if system:
        (folder / "config.json").write_text(json.dumps({"data": {"system_prompt": system}}))
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = write_tiny_chat_model(root / "base")
    (root / "adapters").mkdir()
    a = _adapter(base, root / "adapters" / "alpha", 1, SERVE_SYSTEM)
    b = _adapter(base, root / "adapters" / "beta", 2)
    _adapter(base, root / "outside", 3)
    return {"root": root, "base": base, "alpha": a, "beta": b}


@pytest.fixture(scope="module")
def serve_registry(files):
    """`serve_registry(**overrides)`: a fresh `build` (its own engine) of the base + alpha + beta."""

    def make(**overrides):
        options = dict(
            adapter_dir=str(files["root"] / "adapters"),
            dtype="float32",
            device="cpu",
            slots=4,
            max_len=256,
        )
        options.update(overrides)
        adapters = {"alpha": str(files["alpha"]), "beta": str(files["beta"])}
        return build(str(files["base"]), adapters, **options)

    return make
