"""Process-level settings for fast CPU rendering, applied by the entry points (run_nerf.py, benchmarks).

GNT's per-chunk tensors are tens of MB ([rays, samples, views, C] in fp32). glibc serves allocations that large
with fresh mmap()s and unmaps them on free, so every op's output costs thousands of page faults as it is first
written: on the 2-core CI machine that was more than half of a dense GNT frame's time in PyTorch (15.6 s ->
7.0 s per fern frame with the tuning below). Keeping large blocks in the heap (no mmap, no trimming) makes
freed chunks reusable without faults. The price is that the process keeps its peak memory until it exits,
which suits a training or rendering job. Set SHIFTADD_GNT_MALLOC_TUNING=0 to leave the allocator alone.

OpenMP waiting (`quiet_openmp_workers`): PyTorch's CPU ops run on GNU OpenMP, whose idle workers spin for a while
after every parallel region; the TVM kernels run on TVM's own thread pool. With as many threads as cores, a kernel
launched right after a PyTorch op shares its cores with spinning OpenMP workers: on the 2-core CI machine that
made a kernel-backed fern frame 1.4-1.5x slower (results/thread_policy_cpu.json). libgomp reads its policy once,
when torch is imported, so the entry points that render on the kernels set OMP_WAIT_POLICY=PASSIVE before they
import torch (a policy the user set is kept).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_cpu_allocator", "allocator_state", "quiet_openmp_workers", "openmp_policy", "OPENMP_VARIABLES"]

OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

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


def quiet_openmp_workers(environ=os.environ, keep_default: bool = False) -> str:
    """Before torch is imported: let idle OpenMP workers sleep at once (OMP_WAIT_POLICY=PASSIVE) so that they do
    not spin on the cores the TVM kernels run on. Returns what was done; never overrides a policy already set,
    and says so when torch (hence libgomp, which reads the variable once) is already loaded. keep_default: do
    nothing (a benchmark's --openmp-default, for comparison)."""
    if keep_default:
        return "kept libgomp's default (--openmp-default)"
    if any(name in environ for name in OPENMP_VARIABLES):
        return "kept the OpenMP policy set by the user: " + ", ".join(
            f"{name}={environ[name]}" for name in OPENMP_VARIABLES if name in environ)
    if "torch" in sys.modules:
        return "torch was imported before the OpenMP policy could be set: libgomp's default (spinning) applies"
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "OMP_WAIT_POLICY=PASSIVE"


def openmp_policy(environ=os.environ) -> dict:
    """The OpenMP waiting variables of this process, for the records ({} = libgomp's default, spinning)."""
    return {name: environ[name] for name in OPENMP_VARIABLES if name in environ}
