"""Process settings that make the task-batched layers fast on CPU.

The LSTM node allocates buffers of tens of MB per layer call (every step's gates, the gate gradients).
With glibc's defaults such blocks are often returned to the OS when freed and page-fault back in on the
next call: measured here at 6-8 ms per 31 MB buffer, 10-25 % of a meta-step. PyTorch's CPU performance
guide answers this with jemalloc or tcmalloc; glibc can do the same with two settings, so nothing has to
be preloaded. Each process that meta-trains, adapts or benchmarks calls ``retain_freed_memory`` once.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def retain_freed_memory() -> bool:
    """Serve large blocks from the heap and never trim it, so freed tensor memory is reused in place
    (the same as starting with ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483648``).

    Process-wide; the resident size then stays at its high-water mark. Returns False where there is no
    glibc ``mallopt`` (macOS, musl): nothing changes there.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 31) == 1
    except (OSError, AttributeError):
        log.debug("no glibc mallopt: freed memory is left to the system allocator")
        return False
