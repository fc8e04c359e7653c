"""Deprecated shim: everything here moved to the kernel facade, kernels/dispatch.py.

Kept only so modules written against the old names keep importing while they move to
`kernels.dispatch.get_kernel(name, key, device, make)` (which also asks the registered loaders, notes what ran
and memoises). New code must not import this module.
"""
from __future__ import annotations

from typing import Callable

from kernels.build import KernelBuildError
from kernels.dispatch import KERNEL_BACKENDS, resolve_backend, warn_once

__all__ = ["KERNEL_BACKENDS", "resolve_backend", "warn_once", "kernel_or_none"]


def kernel_or_none(build: Callable[[], Callable]) -> Callable | None:
    """build() -> compiled kernel, or None (with one warning naming the failure). Prefer dispatch.get_kernel."""
    try:
        return build()
    except KernelBuildError as error:
        warn_once(f"{error}; falling back to the PyTorch reference for this kernel")
        return None
