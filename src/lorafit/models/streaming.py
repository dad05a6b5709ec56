"""Load weights one tensor at a time into their final form: bf16/fp16/fp32, or quantized.

The model is first built with its parameters on the meta device (no memory), then each checkpoint
tensor is read, converted and put in place before the next is read. Peak memory is therefore the
final model plus one tensor in flight, instead of a full-precision copy of the whole model.

Reading does not go through safetensors' memory map: mapped pages stay resident (and count in the
process's RSS) until the file is closed, so reading a whole file through one map would hold the
whole file. `SafetensorsFolder` reads each tensor with plain file reads, in row chunks, straight
into its converted target (the safetensors layout, a JSON header then raw little-endian bytes, is
a documented format: https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lorafit.models.heap import cap_mmap_threshold, return_freed_memory
from lorafit.quant import QuantizedLinear, pick_backend, quantizable

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CHUNK_BYTES = 64 << 20  # read at most this much raw data at a time


class SafetensorsFolder:
    """The tensors of a folder's model.safetensors (or its shards), read one at a time."""

    def __init__(self, folder: pathlib.Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [folder / s for s in shards]
        else:
            files = [folder / "model.safetensors"]
        self.entries: dict[str, tuple[pathlib.Path, int, dict]] = {}
        for path in files:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    self.entries[name] = (path, 8 + size, entry)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][2]["shape"])

    def read(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """The tensor converted to `dtype` (None: as stored), read in chunks of rows."""
        path, base, entry = self.entries[name]
        if entry["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        stored = _ST_DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        start, end = entry["data_offsets"]
        out = torch.empty(shape, dtype=dtype if stored.is_floating_point and dtype else stored)
        flat = out.view(-1) if out.dim() else out.view(1)
        item = torch.empty((), dtype=stored).element_size()
        per_chunk = max(1, _CHUNK_BYTES // item)
        with open(path, "rb") as f:
            f.seek(base + start)
            done = 0
            while done < flat.numel():
                n = min(per_chunk, flat.numel() - done)
                raw = bytearray(n * item)
                if f.readinto(raw) != len(raw):
                    raise ValueError(f"{path}: the file ends inside tensor {name}; it is truncated")
                flat[done : done + n].copy_(torch.frombuffer(raw, dtype=stored))
                done += n
        if (end - start) != flat.numel() * item:
            raise ValueError(f"{path}: tensor {name} has a size that does not match its shape")
        return out


def build_empty(auto_class, config, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """The model with every parameter on the meta device (buffers such as rotary tables real)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return auto_class.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def _checkpoint_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """checkpoint name -> model name, allowing for the base model prefix ("bert.", "model.")."""
    wanted = set(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", "")
    mapping = {}
    for name in names:
        for candidate in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if candidate in wanted:
                mapping[name] = candidate
                break
    return mapping


def load_streaming(
    model: nn.Module,
    source: SafetensorsFolder,
    dtype: torch.dtype,
    device: torch.device,
    quantize: str | None = None,
    library: str = "auto",
    keep_float: Callable[[str], bool] = lambda path: False,
) -> list[str]:
    """Fill the meta model from `source`, one tensor at a time; returns the model's names that the
    checkpoint did not hold (tied weights are tied afterwards). With `quantize`, every nn.Linear
    weight whose module path `keep_float` rejects becomes a QuantizedLinear as it is read."""
    if quantize:
        pick_backend(quantize, device, library)  # fail before reading anything
    cap_mmap_threshold()
    mapping = _checkpoint_names(model, source.keys())
    quantized: set[str] = set()
    for ckpt_name, name in mapping.items():
        path, _, leaf = name.rpartition(".")
        module = model.get_submodule(path) if path else model
        current = getattr(module, leaf)
        if tuple(source.shape(ckpt_name)) != tuple(current.shape):
            if keep_float(path):  # a head of another size (new labels): it starts fresh
                continue
            raise ValueError(
                f"{ckpt_name}: the checkpoint's tensor is {tuple(source.shape(ckpt_name))} but "
                f"the model needs {tuple(current.shape)}; the folder's config.json does not "
                "describe its weights"
            )
        to_quantize = quantize and quantizable(module) and leaf == "weight" and not keep_float(path)
        if isinstance(current, torch.Tensor) and not current.is_floating_point():
            tensor = source.read(ckpt_name, None).to(device)
        else:  # a weight to quantize is read in fp32: QuantizedLinear quantizes from fp32
            tensor = source.read(ckpt_name, torch.float32 if to_quantize else dtype).to(device)
        if to_quantize:
            bias = module.bias if module.bias is not None and not module.bias.is_meta else None
            q = QuantizedLinear.quantize(tensor, bias, quantize, device, library, dtype)
            _set_module(model, path, q)
            quantized.add(path)
            del tensor
            return_freed_memory()  # the fp32 read buffer and the quantizer's temporaries
            continue
        if path in quantized and leaf == "bias":
            module.bias = nn.Parameter(tensor, requires_grad=False)
            continue
        if leaf in module._buffers:
            module._buffers[leaf] = tensor
        else:
            module._parameters[leaf] = nn.Parameter(
                tensor, requires_grad=tensor.is_floating_point()
            )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def init_missing(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Materialise and initialise the parameters the checkpoint did not hold (a fresh head), with
    the model's own init."""
    for module in model.modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.is_meta]
        if not own:
            continue
        module.to_empty(device=device, recurse=False)
        for n in own:
            p = getattr(module, n)
            if p.is_floating_point() and p.dtype != dtype:
                setattr(module, n, nn.Parameter(p.data.to(dtype)))
        if hasattr(model, "_init_weights"):
            model._init_weights(module)
