"""Keep freed memory in the process (glibc): no page-fault storm in CPU training and testing.

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above its mmap threshold (at most
32 MB) with a fresh ``mmap`` and returns it with ``munmap`` on free, and it trims the heap's free top
beyond 128 KB. A training step allocates and frees the same large activations every time (ResNet
layer3 maps, the decoders' Winograd tiles of ~40 MB each), so each step maps, zero-fills page by page
and unmaps them again: measured on the 2-core machine, 4-5 s of system time per ResNet-101 QAMP step
(of ~15 s) without this, ~0 s with it (see docs/BENCHMARKS.md).

``keep_freed_memory()`` asks glibc to serve every allocation from the heap (``M_MMAP_MAX = 0``) and
to trim only above ``TRIM_THRESHOLD_BYTES``, so freed blocks are reused by the next step. The peak
resident memory stays what the step needs; it is not returned to the system until the process ends.
Config key ``keep_freed_memory`` (default True) in train.py / test.py.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest value mallopt takes (an int): trim almost never


def keep_freed_memory() -> bool:
    """Tune glibc malloc as described above; returns False (and changes nothing) without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
