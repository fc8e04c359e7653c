"""Which implementation runs the ShiftAdd primitives: the PyTorch reference ("torch") or compiled TVM ("tvm").

`resolve_backend("tvm")` returns "torch" with one clear warning when TVM cannot be imported; `call_kernel`
builds (or loads) a kernel and, if that fails, warns once naming the kernel and the error and runs the
reference instead. Nothing ever silently returns a wrong result: a kernel either builds and is tested against
its reference, or is not used.
"""
from __future__ import annotations

import warnings
from typing import Callable

from kernels.build import KernelBuildError, tvm_available

__all__ = ["KERNEL_BACKENDS", "resolve_backend", "warn_once", "kernel_or_none"]

KERNEL_BACKENDS = ("torch", "tvm")
_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(requested: str) -> str:
    """"torch" or "tvm"; "tvm" degrades to "torch" (with a warning) when TVM is not importable."""
    if requested not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {requested!r}")
    if requested == "tvm" and not tvm_available():
        warn_once("kernels=tvm requested but TVM is not importable (pip install apache-tvm==0.27.0.post1); "
                  "using the PyTorch reference kernels")
        return "torch"
    return requested


def kernel_or_none(build: Callable[[], Callable]) -> Callable | None:
    """build() -> compiled kernel, or None (with one warning naming the failure) when it cannot be built."""
    try:
        return build()
    except KernelBuildError as error:
        warn_once(f"{error}; falling back to the PyTorch reference for this kernel")
        return None
