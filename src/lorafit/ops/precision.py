"""Which arithmetic a run uses: bf16 autocast where the hardware does it natively, else fp32."""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

PRECISIONS = ("auto", "fp32", "bf16")
"""What a run may ask for (train.precision); 'auto' resolves to fp32 or bf16 per device."""


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run faster than fp32 (elsewhere they are emulated, slower)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(choice: str, device: torch.device) -> str:
    """'auto' | 'fp32' | 'bf16' -> 'fp32' or 'bf16' for this device."""
    if choice not in PRECISIONS:
        choices = ", ".join(PRECISIONS[:-1]) + " or " + PRECISIONS[-1]
        raise ValueError(f"precision must be {choices}, got {choice!r}")
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
