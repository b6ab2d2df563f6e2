"""Memory the transfers touch: huge pages for big tensors, and freed buffers kept (glibc only).

Moving a model means writing into fresh model-sized buffers on every step (the received
tensor, the server's copy of θ it sends). Each first touch of a 4 KiB page is a page fault
plus zeroing, which on a 100 MiB tensor costs as much as the transfer. :func:`enable_huge_pages`
asks torch's CPU allocator for transparent huge pages on buffers of 2 MiB and more
(``THP_MEM_ALLOC_ENABLE``, read once, at torch's first allocation): 512 times fewer faults.
On this 2-core machine it raised a 100 MiB pull from 0.44 to 0.79 GB/s (bench/transport.py).

:func:`keep_freed_memory` is the other half, for blocks below 32 MiB:

Every step allocates and frees tensors and wire frames of megabytes. glibc's defaults return a
freed block above 128 KiB to the kernel (``munmap``, or trimming the heap), so the next step's
allocation of the same size page-faults through fresh zeroed pages again: on big transfers that
costs more than the copy itself. Raising the mmap threshold to its maximum (32 MiB on 64-bit) and
the trim threshold out of reach makes such blocks come from and go back to the heap. The cost is
that the process keeps its high-water mark of heap memory. The environment variables
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` do the same for a whole process tree.
``gapaware worker`` calls this at start. ``gapaware server`` keeps only blocks up to gRPC's
largest message (``below``): the megabyte wire frames of gRPC and the codec, which on a 1 MiB
push-and-pull cut its CPU per call from 5.0-5.8 to 3.9-4.0 ms. Its model-sized tensors are reused
explicitly (:mod:`gapaware.server.sent`), and a freed one goes back to the kernel instead of
staying in the server's memory for good (the task's own parameters, for one).

:func:`use_one_heap` makes that kept memory shared. glibc gives each new thread a heap (an
"arena") of its own, up to eight per core, and each keeps its own freed blocks: the server's gRPC
threads, which receive the frames, and its event loop, which builds the replies, each held their
own high-water mark of megabyte frames. With one heap for all threads, a burst of 16 workers
pushing a 25 MiB model peaked at 13.8-19.9 model sizes above the runtime in twenty runs, against
16.8-21.0 in four runs alternated with the first four of them (bench/memory.py); round trips were
the same within the noise (1 MiB with 4 and 16 workers, 25 MiB with 4, bench/scale.py's 256
clients). ``gapaware server`` calls it at start; ``MALLOC_ARENA_MAX=1`` does the same for a whole
process tree.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): 2 GiB

log = logging.getLogger("gapaware.allocator")

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def enable_huge_pages() -> None:
    """Turns on torch's huge-page allocation unless the environment already decides it; call it
    before torch allocates anything (before ``import torch``), so the ``gapaware`` commands call it
    first. Child processes inherit it."""
    os.environ.setdefault(HUGE_PAGES_ENV, "1")


def keep_freed_memory(below: int = MMAP_THRESHOLD_MAX) -> bool:
    """Sets glibc's thresholds as described above, for blocks smaller than ``below`` bytes (at most
    32 MiB): bigger ones are mapped and unmapped as usual. False (and nothing changed) without glibc."""
    if not 0 < below <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"Invalid threshold: {below} (1 to {MMAP_THRESHOLD_MAX} bytes)")
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, below)) \
        and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def use_one_heap() -> bool:
    """Makes every thread allocate from glibc's main heap, as described above. Call it before the
    process starts threads: a thread that has allocated keeps the heap it got. False (and nothing
    changed) without glibc."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, 1))


@functools.cache
def _mallopt():
    """glibc's ``mallopt``, or None where the C library is not glibc. Looked up once: finding the C
    library runs ``ldconfig``, and ``gapaware server`` sets two options at start."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no glibc mallopt: allocator left as it is")
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
