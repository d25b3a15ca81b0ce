"""Give freed heap memory back to the operating system, so that a long-lived model process stays flat.

A process that runs a model on inputs of changing shapes (token-budget batches of varying sequence length) frees
and allocates tensors of many sizes. glibc's allocator keeps the freed pages as a high-water mark and, after large
blocks are freed, raises its mmap threshold so that later large tensors come from the heap too; the process's
memory grows for tens of thousands of rows before it levels off (see pytorch/pytorch#27971,
https://github.com/pytorch/pytorch/issues/27971). ``malloc_trim(0)`` returns every whole free page of every arena
(https://man7.org/linux/man-pages/man3/malloc_trim.3.html).

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
    """Return the free pages of the C heap to the OS. True if the platform can (glibc), False where it is a no-op."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
