"""GGUF bases: converted once into a plain safetensors folder under the cache dir.

transformers dequantizes a GGUF on every load, and the result refuses save_pretrained. So the
first load converts it into a Hugging Face folder (weights, config, tokenizer); later loads read
that folder in a fraction of a second, and adapters record it as their (offline-loadable) base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib

import torch

from lorafit.atomic import write_dir
from lorafit.models.sources import default_cache_dir, file_sha256

logger = logging.getLogger(__name__)

# Bump when the layout of a GGUF cache folder changes, so old caches are rebuilt, not trusted.
_CACHE_FORMAT = 2  # 2: lorafit_source.json records file name + sha256 + hub id
SOURCE_FILE = "lorafit_source.json"  # what a cache folder was built from


def is_gguf(path: pathlib.Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def cache_folder(gguf_path: pathlib.Path, cache_dir: str | os.PathLike | None) -> pathlib.Path:
    """Name the cache folder after the file's identity, so an edited or replaced GGUF gets a new one."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{_CACHE_FORMAT}"
    short_hash = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / f"{gguf_path.stem}-{short_hash}"


def convert(gguf_path: pathlib.Path, final: pathlib.Path, cache_dir=None) -> None:
    """Dequantize a GGUF once into a safetensors folder at ``final``, atomically.

    The folder is built under a temporary name and renamed into place, so a crash never leaves a
    half-written folder that later loads would trust. If another process finished first, its
    folder wins and ours is discarded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s once into %s", gguf_path, final)
    folder, name = str(gguf_path.parent), gguf_path.name

    def build(tmp: pathlib.Path) -> None:
        quantized = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        )
        config = quantized.config
        # The GGUF quantizer marks the model unsaveable; the dequantized weights are plain tensors.
        del config.quantization_config
        with torch.device("meta"):  # no second allocation of the weights
            plain = AutoModelForCausalLM.from_config(config)
        # Tied lm_head/embeddings share one tensor here; save_pretrained stores it once.
        # strict=True raises on any key mismatch.
        plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
        plain.generation_config = quantized.generation_config
        plain.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(tmp))
        stat = gguf_path.stat()
        source = {
            "gguf": str(gguf_path.resolve()),
            "file": gguf_path.name,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": file_sha256(gguf_path, cache_dir),
            "hub_id": hub_id_in_gguf(gguf_path),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))

    write_dir(final, build, keep_existing=True)


def read_source(folder: pathlib.Path) -> dict:
    """What the cache folder was built from (see `convert`)."""
    return json.loads((folder / SOURCE_FILE).read_text())


def hub_id_in_gguf(gguf_path: pathlib.Path) -> str | None:
    """The source repository named in the GGUF metadata, else None."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).get_field("general.source.huggingface.repository")
    return str(field.contents()) if field is not None else None
