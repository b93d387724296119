"""How the process's heap treats the memory torch frees on the CPU (Linux, glibc).

glibc serves a large tensor from ``mmap`` and unmaps it when it is freed, so every training step faults its
large tensors' pages in again (zeroed by the kernel), and it keeps smaller freed blocks in the heap, so after a
step the resident set stays at the step's peak. Two things follow (docs/BENCHMARKS.md, "Speed, part 4"):

- ``keep_freed_memory(True)`` (``train.cpu_keep_freed_memory``): no ``mmap`` and no trimming, so a step reuses
  the heap the previous one left: SD1.5 architecture, 512 px, bf16: about 8% less CPU time a step, the steps'
  RSS level instead of growing.
- ``release_free_memory()``: hand the freed pages back before work of another shape (a sample grid: loading the
  VAE, decoding at full resolution), which would otherwise grow the resident set beyond the steps' own peak.
  ``lean_heap()`` does that and, for its block, puts glibc's default behaviour back.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}  # glibc's
_KEEP = {M_TRIM_THRESHOLD: 2**31 - 1, M_MMAP_MAX: 0}

_libc = None
_keeping = False


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
                lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                _libc = lib
            except (OSError, AttributeError):  # musl and others have no malloc_trim / mallopt
                _libc = False
    return _libc or None


def release_free_memory(collect: bool = True) -> bool:
    """Collect garbage (``collect``) and hand free heap pages back to the OS (glibc ``malloc_trim``); False
    where there is no glibc (macOS, musl), where only the garbage collection is done."""
    if collect:
        gc.collect()
    lib = _glibc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True


def keep_freed_memory(on: bool) -> bool:
    """``True``: glibc serves every block from the heap and never trims it, so freed memory is reused without
    page faults; ``False``: glibc's defaults (fixed thresholds). False where there is no glibc (nothing done)."""
    global _keeping
    lib = _glibc()
    if lib is None:
        return False
    for param, value in (_KEEP if on else _DEFAULTS).items():
        lib.mallopt(param, value)
    _keeping = on
    return True


def keeping_freed_memory() -> bool:
    return _keeping


@contextlib.contextmanager
def lean_heap() -> Iterator[None]:
    """For the block: the freed heap handed back first and glibc's default behaviour, so work of another shape
    than the training steps (a sample grid) does not grow the resident set; the previous mode after."""
    was = _keeping
    if was:
        keep_freed_memory(False)
    release_free_memory()
    try:
        yield
    finally:
        if was:
            release_free_memory()
            keep_freed_memory(True)
