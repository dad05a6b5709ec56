"""lorafit: lean LoRA fine-tuning with PEFT-compatible adapters.

The public API is a handful of plain functions on an ordinary transformers model:

    from lorafit import LoraConfig, inject, merge, save_adapter, load_adapter
    report = inject(model, LoraConfig(r=16, target_modules="all-linear"))
"""

from lorafit.tuner.state import (active_adapters, add_weighted_adapter, adapter_names, delete_adapter, disable_adapter,
                       per_sample_adapters, set_active, train_adapter)
from lorafit.tuner.config import LoraConfig
from lorafit.tuner.inject import find_targets, inject, parameter_report, unwrap
from lorafit.tuner.peft_format import AdapterFileError, load_adapter, read_adapter, save_adapter
from lorafit.tuner.layer import LoraLayer, TrainedCopy
from lorafit.tuner.merge import MergeError, merge, merge_and_unload, merged_adapters, unmerge

__version__ = "0.1.0"
__all__ = [
    "LoraConfig", "LoraLayer", "TrainedCopy", "inject", "find_targets", "parameter_report", "unwrap",
    "set_active", "active_adapters", "adapter_names", "disable_adapter", "per_sample_adapters",
    "delete_adapter", "add_weighted_adapter", "train_adapter", "merge", "unmerge", "merge_and_unload",
    "merged_adapters", "MergeError", "save_adapter", "load_adapter", "read_adapter", "AdapterFileError",
]
