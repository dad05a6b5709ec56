"""Quantization backends: the libraries that store a frozen weight quantized and dequantize it.

A *scheme* is what the user asks for (`nf4`, `int8`); a *backend* is the library that implements
it (bitsandbytes, torchao). Which backend a device gets by default is `PREFERRED`, filled in from
`benchmarks/quant_backends.py` (forward + backward of a 2048 x 8192 projection at T=512, bf16):

    scheme  device  backend        f+b vs bf16 (dequantize)      runner-up
    nf4     cpu     bitsandbytes   1.9x (14 ms)                  torchao 10.3x (179 ms)
    int8    cpu     torchao        1.9x (27 ms; fused forward)   bitsandbytes 2.3x (22 ms)

(2-core AMX CPU, 7 interleaved rounds, medians; bf16 reference 46 ms.) In a whole training step
the other work (attention, norms, the loss, the optimizer) dilutes these ratios: see
benchmarks/qlora.py.

On CUDA nothing has been measured here yet (no GPU lent); bitsandbytes (CUDA kernels for NF4) and
torchao (int8) are the choices the anchors use, and `model.quantize_backend` overrides either.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType
from typing import Any

import torch

Storage = dict[str, Any]
"""A quantized weight: tensors (registered as buffers of the module, so `.to(device)` moves them)
and plain values (shapes, block sizes)."""


# On import, torchao logs each optional CUDA kernel library a CPU build cannot load, torch logs a
# deprecation for torchao's enum registrations, and bitsandbytes logs that a kernel it would fetch
# from the Hub is absent. None of these kernels is one lorafit uses; the lines only alarm users.
_NOISY_LOGGERS = ("torchao", "bitsandbytes", "kernels", "torch.utils._pytree")


def quiet_import(name: str) -> ModuleType:
    """Import a quantization library's module with its import-time kernel notices silenced."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def import_libraries_quietly() -> None:
    """Import transformers' model code with the quantization libraries' notices silenced:
    transformers imports torchao by itself when it is installed, which would print its kernel
    notices. (The `lorafit` command has already imported that code without torchao:
    cli/lean_imports.py; this is then a no-op.) bitsandbytes is not among them: its backends import
    it (quietly) when used, so a run without it does not carry its ~50 MB."""
    quiet_import("transformers.modeling_utils")


class Backend:
    """One library's implementation of one scheme. Subclasses set the attributes and implement
    `quantize` and `dequantize`; `linear` has a generic form (dequantize, then matmul)."""

    scheme: str = ""
    """The scheme implemented: 'nf4' or 'int8'."""
    library: str = ""
    """The Python package that does the work (also the name users pick it by)."""
    devices: tuple[str, ...] = ("cpu", "cuda")
    """Device types it runs on."""

    def available(self) -> bool:
        return importlib.util.find_spec(self.library) is not None

    def quantize(self, w: torch.Tensor) -> Storage:
        """Quantize an (out, in) float weight."""
        raise NotImplementedError

    def dequantize(self, storage: Storage, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) weight in `dtype`."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, storage: Storage, dtype: torch.dtype) -> torch.Tensor:
        """x W^T for x already in `dtype` (..., in) -> (..., out)."""
        return torch.nn.functional.linear(x, self.dequantize(storage, dtype))

    def __repr__(self) -> str:
        return f"<{self.scheme} backend {self.library}>"


SCHEMES = ("nf4", "int8")
"""Quantization schemes for frozen linear weights (`model.quantize`, besides 'none')."""

PREFERRED = {
    ("nf4", "cpu"): "bitsandbytes",
    ("nf4", "cuda"): "bitsandbytes",
    ("int8", "cpu"): "torchao",
    ("int8", "cuda"): "torchao",
}
"""The default backend per (scheme, device type): the faster one in benchmarks/quant_backends.py
on CPU; on CUDA the anchors' choice until a GPU run measures it."""

_BACKENDS: dict[tuple[str, str], Backend] = {}


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[(backend.scheme, backend.library)] = backend
    return backend


def backends_for(scheme: str) -> list[Backend]:
    return [b for (s, _), b in _BACKENDS.items() if s == scheme]


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose none, {', '.join(SCHEMES)}")


def pick_backend(scheme: str, device: torch.device | str, library: str = "auto") -> Backend:
    """The backend for `scheme` on `device`: `library` if given, else the measured default."""
    check_scheme(scheme)
    device_type = torch.device(device).type
    choices = {b.library: b for b in backends_for(scheme)}
    if library == "auto":
        library = PREFERRED.get((scheme, device_type), "")
        if library not in choices or not choices[library].available():
            usable = [b for b in choices.values() if b.available() and device_type in b.devices]
            if not usable:
                raise ValueError(
                    f"{scheme} quantization on {device_type} needs one of "
                    f"{', '.join(sorted(choices))}; pip install {' or '.join(sorted(choices))}"
                )
            library = usable[0].library
    if library not in choices:
        raise ValueError(
            f"unknown quantization backend {library!r} for {scheme}; "
            f"choose auto, {', '.join(sorted(choices))}"
        )
    backend = choices[library]
    if device_type not in backend.devices:
        raise ValueError(
            f"{scheme} with {library} does not run on {device_type}; "
            f"use device {' or '.join(backend.devices)}, or another backend"
        )
    if not backend.available():
        raise ValueError(
            f"{scheme} with {library} needs the {library} package: pip install {library}"
        )
    return backend
