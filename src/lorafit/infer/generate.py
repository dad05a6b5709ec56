"""Text generation with a base model, optionally with an adapter: one prompt, a batch, or a chat."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from lorafit.tuner.peft_format import load_adapter, read_adapter
from lorafit.tuner.merge import merge
from lorafit.models.loading import load_model


def load_for_inference(model: str | None = None, adapter: str | None = None, device: str = "auto",
                       dtype: str = "auto", cache_dir: str | None = None, merged: bool = True):
    """(model, tokenizer) ready to generate. The base defaults to the adapter's base model; with
    `merged` the adapter is folded into the weights (no per-token overhead). A fully fine-tuned
    model folder (from a run with train.method=full) may be given as `adapter` too."""
    labels_file = Path(adapter) / "labels.json" if adapter else None
    if adapter and (Path(adapter) / "config.json").is_file() and not (Path(adapter) / "adapter_config.json").exists():
        model, adapter = str(adapter), None  # a whole model, not an adapter
    if model is None:
        if adapter is None:
            model = "smollm2"
        else:
            config, _ = read_adapter(adapter)
            model = _local_name(config.base_model_name_or_path)
    task = "causal-lm"
    labels = None
    if labels_file is not None and labels_file.is_file():
        task, labels = "classification", json.loads(labels_file.read_text())
    net, tokenizer = load_model(model, task, len(labels) if labels else None, dtype, device, cache_dir)
    if adapter:
        load_adapter(net, adapter)
        if merged:
            merge(net, verify=True)
    net.eval()
    if labels:
        net.config.id2label = dict(enumerate(labels))
    return net, tokenizer


def _local_name(name: str | None) -> str:
    """Map an adapter's recorded base model to something loadable here (no hub downloads)."""
    aliases = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2",
               "sentence-transformers/all-MiniLM-L6-v2": "minilm"}
    if not name:
        raise ValueError("the adapter does not record its base model; pass --model")
    return aliases.get(name, name)


def build_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str | list[dict[str, str]]], max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, num_beams: int = 1, system: str | None = None,
             batch_size: int = 8) -> list[str]:
    """Complete each prompt (a user message, or a whole message list); greedy when temperature is 0."""
    device = next(model.parameters()).device
    texts = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        texts.append(build_prompt(tokenizer, messages))
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    outputs: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, num_beams=num_beams,
                                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            out = model.generate(**enc, **kwargs)                     # (B, T + new)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = old_side
    return outputs


def chat(model: nn.Module, tokenizer, system: str | None = None, max_new_tokens: int = 256,
         temperature: float = 0.0, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """An interactive chat on the terminal; /reset clears the history, /exit (or EOF) quits."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    stdout.write("chat: type a message, /reset to start over, /exit to quit\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        reply = generate(model, tokenizer, [history], max_new_tokens, temperature)[0]
        history.append({"role": "assistant", "content": reply})
        stdout.write(f"model> {reply}\n")


@torch.no_grad()
def classify(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> list[str]:
    device = next(model.parameters()).device
    labels = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=512).to(device)
        ids = model(**enc).logits.argmax(-1).tolist()
        labels += [model.config.id2label.get(i, str(i)) for i in ids]
    return labels
