"""glibc's allocator settings of common/allocator.py, observed in a fresh process each."""
import subprocess
import sys

import pytest

from gapaware.common.allocator import MMAP_THRESHOLD_MAX, keep_freed_memory

# Four threads each allocate a small block (served from a heap, not mapped) and wait until all
# have, so that none inherits the heap of one that ended; glibc's malloc_stats() then lists one
# "Arena N:" section per heap on stderr.
_THREADS_ALLOCATE = """
import ctypes, sys, threading
from gapaware.common.allocator import use_one_heap
if sys.argv[1] == "one":
    assert use_one_heap()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
barrier = threading.Barrier(4)
def allocate():
    assert libc.malloc(1024)
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc.malloc_stats()
"""


def heaps(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _THREADS_ALLOCATE, mode], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_threads_share_one_heap_after_use_one_heap():
    assert heaps("default") > 1  # without it, glibc gives new threads heaps of their own
    assert heaps("one") == 1


@pytest.mark.parametrize("below", [0, -1, MMAP_THRESHOLD_MAX + 1])
def test_keep_freed_memory_refuses_a_threshold_glibc_cannot_take(below):
    with pytest.raises(ValueError, match="Invalid threshold"):
        keep_freed_memory(below)
