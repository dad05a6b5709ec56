"""The LoRA tuner: layers, base-layer kinds, variants, injection, adapter state, merge, PEFT files.

Lowest first: config, kinds/, variants/, rows -> layer, trained_copy -> state -> inject -> merge,
peft_format. This package re-exports the public API; `lorafit` re-exports it again.
"""

from lorafit.tuner.config import LoraConfig
from lorafit.tuner.inject import ParamReport, find_targets, inject, parameter_report
from lorafit.tuner.kinds import LayerKind, kind_of, register_kind
from lorafit.tuner.layer import LoraAdapter, LoraLayer
from lorafit.tuner.merge import (
    MergeError,
    dequantize_base,
    merge,
    merge_and_unload,
    merged_adapters,
    unmerge,
)
from lorafit.tuner.peft_format import (
    PEFT_FORMAT_VERSION,
    AdapterFileError,
    adapter_state_dict,
    describe_adapter,
    load_adapter,
    read_adapter,
    save_adapter,
)
from lorafit.tuner.state import (
    active_adapters,
    adapter_configs,
    adapter_names,
    adapter_rows,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    forward_with_adapters,
    per_sample_adapters,
    set_active,
    train_adapter,
    unwrap,
)
from lorafit.tuner.trained_copy import TrainedCopy
from lorafit.tuner.variants import Variant, register_variant

__all__ = [
    "PEFT_FORMAT_VERSION",
    "AdapterFileError",
    "LayerKind",
    "LoraAdapter",
    "LoraConfig",
    "LoraLayer",
    "MergeError",
    "ParamReport",
    "TrainedCopy",
    "Variant",
    "active_adapters",
    "adapter_configs",
    "adapter_names",
    "adapter_rows",
    "adapter_state_dict",
    "add_weighted_adapter",
    "delete_adapter",
    "dequantize_base",
    "describe_adapter",
    "disable_adapter",
    "find_targets",
    "forward_with_adapters",
    "inject",
    "kind_of",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "merged_adapters",
    "parameter_report",
    "per_sample_adapters",
    "read_adapter",
    "register_kind",
    "register_variant",
    "save_adapter",
    "set_active",
    "train_adapter",
    "unmerge",
    "unwrap",
]
