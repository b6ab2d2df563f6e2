"""Benchmarks that print ratios measured side by side in one run (``make bench``).

Like the ``gapaware`` commands, every benchmark process (and the RPC peer's processes, forked
from it) allocates big tensors on huge pages: set before torch allocates anything.
"""
from gapaware.common.allocator import enable_huge_pages

enable_huge_pages()
