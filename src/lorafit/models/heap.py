"""The process's glibc heap: how large blocks are served, and handing freed memory back.

glibc keeps memory freed into its heap (below its mmap threshold) resident for reuse; the OS gets
it back only from the heap's top or through malloc_trim. Both calls here are no-ops off glibc.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 8 << 20
_capped = False


def cap_mmap_threshold() -> None:
    """Serve blocks of 8 MiB and more from mmap for the rest of the process, so their memory goes
    back to the OS when freed. glibc's own threshold climbs to 32 MiB after the first large frees;
    the heap then keeps dequantized weights and activations resident between uses (the 1.7B NF4
    run of benchmarks/qlora.py peaked at 2.57 GB instead of 2.36-2.40 GB, with no step-time
    difference; a 1 MiB threshold peaks at 2.03 GB but steps run 1.5-1.9x slower). A user's own
    MALLOC_MMAP_THRESHOLD_ is left alone."""
    global _capped
    if _capped or _LIBC is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    _capped = True


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
