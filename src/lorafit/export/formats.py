"""The export formats' drivers: which base GGUF an adapter belongs to, the checks that refuse
what a format cannot hold (with what to do instead), atomic writes, the Ollama Modelfile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lorafit.atomic import write_file, write_text
from lorafit.export.gguf_file import architecture, write_lora, write_model
from lorafit.export.modelfile import gguf_chat_info, modelfile
from lorafit.infer.loading import (
    base_of,
    load_for_inference,
    read_base_identity,
    run_files,
    trained_system_prompt,
)
from lorafit.infer.merging import merge_to_folder, merged_model
from lorafit.models.gguf_cache import SOURCE_FILE, is_gguf
from lorafit.models.sources import file_sha256, resolve_model_path
from lorafit.tuner import read_adapter
from lorafit.tuner.layer import LoraLayer


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; give a file name ending in .gguf")


def base_gguf(adapter: Path, model: str | None) -> Path:
    """The GGUF file the adapter's base was loaded from (its tokenizer and chat template are
    copied from there), checked against the sha256 the adapter recorded."""
    identity = read_base_identity(adapter)
    if model is not None:
        candidate = resolve_model_path(model)
    else:
        config, _ = read_adapter(adapter)
        candidate = resolve_model_path(base_of(adapter, config.base_model_name_or_path))
    if candidate.is_dir() and (candidate / SOURCE_FILE).is_file():  # lorafit's GGUF cache folder
        recorded = json.loads((candidate / SOURCE_FILE).read_text()).get("gguf")
        if recorded and Path(recorded).is_file():
            candidate = Path(recorded)
        elif identity.get("alias"):
            candidate = resolve_model_path(identity["alias"])
    if not is_gguf(candidate):
        raise ValueError(
            f"the base of {adapter} ({candidate}) was not loaded from a GGUF file, so there is no "
            "llama.cpp tokenizer to copy; pass --model with the base's .gguf, or export --format "
            "hf and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    want = identity.get("sha256")
    if want and file_sha256(candidate) != want:
        raise ValueError(
            f"{candidate} is not the base {adapter} was trained on (sha256 differs from the one "
            f"in its lorafit_base.json, {want[:12]}...); pass --model with the right .gguf"
        )
    return candidate


def _write_modelfile(out: Path, source: Path, adapter: Path, lora: bool) -> dict[str, Any]:
    template, eos = gguf_chat_info(source)
    system = trained_system_prompt(adapter)
    model_ref = str(source.resolve()) if lora else f"./{out.name}"
    text, templated = modelfile(model_ref, template, eos, f"./{out.name}" if lora else None, system)
    path = out.with_name("Modelfile")
    write_text(path, text)
    return {"modelfile": str(path), "ollama_template": templated}


def export_gguf(adapter: str, out: Path, dtype: str, model=None, force=False, modelfile=True):
    """The merged model as one GGUF in `dtype` (f32, f16, bf16, q8_0)."""
    _check_out(out, force)
    source = base_gguf(Path(adapter), model)
    net, _, report = merged_model(adapter, model, "float32")
    architecture(net)
    name = Path(adapter).resolve().name
    written: dict[str, Any] = {}
    write_file(out, lambda tmp: written.update(write_model(net, tmp, dtype, source, name=name)))
    report.update(format="gguf", out=str(out), base_gguf=str(source), **written)
    if modelfile:
        report.update(_write_modelfile(out, source, Path(adapter), lora=False))
    return report


def lora_pairs(net) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """{weight name: (A, B)} of the adapter in `net`, and the alpha llama.cpp must scale by
    (alpha / r). A scale llama.cpp cannot express with one alpha is folded into B."""
    layers = {p: m for p, m in net.named_modules() if isinstance(m, LoraLayer)}
    pairs, scales = {}, {}
    tied = getattr(net.config, "tie_word_embeddings", False)
    for path, layer in layers.items():
        if len(layer.active) > 1:
            raise ValueError(f"{path} has several active adapters; export one adapter at a time")
        if tied and path == "lm_head":
            raise ValueError(
                "the adapter trains lm_head, which this base ties to the embedding: llama.cpp has "
                "no output tensor to apply it to; export the merged model instead (--format gguf)"
            )
        for name in layer.active:
            ad = layer.adapters[name]
            if ad.variants:
                kinds = ", ".join(type(v).__name__ for v in ad.variants)
                raise ValueError(
                    f"llama.cpp applies plain LoRA only and {path} uses {kinds}; export the merged "
                    "model instead (--format gguf)"
                )
            if not layer.kind.gguf_lora:
                raise ValueError(
                    f"llama.cpp's LoRA GGUF cannot hold the {layer.kind.name} adapter on {path}; "
                    "export the merged model instead (--format gguf)"
                )
            pairs[f"{path}.weight"] = (ad.A.detach().float(), ad.B.detach().float())
            scales[f"{path}.weight"] = ad.scale * ad.r  # the alpha llama.cpp needs (scale * r)
    if not pairs:
        raise ValueError("the adapter has no LoRA layers to export")
    alphas = set(scales.values())
    if len(alphas) == 1:
        return pairs, alphas.pop()
    for key, (A, B) in pairs.items():  # mixed ranks / alphas: alpha = 1, B carries the rest
        pairs[key] = (A, B * scales[key])
    return pairs, 1.0


def export_gguf_lora(adapter: str, out: Path, dtype: str, model=None, force=False, modelfile=True):
    """The adapter alone, for llama.cpp's --lora / Ollama's ADAPTER on the base GGUF."""
    _check_out(out, force)
    folder = Path(adapter)
    config, _ = read_adapter(folder)
    if config.modules_to_save:
        raise ValueError(
            f"{adapter} also trains whole modules ({', '.join(config.modules_to_save)}), which a "
            "llama.cpp LoRA GGUF cannot hold; export the merged model instead (--format gguf)"
        )
    if read_base_identity(folder).get("quantize") not in (None, "none"):
        raise ValueError(
            f"{adapter} was trained on a quantized base (QLoRA): applied on the full-precision "
            "GGUF it corrects the wrong weights; export the merged model instead (--format gguf)"
        )
    source = base_gguf(folder, model)
    net, _ = load_for_inference(
        model, adapter, "cpu", "float32", merged=False, require_tokenizer=False
    )
    architecture(net)
    pairs, alpha = lora_pairs(net)
    written: dict[str, Any] = {}
    write_file(out, lambda tmp: written.update(write_lora(pairs, net.config, alpha, tmp, source)))
    report = {"format": "gguf-lora", "out": str(out), "base_gguf": str(source), **written}
    if modelfile:
        report.update(_write_modelfile(out, source, folder, lora=True))
    return report


def model_card(adapter: Path) -> str:
    """README.md for a merged folder: base, adapter, data, training settings, final metrics."""
    config, _ = read_adapter(adapter)
    identity = read_base_identity(adapter)
    run, summary = run_files(adapter)
    base = identity.get("alias") or identity.get("hub_id") or config.base_model_name_or_path
    lines = [
        f"# {adapter.resolve().name} (merged)",
        "",
        "A LoRA adapter trained with lorafit, merged into its base model (plain transformers "
        "weights: load with `AutoModelForCausalLM.from_pretrained`).",
        "",
        f"- base model: {base}",
    ]
    if identity.get("sha256"):
        source = identity.get("source_file") or "source file"
        lines.append(f"- base weights: {source}, sha256 {identity['sha256']}")
    if identity.get("quantize") not in (None, "none"):
        lines.append(f"- trained on the {identity['quantize']} quantized base (QLoRA)")
    targets = config.target_modules
    targets = ", ".join(sorted(targets)) if isinstance(targets, (list, set)) else targets
    lines.append(f"- adapter: r={config.r}, alpha={config.lora_alpha}, targets: {targets}")
    data, train = run.get("data") or {}, run.get("train") or {}
    if data.get("train"):
        lines.append(f"- training data: {data['train']}")
    if data.get("system_prompt"):
        lines.append(f"- system prompt: {data['system_prompt']}")
    keys = ("lr", "batch_size", "grad_accum", "epochs", "max_steps", "precision", "seed")
    settings = ", ".join(f"{k}={train[k]}" for k in keys if train.get(k) is not None)
    if settings:
        lines.append(f"- training: {settings}")
    if summary.get("steps"):
        lines.append(f"- steps run: {summary['steps']} ({summary.get('stopped', '')})")
    for name, value in (summary.get("final") or {}).items():
        lines.append(f"- final {name}: {value:.4g}" if isinstance(value, float) else f"- {name}")
    return "\n".join(lines) + "\n"


def export_hf(
    adapter: str, out: Path, dtype: str, model=None, force=False, modelfile=True, shard_size="2GB"
):
    """A merged transformers folder (what `lorafit merge` writes) with a model card."""
    card = {"README.md": model_card(Path(adapter))}
    report = merge_to_folder(
        adapter,
        str(out),
        model=model,
        dtype=dtype,  # export() checked it against the hf format's dtypes
        force=force,
        max_shard_size=shard_size,
        extra_files=card,
    )
    report.update(format="hf", out=str(out))
    return report


__all__ = ["base_gguf", "export_gguf", "export_gguf_lora", "export_hf", "lora_pairs"]
