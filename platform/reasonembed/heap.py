"""Give freed heap memory back to the operating system, so that a long-lived model process stays flat.

A process that runs a model on inputs of changing shapes (token-budget batches of varying sequence length) frees
and allocates tensors of many sizes. glibc's allocator keeps the freed pages as a high-water mark and, after large
blocks are freed, raises its mmap threshold so that later large tensors come from the heap too; the process's
memory grows for tens of thousands of rows before it levels off (see pytorch/pytorch#27971,
https://github.com/pytorch/pytorch/issues/27971). ``malloc_trim(0)`` returns every whole free page of every arena
(https://man7.org/linux/man-pages/man3/malloc_trim.3.html).

Reused Ray task workers grow the same way: the staging task of the encode job (read, parse, hash and write one
corpus file) ran in a worker that reached 949 MB after 30 files and 1,192 MB after 100 before it trimmed.

Measured here (docs/scale.md, "The embedding actor's memory"): the tiny scale-bench encoder over 60k rows in
1,024-row windows grew 520 -> 600-715 MB private memory without trimming and stayed at 464-474 MB with a trim after
every window, at a cost of about 10 % in its time (a model that small spends little time per window; a real model
spends far more, so the share is smaller).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _resolve_trim():
    """libc's ``malloc_trim``, or None where there is none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    fn = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_MALLOC_TRIM = _resolve_trim()


def trim_heap() -> bool:
    """Return the free pages of the C heap to the OS, and ask Arrow's memory pool (mimalloc or jemalloc, apart from
    the C heap) to do the same (``pyarrow.MemoryPool.release_unused``). True if the C heap could be trimmed (glibc),
    False where that part is a no-op."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
