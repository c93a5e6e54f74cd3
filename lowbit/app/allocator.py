"""The process's memory allocator, set for tensors: what the ``lowbit`` command does before it works."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_freed_tensors(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes and more by mmap, a fixed threshold (glibc only; True if set).

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed; from then on tensors come
    from the heap, which keeps what they free. Fine-tuning SmolLM2-135M (4 x 256 tokens) grew to 2.9 GB peak RSS
    over 3 steps that way and to 1.6 GB with this, but each step took about 1.4x as long (every large tensor is
    a fresh mapping to fault in; 2026-12-02). A trade for the process to choose, not a default: users set
    MALLOC_MMAP_THRESHOLD_=1048576 in the environment, benchmarks pass --mmap-threshold.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
