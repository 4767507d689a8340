"""glibc malloc settings for a process that runs the model on CPU: keep freed memory for the next step instead of
handing it back to the kernel.

A CPU step allocates and frees tensors of megabytes (a prefill's [tokens * top-k, hidden] expert rows, the
decode-attention gathers). glibc serves blocks that size with fresh mmap()s, or trims its heap once they are
freed, so a step faults many of its pages in again; with these settings freed blocks serve the next
allocations (tests/worker/test_allocator.py counts page faults on malloc'd blocks; the engine's gain is in
bench/RESULTS.md). PyTorch's CPU tuning guide suggests preloading jemalloc or tcmalloc for the same reason; this
needs nothing preloaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it (HEAP_MAX_SIZE / 2 on 64-bit): larger blocks are still mapped
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top that glibc keeps before returning any


def keep_freed_memory() -> bool:
    """Applies the settings to this process; False where the C library is not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        log.info("no glibc mallopt here: the allocator keeps its defaults")
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
