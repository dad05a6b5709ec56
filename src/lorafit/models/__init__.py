"""Base models: where they come from (sources, GGUF cache) and loading them (loading)."""

from lorafit.models.loading import HEADS, load_model, load_tokenizer, pick_device, pick_dtype
from lorafit.models.sources import DEFAULT_MODEL, alias_for, default_cache_dir, resolve_model_path

__all__ = [
    "DEFAULT_MODEL",
    "HEADS",
    "alias_for",
    "default_cache_dir",
    "load_model",
    "load_tokenizer",
    "pick_device",
    "pick_dtype",
    "resolve_model_path",
]
