"""Build a TVM kernel once, cache the compiled library on disk, load it on every later run.

A kernel module describes its computation as a function `make(target) -> tvm.IRModule` (TE compute + a hand
schedule for the target). `build_kernel` compiles it with `tvm.compile` and exports a shared library under
`cache_dir()/<tvm version>/<name>-<hash>.so`, where the hash covers the kernel's name, its shape key, the target
and the kernel module's own source, so editing a kernel or upgrading TVM never loads a stale binary. Shapes that
vary per call (the number of tokens or rays) are symbolic in the kernels, so one build serves every chunk size.

Targets are TVM 0.27 dicts: {"kind": "llvm", "mcpu": <host cpu>, "num-cores": n} and
{"kind": "cuda", "arch": "sm_XY"}. CUDA kernels build without a GPU (nvcc is not needed: TVM emits PTX through
LLVM/NVRTC), so CI compiles them even where it cannot run them.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

__all__ = ["kernel_ready", "match_tvm_threads_to_torch", "tvm_thread_count", "tvm_available", "tvm_version", "cpu_target", "cuda_target", "target_for", "cache_dir", "build_kernel",
           "library_path", "KernelBuildError"]

_LOCK = threading.Lock()
_LOADED: dict[tuple, Callable] = {}


class KernelBuildError(RuntimeError):
    """A kernel failed to build or load (the message names the kernel, its shapes and the target)."""


def tvm_available() -> bool:
    try:
        import tvm  # noqa: F401  (lazy: TVM is optional; this probe decides whether it is there)
        from tvm import s_tir, te, tirx  # noqa: F401
    except Exception:  # an absent or broken install both mean "use the reference"
        return False
    return True


def match_tvm_threads_to_torch() -> None:
    """Give TVM's CPU thread pool torch's thread count. The pool sizes itself once, on its first parallel launch,
    from $TVM_NUM_THREADS, else from half the hardware threads (TVM assumes SMT siblings): on a 2-vCPU machine
    every kernel ran on 1 thread while torch, and every PyTorch peer, used 2. Called before any kernel is loaded;
    a value the user set wins, and the pool cannot follow later changes of torch's thread count."""
    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))


def tvm_thread_count() -> int | None:
    """Threads in TVM's CPU pool (sizing it if no kernel ran yet, so call match_tvm_threads_to_torch first);
    None without TVM."""
    if not tvm_available():
        return None
    import tvm_ffi  # lazy: TVM is optional

    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def tvm_version() -> str:
    import tvm  # lazy: TVM is optional (the references run without it)

    return str(tvm.__version__)


def cpu_target(num_cores: int | None = None) -> dict:
    """LLVM for this host's CPU (e.g. znver4), with its vector width; num_cores defaults to torch's threads."""
    import tvm.target.codegen as codegen  # lazy: TVM is optional (the references run without it)

    return {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()),
            "num-cores": int(num_cores or torch.get_num_threads())}


def cuda_target(arch: str | None = None, device: torch.device | None = None) -> dict:
    """CUDA for the given architecture, e.g. "sm_90"; by default the architecture of `device` (or sm_90)."""
    if arch is None:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            arch = f"sm_{major}{minor}"
        else:
            arch = "sm_90"
    return {"kind": "cuda", "arch": arch}


def target_for(device: torch.device | str) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_target(device=device)
    if device.type == "cpu":
        return cpu_target()
    raise KernelBuildError(f"no TVM target for device {device}; kernels support cpu and cuda")


def cache_dir() -> Path:
    """$SHIFTADD_GNT_KERNEL_CACHE, else ~/.cache/shiftadd_gnt/tvm/<tvm version>."""
    root = os.environ.get("SHIFTADD_GNT_KERNEL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "shiftadd_gnt" / "tvm"
    return base / tvm_version()


def _kernel_hash(name: str, key: dict, target: dict, make: Callable) -> str:
    try:
        source = inspect.getsource(inspect.getmodule(make))
    except (OSError, TypeError):
        source = getattr(make, "__qualname__", repr(make))
    blob = json.dumps({"name": name, "key": key, "target": target, "tvm": tvm_version()}, sort_keys=True)
    return hashlib.sha256((blob + source).encode()).hexdigest()[:16]


def library_path(name: str, key: dict, target: dict, make: Callable) -> Path:
    """Where build_kernel caches this kernel's compiled library (it may not exist yet): kernels/aot.py copies it."""
    return cache_dir() / f"{name}-{_kernel_hash(name, key, target, make)}.so"


def build_kernel(name: str, key: dict, target: dict, make: Callable) -> Callable:
    """The compiled `main` function of kernel `name` for shapes `key` on `target`, built at most once per machine.

    make(target) -> tvm.IRModule with a scheduled "main". The returned function takes torch tensors (zero-copy:
    TVM reads them through DLPack) in the order of the kernel's arguments and writes its output argument.
    """
    fast_key = (name, json.dumps(key, sort_keys=True), json.dumps(target, sort_keys=True), str(cache_dir()))
    function = _LOADED.get(fast_key)  # per-call path: one dict lookup, no hashing of sources
    if function is not None:
        return function
    path = library_path(name, key, target, make)
    with _LOCK:
        if fast_key in _LOADED:
            return _LOADED[fast_key]
        import tvm  # lazy: TVM is optional (the references run without it)

        where = f"kernel {name!r} {key} for target {target}"
        if not path.exists():
            try:
                library = tvm.compile(make(target), target=tvm.target.Target(target))
            except Exception as error:  # TVM raises many types; callers decide whether to fall back
                raise KernelBuildError(f"{where}: build failed: {type(error).__name__}: "
                                       f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}") from error
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            try:
                library.export_library(tmp)
                os.replace(tmp, path)  # atomic: a concurrent or interrupted build never leaves a torn file
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        try:
            function = tvm.runtime.load_module(str(path))["main"]
        except Exception as error:
            raise KernelBuildError(f"{where}: cached library {path} failed to load ({error}); delete it to rebuild") \
                from error
        _LOADED[fast_key] = function
        return function


ALIGNMENT = 64  # bytes: TVM's kernels assume every buffer starts at this alignment (misaligned data can crash)


def kernel_ready(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Contiguous (in `dtype` if given) at a 64-byte aligned address; copied only when it is not already."""
    if dtype is not None:
        tensor = tensor.to(dtype)
    tensor = tensor.contiguous()
    if tensor.data_ptr() % ALIGNMENT:
        tensor = tensor.clone()  # fresh allocations are aligned
    return tensor
