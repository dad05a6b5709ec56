"""Load a base model and its tokenizer, on the chosen device and dtype, with the model head a
task asks for. Sources (folders, GGUF files, aliases) are resolved by sources.py; GGUF files are
read through the converted cache of gguf_cache.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

import lorafit.models.gguf_cache as gguf_cache
import lorafit.models.streaming as streaming
from lorafit.atomic import write_dir
from lorafit.models.sources import (
    alias_for,
    default_cache_dir,
    file_sha256,
    hub_id_of,
    is_packaged_torch_file,
    resolve_model_path,
)
from lorafit.quant import pick_backend, quantized_modules
from lorafit.quant.backends import check_scheme, import_libraries_quietly
from lorafit.tuner.config import PEFT_SEQ_CLS_HEADS
from lorafit.tuner.inject import output_head_names

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register_architectures() -> None:
    """Make lorafit's own model classes (vision.py, recommender.py) known to transformers' Auto
    classes, so their folders load like any other."""
    import lorafit.models.recommender as recommender
    import lorafit.models.vision as vision

    PROCESSORS.setdefault(vision.EfficientNetLiteConfig.model_type, vision.image_processor)
    PROCESSORS.setdefault(recommender.RecommenderConfig.model_type, recommender.IdVocabulary.of)


def source_folder(
    path: pathlib.Path, cache_dir: str | os.PathLike | None = None, convert: bool = True
) -> pathlib.Path:
    """The model folder a resolved source reads from: the folder itself, a GGUF's converted cache
    folder (built when `convert`), or a packaged torch file's safetensors copy (always built: it
    takes a second)."""
    if gguf_cache.is_gguf(path):
        folder = gguf_cache.cache_folder(path, cache_dir)
        if convert and not folder.is_dir():
            gguf_cache.convert(path, folder, cache_dir)
        return folder
    if is_packaged_torch_file(path):
        from lorafit.models.vision import convert_packaged, packaged_folder

        root = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        folder = packaged_folder(path, root)
        if not folder.is_dir():
            write_dir(folder, lambda tmp: convert_packaged(path, tmp), keep_existing=True)
        return folder
    return path


def model_config(name: str, cache_dir: str | os.PathLike | None = None):
    """The transformers config of a base model (alias, folder or .gguf) without loading weights;
    a ValueError when it has none that transformers reads."""
    import transformers

    register_architectures()
    path = resolve_model_path(name)
    folder = source_folder(path, cache_dir, convert=False)
    try:
        if folder.is_dir():
            return transformers.AutoConfig.from_pretrained(str(folder))
        return transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{name}: no usable model config ({exc})") from None


def pick_device(preference: str = "auto") -> torch.device:
    """Choose the device: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"unknown device {preference!r}; choose auto, cpu, cuda, cuda:N or mps"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {preference!r} asked for, but this torch sees no CUDA GPU; use cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {preference!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but MPS is not available; use cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            f"unsupported device {preference!r}; choose auto, cpu, cuda, cuda:N or mps"
        )
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


def load_tokenizer(
    name_or_path: str, cache_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer for a model source; a GGUF reuses its converted cache folder if one exists.

    The returned tokenizer always has a pad token (the eos token if the model defines none).
    """
    path = resolve_model_path(name_or_path)
    if gguf_cache.is_gguf(path):
        cached = gguf_cache.cache_folder(path, cache_dir)
        if cached.is_dir():
            return _tokenizer_from(cached)
        return _tokenizer_from(path.parent, gguf_file=path.name)
    return _tokenizer_from(source_folder(path, cache_dir))


PROCESSORS: dict[str, Any] = {}
"""model_type -> a function of the model config returning what reads that model's inputs, for
models that take no text (an image processor, a recommender's id vocabulary): their folders hold
no tokenizer files, and `load_tokenizer` / `load_model` hand this object out instead."""


def _processor_of(folder: pathlib.Path):
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if model_type not in PROCESSORS:
        return None
    from transformers import AutoConfig

    return PROCESSORS[model_type](AutoConfig.from_pretrained(str(folder)))


def _tokenizer_from(folder: pathlib.Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    register_architectures()
    if gguf_file is None and (processor := _processor_of(folder)) is not None:
        return processor
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
            raise ValueError(
                f"tokenizer from {folder} has neither a pad nor an eos token; add a pad token to it"
            )
        # Padding positions are masked out of attention and loss, so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class Head:
    """A model head a task can ask for."""

    auto_class: str  # the transformers Auto class that builds the model with this head
    needs_num_labels: bool = False  # a freshly initialised head sized by the label count


HEADS = {
    "causal-lm": Head("AutoModelForCausalLM"),
    "classification": Head("AutoModelForSequenceClassification", needs_num_labels=True),
    "image-classification": Head("AutoModelForImageClassification", needs_num_labels=True),
    "recommendation": Head("AutoModel"),
}


def load_model(
    name_or_path: str,
    head: str = "causal-lm",
    num_labels: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
    require_tokenizer: bool = True,
    quantize: str = "none",
    quantize_backend: str = "auto",
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase | None]:
    """Load a base model and its tokenizer, in eval mode, on the chosen device and dtype.

    ``head`` is one of :data:`HEADS` (a task names the head it needs); ``classification`` needs
    ``num_labels`` and starts freshly initialised. A GGUF source is converted once into
    ``cache_dir`` (default :func:`default_cache_dir`) and read from there afterwards. Without
    ``require_tokenizer`` a folder with no tokenizer files loads with tokenizer None (merging
    needs only the weights).

    Weights stream in one tensor at a time (`streaming.py`), straight into their final dtype; with
    ``quantize`` ("nf4" or "int8") every linear layer but the head is stored quantized as it is
    read (`lorafit.quant`), computing in bf16 (fp16 on GPUs without bf16) unless ``dtype`` says
    otherwise.
    """
    import_libraries_quietly()  # before transformers imports them with their kernel notices
    import transformers

    # Check the cheap arguments first, so a typo never costs a GGUF conversion.
    if head not in HEADS:
        raise ValueError(f"unknown model head {head!r}; choose one of: {', '.join(HEADS)}")
    if HEADS[head].needs_num_labels and (not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(
            f"a classification head needs num_labels as a positive int, got {num_labels!r}"
        )
    auto_class = getattr(transformers, HEADS[head].auto_class)
    torch_device = pick_device(device)
    quantize = None if quantize in (None, "none") else quantize
    if quantize:
        check_scheme(quantize)
        pick_backend(quantize, torch_device, quantize_backend)
        if dtype == "auto":
            dtype = "bfloat16" if torch_device.type == "cpu" or _cuda_bf16() else "float16"
    torch_dtype = pick_dtype(dtype, torch_device)

    path = resolve_model_path(name_or_path)
    folder = source_folder(path, cache_dir)
    register_architectures()

    try:
        tokenizer = _tokenizer_from(folder)
    except ValueError:
        if require_tokenizer:
            raise
        tokenizer = None
    model = _load_weights(
        auto_class,
        folder,
        torch_dtype,
        torch_device,
        num_labels,
        attn_implementation,
        quantize,
        quantize_backend,
    )
    # Decoder classifiers find the last real token via pad_token_id; without it batches > 1 fail.
    if (
        getattr(model.config, "pad_token_id", 0) is None
        and getattr(tokenizer, "pad_token_id", None) is not None
    ):
        model.config.pad_token_id = tokenizer.pad_token_id
    # Adapter files record name_or_path as base_model_name_or_path: a local folder that loads
    # offline (PEFT, llama.cpp's converters), with the source's identity beside it.
    model.config._name_or_path = str(folder)
    model.name_or_path = str(folder)
    identity = base_identity(name_or_path, path, folder, cache_dir)
    if quantize:  # how the adapter was trained: `lorafit merge` rebuilds that model to compare
        library = quantized_modules(model)[0][1].backend.library
        identity.update(quantize=quantize, quantize_backend=library)
    model.__dict__["lorafit_base"] = identity
    return model.eval(), tokenizer


def _cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _load_weights(
    auto_class, folder, dtype, device, num_labels, attn_implementation, quantize, library
) -> torch.nn.Module:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder}: no usable config.json ({exc})") from None
    if num_labels is not None and config.num_labels != num_labels:
        config.num_labels = num_labels  # a new label set: fresh id2label, a fresh head
    try:
        source = streaming.SafetensorsFolder(folder)
    except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{folder}: the model weights are not a readable safetensors file ({exc}); "
            "re-save or re-download the model"
        ) from None
    try:
        model = streaming.build_empty(auto_class, config, dtype, attn_implementation)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise ValueError(
            f"{folder}: a {config.model_type} model cannot be built as "
            f"{auto_class.__name__}; pick a model made for this task (model.task)"
        ) from None
    heads = output_head_names(model) | {h for h in PEFT_SEQ_CLS_HEADS if hasattr(model, h)}
    missing = streaming.load_streaming(
        model,
        source,
        dtype,
        device,
        quantize,
        library,
        keep_float=lambda path: any(path == h or path.startswith(h + ".") for h in heads),
    )
    if missing:
        fresh = [n for n in missing if not any(n.startswith(h + ".") for h in heads)]
        if fresh:
            raise ValueError(
                f"{folder}: the checkpoint lacks {len(fresh)} weights the model needs "
                f"(e.g. {fresh[0]}); it does not belong to this model class"
            )
        streaming.init_missing(model, device, dtype)  # a fresh classification head
    for buf_owner in model.modules():  # buffers built on the CPU (rotary tables) follow the model
        for name, buf in list(buf_owner._buffers.items()):
            if buf is not None and buf.device != device:
                buf_owner._buffers[name] = buf.to(device)
    return model


def base_identity(
    name_or_path: str, path: pathlib.Path, folder: pathlib.Path, cache_dir=None
) -> dict[str, Any]:
    """What a base model is, for the adapter folder: the name it was asked for, the folder it was
    loaded from, the source file's name and content hash, its hub id when known."""
    alias = alias_for(name_or_path)
    identity: dict[str, Any] = {
        "requested": name_or_path,
        "local_path": str(folder),
        "alias": alias,
    }
    if gguf_cache.is_gguf(path):
        source = gguf_cache.read_source(folder)
        identity.update(
            source_file=source["file"], sha256=source["sha256"], hub_id=source.get("hub_id")
        )
    else:
        weights = folder / "model.safetensors"
        if not weights.is_file():  # sharded: the index names every shard
            weights = folder / "model.safetensors.index.json"
        identity.update(source_file=weights.name, sha256=file_sha256(weights, cache_dir))
    if alias is not None:
        identity["hub_id"] = hub_id_of(alias)
    return identity
