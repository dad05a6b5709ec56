"""Export: a trained adapter as the files other runtimes load.

Formats are plug-ins (`FORMATS`, name -> Format): `gguf` (the merged model, one file for
llama.cpp / Ollama / LM Studio), `gguf-lora` (the adapter alone in llama.cpp's LoRA GGUF format,
applied on the base GGUF at load time), `hf` (a merged transformers folder). Every file is
written under a temporary name and renamed into place, so a failed export leaves nothing behind
and an existing output is replaced only with --force.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.export.formats import export_gguf, export_gguf_lora, export_hf


@dataclass(frozen=True)
class Format:
    name: str
    summary: str
    run: Callable[..., dict[str, Any]]
    dtypes: tuple[str, ...]


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> None:
    FORMATS[fmt.name] = fmt


register(Format("gguf", "merged model, one GGUF file", export_gguf, ("f16", "f32", "bf16", "q8_0")))
register(Format("gguf-lora", "adapter only, llama.cpp LoRA GGUF", export_gguf_lora, ("f32",)))
register(
    Format(
        "hf", "merged transformers folder", export_hf, ("auto", "float32", "bfloat16", "float16")
    )
)


def export(
    adapter: str,
    fmt: str,
    out: str,
    dtype: str | None = None,
    model: str | None = None,
    force: bool = False,
    modelfile: bool = True,
    shard_size: str | None = None,
) -> dict[str, Any]:
    """Export `adapter` as `fmt` to `out`; returns the report (what was written). `shard_size`
    (hf only): the largest safetensors shard, e.g. 2GB (the default, as transformers)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    dtype = dtype or spec.dtypes[0]
    if dtype not in spec.dtypes:
        raise ValueError(f"--format {fmt} writes {', '.join(spec.dtypes)}, not {dtype!r}")
    if not Path(adapter).is_dir():
        raise FileNotFoundError(f"no adapter folder at {adapter}")
    extra = {"shard_size": shard_size} if shard_size else {}
    if extra and fmt != "hf":
        raise ValueError("--shard-size applies to --format hf only (a GGUF is one file)")
    return spec.run(
        adapter, Path(out), dtype, model=model, force=force, modelfile=modelfile, **extra
    )


__all__ = ["FORMATS", "Format", "export", "register"]
