"""Keep freed buffers in the process instead of handing them back to the kernel (glibc only).

Every step allocates and frees tensors and wire frames of megabytes. glibc's defaults return a
freed block above 128 KiB to the kernel (``munmap``, or trimming the heap), so the next step's
allocation of the same size page-faults through fresh zeroed pages again: on big transfers that
costs more than the copy itself. Raising the mmap threshold to its maximum (32 MiB on 64-bit) and
the trim threshold out of reach makes such blocks come from and go back to the heap. The cost is
that the process keeps its high-water mark of heap memory. The environment variables
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` do the same for a whole process tree;
``gapaware worker`` calls this at start. The server does not: there, with many workers pushing
at once, the retained blocks raised the peak RSS (bench/memory.py: 46 instead of 36 model
sizes above the runtime with 16 workers of 25 MiB).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): 2 GiB

log = logging.getLogger("gapaware.allocator")


def keep_freed_memory() -> bool:
    """Sets glibc's thresholds as described above; False (and nothing changed) without glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no glibc mallopt: allocator left as it is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
