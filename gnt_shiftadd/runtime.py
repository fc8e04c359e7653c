"""Process-level settings for fast CPU rendering, applied by the entry points (run_nerf.py, benchmarks).

GNT's per-chunk tensors are tens of MB ([rays, samples, views, C] in fp32). glibc serves allocations that large
with fresh mmap()s and unmaps them on free, so every op's output costs thousands of page faults as it is first
written: on the 2-core CI machine that was more than half of a dense GNT frame's time in PyTorch (15.6 s ->
7.0 s per fern frame with the tuning below). Keeping large blocks in the heap (no mmap, no trimming) makes
freed chunks reusable without faults. The price is that the process keeps its peak memory until it exits,
which suits a training or rendering job. Set SHIFTADD_GNT_MALLOC_TUNING=0 to leave the allocator alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_cpu_allocator", "allocator_state"]

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_STATE = {"tuned": False, "reason": "not requested"}


def tune_cpu_allocator() -> dict:
    """Keep large allocations in the glibc heap (Linux only; a no-op elsewhere). Returns allocator_state()."""
    if _STATE["tuned"]:
        return allocator_state()
    if os.environ.get("SHIFTADD_GNT_MALLOC_TUNING", "1") == "0":
        _STATE["reason"] = "disabled by SHIFTADD_GNT_MALLOC_TUNING=0"
    elif not sys.platform.startswith("linux"):
        _STATE["reason"] = f"not glibc ({sys.platform})"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
            _STATE.update(tuned=ok, reason="mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)" if ok else
                          "mallopt refused the settings")
        except (OSError, AttributeError) as error:  # musl or an unusual libc: keep the defaults
            _STATE["reason"] = f"mallopt unavailable ({error})"
    return allocator_state()


def allocator_state() -> dict:
    """{"tuned": bool, "reason": str}: recorded with benchmark results."""
    return dict(_STATE)
