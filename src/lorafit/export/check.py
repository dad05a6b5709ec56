"""`lorafit check`: a parity gate between an adapter and what was made of it.

For a set of probe prompts (rendered with the model's chat template, as training and generation
render them) it compares, against the adapter applied unmerged in fp32 (the reference):
- the merged model (`merge_and_unload`): next-token logits and greedy continuations;
- a GGUF (`--gguf`): run by llama.cpp when llama-cpp-python is installed, else read back by
  transformers' GGUF loader; logits (where the runtime gives them) and greedy continuations;
- an OpenAI-compatible endpoint (`--url`): greedy completion text.
It also checks that the GGUF carries the tokenizer's chat template and EOS token, that the base
the adapter is applied to is the one it recorded (sha256), and lints which runtimes will load the
adapter (vLLM, llama.cpp, PEFT) with the reason for each refusal. A row fails when its greedy
match rate or logit error is beyond the tolerance of its dtype.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafit.export.formats import base_gguf
from lorafit.infer.loading import load_for_inference, read_base_identity
from lorafit.tuner import merge_and_unload, read_adapter

PROBES = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "How many legs does a spider have?",
    "Say hello in Spanish.",
]
# dtype -> (largest max |logit diff| / max |logit|, least share of prompts with equal greedy tokens);
# f32 allows 1e-2: llama.cpp keeps its KV cache in f16 (4e-3 measured on a tiny random Llama)
TOLERANCE = {
    "f32": (1e-2, 1.0),
    "f16": (2e-2, 0.8),
    "bf16": (5e-2, 0.7),
    "q8_0": (0.1, 0.6),
    "endpoint": (None, 0.8),
}


@dataclass
class Row:
    name: str
    runtime: str
    dtype: str
    greedy_equal: int = 0
    prompts: int = 0
    logit_error: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        max_err, min_share = TOLERANCE.get(self.dtype, TOLERANCE["f16"])
        share_ok = self.prompts == 0 or self.greedy_equal >= min_share * self.prompts - 1e-9
        err_ok = self.logit_error is None or max_err is None or self.logit_error <= max_err
        return share_ok and err_ok and not any(n.startswith("MISMATCH") for n in self.notes)


def read_probes(path: str | None) -> list[str]:
    if path is None:
        return PROBES
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        if line.startswith("{"):
            try:
                line = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: a JSON line needs a 'prompt' string") from None
        prompts.append(str(line))
    if not prompts:
        raise ValueError(f"{path} has no prompts (one per line, or JSON lines with 'prompt')")
    return prompts


def _prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    from lorafit.data.chat import render_prompt

    out = []
    for p in prompts:
        text = render_prompt(tokenizer, [{"role": "user", "content": p}])
        out.append(tokenizer(text, add_special_tokens=False).input_ids)
    return out


@torch.no_grad()
def _torch_run(model, prompt_ids, new_tokens):
    """(last-position logits per prompt, greedy continuation per prompt) of a torch model."""
    logits, outs = [], []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        logits.append(model(input_ids=x).logits[0, -1].float())
        y = model.generate(
            x, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(x)
        )
        outs.append(y[0, x.shape[1] :].tolist())
    return logits, outs


def _llama_cpp_run(path: Path, prompt_ids, new_tokens, lora: Path | None = None, keep=False):
    """(last-position logits, greedy continuations) in llama.cpp; with `keep`, (the Llama, that)."""
    import llama_cpp

    extra = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(str(path), n_ctx=1024, logits_all=True, verbose=False, **extra)
    logits, outs = [], []
    for ids in prompt_ids:
        llm.reset()
        llm.eval(ids)
        logits.append(torch.tensor(llm.scores[len(ids) - 1]).float())
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token == llm.token_eos() or len(got) == new_tokens:
                break
            got.append(token)
        outs.append(got)
    return (llm, (logits, outs)) if keep else (logits, outs)


def _compare(row: Row, ref, got, eos_id) -> Row:
    ref_logits, ref_out = ref
    logits, outs = got
    strip = lambda t: t[: t.index(eos_id)] if eos_id in t else t  # noqa: E731
    row.prompts = len(ref_out)
    row.greedy_equal = sum(strip(a) == strip(b) for a, b in zip(ref_out, outs))
    if logits is not None:
        scale = max(r.abs().max().item() for r in ref_logits) or 1.0
        row.logit_error = (
            max((a - b).abs().max().item() for a, b in zip(ref_logits, logits)) / scale
        )
    return row


def _gguf_dtype(path: Path) -> str:
    import gguf

    ftype = gguf.GGUFReader(str(path)).get_field("general.file_type")
    names = {0: "f32", 1: "f16", 32: "bf16", 7: "q8_0"}
    return names.get(int(ftype.contents()), "q8_0") if ftype is not None else "f16"


def gguf_metadata_notes(path: Path, tokenizer) -> list[str]:
    """MISMATCH notes where the GGUF's chat template or EOS differs from the tokenizer's."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    notes = []
    template = reader.get_field("tokenizer.chat_template")
    want = getattr(tokenizer, "chat_template", None)
    if want and (template is None or str(template.contents()) != want):
        notes.append("MISMATCH chat template differs from the tokenizer's")
    eos = reader.get_field("tokenizer.ggml.eos_token_id")
    if tokenizer.eos_token_id is not None and (
        eos is None or int(eos.contents()) != tokenizer.eos_token_id
    ):
        notes.append(
            f"MISMATCH EOS id {None if eos is None else eos.contents()} != {tokenizer.eos_token_id}"
        )
    return notes


def _server_text(tokenizer, ids: list[int]) -> str:
    """The prompt text a server must be sent to run `ids`: without the leading BOS when the
    tokenizer adds one itself (servers tokenize completion prompts with it, as vLLM does)."""
    bos = tokenizer.bos_token_id
    if ids[:1] == [bos]:
        rest = tokenizer.decode(ids[1:])
        if tokenizer(rest)["input_ids"][:1] == [bos]:
            return rest
    return tokenizer.decode(ids)


def _endpoint(url: str, model: str | None, prompts_text: list[str], new_tokens: int) -> list[str]:
    base = url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    if model is None:
        with urllib.request.urlopen(f"{base}/models", timeout=30) as r:
            model = json.load(r)["data"][0]["id"]
    outs = []
    for text in prompts_text:
        body = {"model": model, "prompt": text, "max_tokens": new_tokens, "temperature": 0}
        req = urllib.request.Request(
            f"{base}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            outs.append(json.load(r)["choices"][0]["text"])
    return outs


def serving_lint(adapter: Path) -> dict[str, str]:
    """Runtime -> "ok" or why it will not load the adapter."""
    config, tensors = read_adapter(adapter)
    reasons: dict[str, list[str]] = {"vllm": [], "llama.cpp": [], "peft": []}
    if config.use_dora:
        reasons["vllm"].append("DoRA is not supported")
        reasons["llama.cpp"].append("DoRA is not supported (export the merged model)")
    if config.modules_to_save:
        saved = ", ".join(config.modules_to_save)
        reasons["vllm"].append(f"modules_to_save ({saved}) are not loaded")
        reasons["llama.cpp"].append(f"modules_to_save ({saved}) cannot be held in a LoRA GGUF")
    if any("lora_embedding" in k for k in tensors):
        reasons["vllm"].append("embedding adapters are not supported")
        reasons["llama.cpp"].append("embedding adapters are not exported by lorafit")
    ranks = [config.r, *config.rank_pattern.values()]
    if max(ranks) > 512:
        reasons["vllm"].append(f"rank {max(ranks)} > 512, vLLM's largest --max-lora-rank")
    elif max(ranks) > 16:
        reasons["vllm"].append(f"needs --max-lora-rank {max(ranks)} (the default is 16)")
    if read_base_identity(adapter).get("quantize") not in (None, "none"):
        note = "trained on a quantized base: apply it on that base, or export the merged model"
        reasons["llama.cpp"].append(note)
        reasons["vllm"].append(note)
    return {k: "; ".join(v) if v else "ok" for k, v in reasons.items()}


def check(
    adapter: str,
    gguf_path: str | None = None,
    url: str | None = None,
    probes: str | None = None,
    new_tokens: int = 16,
    served_model: str | None = None,
) -> dict[str, Any]:
    """Run the gate; returns {"rows": [...], "lint": {...}, "ok": bool}."""
    folder = Path(adapter)
    prompts = read_probes(probes)
    model, tokenizer = load_for_inference(
        adapter=adapter, device="cpu", dtype="float32", merged=False
    )
    if tokenizer is None:
        raise ValueError(f"the base of {adapter} has no tokenizer: check needs one to probe it")
    prompt_ids = _prompt_ids(tokenizer, prompts)
    ref = _torch_run(model, prompt_ids, new_tokens)
    eos = tokenizer.eos_token_id
    rows = []
    base_note = []
    try:  # the base GGUF the adapter came from, checked against the sha256 it recorded
        base_gguf(folder, None)
    except ValueError as exc:
        if "sha256" in str(exc):
            base_note.append(f"MISMATCH {exc}")
    merged = merge_and_unload(model, verify=True)
    rows.append(
        _compare(
            Row("merged", "transformers", "f32", notes=base_note),
            ref,
            _torch_run(merged, prompt_ids, new_tokens),
            eos,
        )
    )
    if gguf_path is not None:
        path = Path(gguf_path)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {gguf_path}")
        dtype = _gguf_dtype(path)
        notes = gguf_metadata_notes(path, tokenizer)
        try:
            import llama_cpp  # noqa: F401

            runtime, got = "llama.cpp", _llama_cpp_run(path, prompt_ids, new_tokens)
        except ImportError:
            from transformers import AutoModelForCausalLM

            net = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            ).eval()
            runtime, got = "transformers (GGUF reader)", _torch_run(net, prompt_ids, new_tokens)
        rows.append(_compare(Row("gguf", runtime, dtype, notes=notes), ref, got, eos))
    if url is not None:
        texts = [_server_text(tokenizer, ids) for ids in prompt_ids]
        got_text = _endpoint(url, served_model, texts, new_tokens)
        want_text = [tokenizer.decode(o, skip_special_tokens=True) for o in ref[1]]
        row = Row("endpoint", url, "endpoint", prompts=len(texts))
        row.greedy_equal = sum(a.strip() == b.strip() for a, b in zip(got_text, want_text))
        rows.append(row)
    lint = serving_lint(folder)
    return {"rows": rows, "lint": lint, "ok": all(r.ok for r in rows), "prompts": len(prompts)}
