"""The process's glibc heap: how large blocks are served, and handing freed memory back.

glibc keeps memory freed into its heap (below its mmap threshold) resident for reuse; the OS gets
it back only from the heap's top or through malloc_trim. Every call here is a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 8 << 20
KEEP_MMAP_THRESHOLD_BYTES = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit
KEEP_TRIM_THRESHOLD_BYTES = 64 << 20
DEFAULT_TRIM_THRESHOLD_BYTES = 128 << 10  # glibc's
_mode = "default"  # what lorafit last asked for: "default" | "capped" | "keep"


def mode() -> str:
    """What lorafit last asked of glibc: "default" (nothing), "capped" (`cap_mmap_threshold`) or
    "keep" (`keep_large_blocks`)."""
    return _mode


def cap_mmap_threshold() -> None:
    """Serve blocks of 8 MiB and more from mmap for the rest of the process, so their memory goes
    back to the OS when freed. glibc's own threshold climbs to 32 MiB after the first large frees;
    the heap then keeps dequantized weights and activations resident between uses (the 1.7B NF4
    run of benchmarks/qlora.py peaked at 2.57 GB instead of 2.36-2.40 GB, with no step-time
    difference; a 1 MiB threshold peaks at 2.03 GB but steps run 1.5-1.9x slower). Ends
    `keep_large_blocks` (glibc's trim threshold back to its default). A user's own
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ is left alone."""
    global _mode
    if _mode == "capped" or _LIBC is None:
        return
    _set(M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD_BYTES)
    if _mode == "keep":
        _set(M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", DEFAULT_TRIM_THRESHOLD_BYTES)
    _mode = "capped"


def keep_large_blocks(on: bool = True) -> None:
    """Keep freed blocks of up to 32 MiB in the heap for reuse, and up to 64 MiB free at its top,
    until `keep_large_blocks(False)` (back to the cap) or `cap_mmap_threshold`.

    For training steps whose activations come in blocks of 8 MiB or more: served from fresh mmaps,
    every such block faults its pages in on each use, ~1 us per 4 KiB page on the benchmark
    machine -- ~0.47 GB of faults per step for SmolLM2 at 4 x 1,024 tokens, where keeping them gave
    1.14-1.22x the tokens/s (benchmarks/peft_vs_lorafit.py vs its "8 MiB mmap cap" row). The cost:
    freed activations stay resident between steps (`return_freed_memory` hands them back) and the
    heap's fragmentation (peak RSS +4-6% there). A user's own glibc settings are left alone."""
    global _mode
    if _LIBC is None or (_mode == "keep") == on:
        return
    if not on:
        cap_mmap_threshold()
        return
    _set(M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", KEEP_MMAP_THRESHOLD_BYTES)
    _set(M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", KEEP_TRIM_THRESHOLD_BYTES)
    _mode = "keep"


def _set(param: int, env: str, value: int) -> None:
    if env not in os.environ:
        _LIBC.mallopt(param, value)


def return_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc's malloc_trim: whole free pages anywhere
    in the heap). Worth a call where a phase that freed much memory is followed by one of another
    shape: after a quantized weight's fp32 read buffer, before an evaluation (a training step's
    activations, ~500 MB for SmolLM2 on short examples, stay resident in the heap otherwise, and
    the evaluation's logits come on top of them), at the end of training."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
