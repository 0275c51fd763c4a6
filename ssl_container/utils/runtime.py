"""Process-level settings that decide how fast a CPU training step runs.

PyTorch's CPU allocator takes every tensor from the C library (``posix_memalign``) and gives it back
on ``free``. glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
unmaps them on ``free``, and trims the top of the heap back to the kernel once more than 128 KiB of
it is free. A DINO step on CPU allocates gigabytes of activations and gradients (one stage-1 MLP
activation of 8 global crops is 51 MiB) and frees them again at the end of the backward pass, so
the next step faults every page in anew: on the 2-core development VM that was 360,000 page faults
and 1.5-2 s of kernel time in an 8.4 s step. Telling glibc to serve everything from the heap and
never trim it makes the memory of step *n* the memory of step *n+1*: once the heap has settled
(two or three steps) the process takes almost no page faults (measured: 2-8 minor faults per step).

The cost is that the process keeps its high-water mark resident, which a training process reaches
in its first step anyway. The setting is inherited by forked DataLoader workers.

This is the same remedy as preloading jemalloc or tcmalloc (what Intel's PyTorch launcher does), but
needs no library on the machine and no environment variable set before the interpreter starts.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

__all__ = ["retain_freed_memory"]

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt(3): a trim threshold of -1 disables trimming completely.
_NEVER_TRIM = -1

_applied = False


def retain_freed_memory() -> bool:
    """Keep freed memory inside the process (glibc only); returns whether the setting is in force.

    Idempotent. On other C libraries (musl, macOS) it does nothing and returns False: their
    allocators make different choices and have no equivalent switch.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success. M_MMAP_MAX=0: no block is served by its own mmap, so none is
    # unmapped on free; M_TRIM_THRESHOLD: free memory at the top of the heap is kept.
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) != 1:
        log.debug("mallopt refused the allocator settings; freed memory goes back to the kernel")
        return False
    _applied = True
    return True
