"""Merging an adapter into its base and writing the result as a plain transformers folder.

An adapter trained on a quantized base (QLoRA) learned to correct *that* base, so by default it is
merged into the same base dequantized (as recorded in its lorafit_base.json): the base is loaded
quantized exactly as in training, the QLoRA model's logits on probe inputs (fp32 compute) are
kept, every quantized layer is dequantized to fp32, the adapter is merged in fp32, and the merged
model, cast to the chosen dtype, is compared with the QLoRA model on the same probes (the codes
are those of training: quantization always starts from the checkpoint's fp32 values). The report (max / mean
absolute logit difference) is printed and saved beside the weights as lorafit_merge.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafit.atomic import write_dir
from lorafit.infer.loading import load_for_inference, read_base_identity
from lorafit.models.loading import DTYPES
from lorafit.quant import SCHEMES
from lorafit.tasks import task_of_folder
from lorafit.tuner import dequantize_base, merge_and_unload

REPORT_FILE = "lorafit_merge.json"
PROBE_SHAPE = (4, 48)  # probe sequences x tokens


def _probe_ids(model: nn.Module, tokenizer) -> torch.Tensor:
    vocab = getattr(model.config, "vocab_size", None) or (len(tokenizer) if tokenizer else 2)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, PROBE_SHAPE, generator=gen)  # (B, T)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits.float()  # (B, T, V) or (B, labels)


def merged_model(
    adapter: str, model: str | None = None, dtype: str = "auto", base_quantize: str = "auto"
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(the plain merged model in `dtype`, its tokenizer or None, the report) for `adapter`; a
    QLoRA adapter is merged into its dequantized base and compared with the QLoRA model (see the
    module docstring)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto (float32), {', '.join(DTYPES)}")
    identity = read_base_identity(Path(adapter))
    scheme = identity.get("quantize") or "none" if base_quantize == "auto" else base_quantize
    out_dtype = DTYPES.get(dtype, torch.float32)
    report: dict[str, Any] = {
        "adapter": str(adapter),
        "base_quantize": scheme,
        "dtype": str(out_dtype),
    }
    if scheme == "none":
        net, tokenizer = load_for_inference(
            model, adapter, "cpu", dtype, merged=False, require_tokenizer=False
        )
        net = merge_and_unload(net, verify=True)
    else:
        library = identity.get("quantize_backend") or "auto"
        net, tokenizer = load_for_inference(  # fp32 compute: the merge's own reference
            model,
            adapter,
            "cpu",
            "float32",
            merged=False,
            require_tokenizer=False,
            quantize=scheme,
            quantize_backend=library,
        )
        ids = _probe_ids(net, tokenizer)
        qlora = _logits(net, ids)
        dequantize_base(net, torch.float32)
        net = merge_and_unload(net.float(), verify=True).to(out_dtype)
        merged = _logits(net, ids)
        diff = (merged - qlora).abs()
        report.update(
            quantize_backend=library,
            probe=f"{PROBE_SHAPE[0]} random sequences of {PROBE_SHAPE[1]} tokens (seed 0)",
            max_abs_logit_diff=diff.max().item(),
            mean_abs_logit_diff=diff.mean().item(),
            max_abs_logit=qlora.abs().max().item(),
        )
    return net.to(out_dtype), tokenizer, report


def merge_to_folder(
    adapter: str,
    out: str,
    model: str | None = None,
    dtype: str = "auto",
    base_quantize: str = "auto",
    force: bool = False,
    max_shard_size: str | int = "2GB",
    extra_files: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Merge `adapter` into its base and write the merged model to `out` (atomically; an existing
    non-empty `out` needs `force`), in safetensors shards of at most `max_shard_size`, with
    `extra_files` ({name: text}, e.g. a model card) beside it. `base_quantize`: auto (as the adapter was trained), none (the
    full-precision base), nf4 or int8. Returns the report (for a quantized base: the logit
    differences between the merged model and the QLoRA model)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto (float32), {', '.join(DTYPES)}")
    if base_quantize not in ("auto", "none", *SCHEMES):
        raise ValueError(
            f"unknown base quantization {base_quantize!r}; choose auto, none, {', '.join(SCHEMES)}"
        )
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise FileExistsError(f"{target} exists and is not empty; pass --force to replace it")
    net, tokenizer, report = merged_model(adapter, model, dtype, base_quantize)

    def build(tmp: Path) -> None:
        net.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if tokenizer is not None:  # merging needs only weights; the tokenizer travels if present
            tokenizer.save_pretrained(tmp)
        for name in task_of_folder(Path(adapter)).marker_files:  # e.g. label names
            if (Path(adapter) / name).is_file():
                shutil.copy(Path(adapter) / name, tmp / name)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    write_dir(target, build)  # the old folder stays intact until the new one is complete
    report["tokenizer"] = tokenizer is not None
    return report
