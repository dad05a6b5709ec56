"""lorafit: lean LoRA fine-tuning with PEFT-compatible adapters.

The public API is a handful of plain functions on an ordinary transformers model:

    from lorafit import LoraConfig, inject, merge, save_adapter, load_adapter
    report = inject(model, LoraConfig(r=16, target_modules="all-linear"))
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below, for type checkers; at run time they load on first use
    from lorafit.tuner import (
        AdapterFileError,
        LoraConfig,
        LoraLayer,
        MergeError,
        TrainedCopy,
        active_adapters,
        adapter_names,
        adapter_rows,
        add_weighted_adapter,
        delete_adapter,
        disable_adapter,
        find_targets,
        forward_with_adapters,
        inject,
        load_adapter,
        merge,
        merge_and_unload,
        merged_adapters,
        parameter_report,
        per_sample_adapters,
        read_adapter,
        save_adapter,
        set_active,
        train_adapter,
        unmerge,
        unwrap,
    )

__version__ = "0.1.0"
__all__ = [
    "LoraConfig",
    "LoraLayer",
    "TrainedCopy",
    "inject",
    "find_targets",
    "parameter_report",
    "unwrap",
    "set_active",
    "active_adapters",
    "adapter_names",
    "disable_adapter",
    "per_sample_adapters",
    "forward_with_adapters",
    "adapter_rows",
    "delete_adapter",
    "add_weighted_adapter",
    "train_adapter",
    "merge",
    "unmerge",
    "merge_and_unload",
    "merged_adapters",
    "MergeError",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "AdapterFileError",
]


def __getattr__(name: str):
    """The public API loads on first use (PEP 562), so `import lorafit.cli` runs the command's own
    imports first (cli/lean_imports.py) instead of the LoRA core's, which import transformers."""
    if name in __all__:
        import lorafit.tuner

        value = getattr(lorafit.tuner, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorafit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
