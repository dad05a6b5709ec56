"""The exported GGUFs in a real llama.cpp (llama-cpp-python, built from source by scripts/setup.sh
with LORAFIT_LLAMA_CPP=1, ~5 min on 2 cores): a SmolLM2 adapter trained by `lorafit train` on E2E
rows, exported merged (f16, q8_0) and as a LoRA GGUF on the base's own GGUF, gives the same greedy
tokens in llama.cpp as in lorafit. Skipped when llama_cpp is not installed."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import SHARED_DATA

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

PROMPTS = [
    "name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate]",
    "name[The Mill], eatType[pub], food[Italian], area[riverside]",
    "name[Loch Fyne], food[Japanese], customer rating[low], area[city centre]",
    "name[Wildwood], eatType[restaurant], food[Indian], priceRange[cheap]",
    "name[Zizzi], eatType[pub], near[The Sorrento], familyFriendly[yes]",
    "name[Cotto], eatType[coffee shop], food[English], customer rating[high]",
    "name[The Phoenix], food[Chinese], area[riverside], familyFriendly[no]",
    "name[Blue Spice], eatType[restaurant], priceRange[more than £30]",
    "name[Alimentum], food[Fast food], area[city centre], near[Yippee Noodle Bar]",
    "name[Giraffe], eatType[pub], food[English], familyFriendly[yes], near[Rainbow]",
]
NEW_TOKENS = 16
SYSTEM = "Write one sentence describing the restaurant."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = SHARED_DATA / "e2e_nlg" / "trainset.csv"
    if not data.is_file():
        pytest.skip(f"needs {data}")
    root = tmp_path_factory.mktemp("llama_cpp")
    config = root / "run.yaml"
    config.write_text(
        "model:\n  name: smollm2\n"
        f"data:\n  train: {data}\n  columns: {{mr: prompt, ref: completion}}\n"
        f"  system_prompt: {SYSTEM}\n  max_length: 160\n  max_examples: 240\n"
        "train:\n  batch_size: 8\n  max_steps: 30\n  lr: 0.001\n  eval_every: 0\n  save_every: 0\n"
        f"  output_dir: {root / 'run'}\n"
    )
    cmd = [sys.executable, "-m", "lorafit", "train", str(config)]
    subprocess.run(cmd, check=True, capture_output=True)
    adapter = root / "run" / "adapter"
    outs = {}
    for fmt, dtype, name in [
        ("gguf", "f16", "merged-f16.gguf"),
        ("gguf", "q8_0", "merged-q8_0.gguf"),
        ("gguf-lora", None, "adapter.gguf"),
    ]:
        args = ["export", "--adapter", str(adapter), "--format", fmt, "--out", str(root / name)]
        subprocess.run(
            [sys.executable, "-m", "lorafit", *args, *(["--dtype", dtype] if dtype else [])],
            check=True,
            capture_output=True,
        )
        outs[name] = root / name
    return adapter, outs


def _lorafit_greedy(adapter):
    from lorafit.data.chat import render_prompt
    from lorafit.infer import load_for_inference

    model, tok = load_for_inference(adapter=str(adapter), device="cpu", dtype="float32")
    ids, outs = [], []
    for p in PROMPTS:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}]
        text = render_prompt(tok, messages)
        x = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            y = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False)
        ids.append(x[0].tolist())
        outs.append(y[0, x.shape[1] :].tolist())
    return ids, outs


def _llama_cpp_greedy(model_path, prompt_ids, lora=None):
    from lorafit.export.check import _llama_cpp_run

    llm, (_, outs) = _llama_cpp_run(model_path, prompt_ids, NEW_TOKENS, lora=lora, keep=True)
    return llm, outs


EOS = 2  # <|im_end|>: llama.cpp stops before it, transformers' generate keeps it


def _same(a, b):
    """How many prompts got exactly the same greedy tokens (up to the end of the turn)."""
    cut = lambda t: t[: t.index(EOS)] if EOS in t else t  # noqa: E731
    return sum(cut(x) == cut(y) for x, y in zip(a, b))


def test_llama_cpp_matches_lorafit_on_the_exported_ggufs(trained, tmp_path):
    from lorafit.models.sources import resolve_model_path

    adapter, outs = trained
    prompt_ids, want = _lorafit_greedy(adapter)
    llm, f16 = _llama_cpp_greedy(outs["merged-f16.gguf"], prompt_ids)
    # the GGUF's tokenizer reads the rendered prompts as lorafit's tokenizer does
    text = [llm.detokenize(t, special=True) for t in prompt_ids]
    assert [llm.tokenize(b, add_bos=False, special=True) for b in text] == (prompt_ids)
    _, q8 = _llama_cpp_greedy(outs["merged-q8_0.gguf"], prompt_ids)
    # the LoRA GGUF on the base as f16 (only the merge's rounding differs from merged f16), and on
    # the base's own Q4_1 GGUF (its 4-bit weights differ too: q8_0's bar)
    from lorafit.export.gguf_file import write_model
    from lorafit.models import load_model

    base, _ = load_model("smollm2", device="cpu", dtype="float32")
    base_f16 = tmp_path / "base-f16.gguf"
    write_model(base, base_f16, "f16", resolve_model_path("smollm2"))
    del base
    _, lora = _llama_cpp_greedy(base_f16, prompt_ids, outs["adapter.gguf"])
    _, lora_q4 = _llama_cpp_greedy(resolve_model_path("smollm2"), prompt_ids, outs["adapter.gguf"])
    table = {
        "f16": _same(f16, want),
        "q8_0": _same(q8, want),
        "lora on f16 base": _same(lora, f16),
        "lora on Q4_1 base": _same(lora_q4, f16),
    }
    (tmp_path / "parity.json").write_text(json.dumps(table))
    print("llama.cpp parity (prompts of 10 with the same greedy tokens):", table)
    assert table["f16"] >= 9 and table["q8_0"] >= 7, table
    assert table["lora on f16 base"] >= 9 and table["lora on Q4_1 base"] >= 7, table
