"""Process-wide settings the entry points apply before JAX starts its backend.

XLA CPU allocates each step's scratch buffer (about 1 GB for a mid-size ViT3D
step) on a worker thread. glibc serves an allocation that large from a fresh
``mmap`` and unmaps it on free, so every step faults in and zeroes that memory
again: 0.5 to 1.5 CPU-seconds of kernel time per step on a 2-core machine.
``keep_freed_memory`` makes glibc serve everything from the main heap (one arena,
no ``mmap``) and never return freed memory to the system, so the buffer of the
previous step is reused. The process then holds on to its peak heap, which a
training process reaches in its first step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_INT_MAX = 2**31 - 1

_applied = False


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory mapped for reuse; True where it took effect.

    Call it before the first JAX computation: threads that already own a malloc
    arena keep it. A no-op (False) where the C library has no glibc ``mallopt``
    (macOS, musl).
    """
    global _applied
    if _applied:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; all three are needed: a second arena would mmap large blocks regardless.
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)))
    return _applied
