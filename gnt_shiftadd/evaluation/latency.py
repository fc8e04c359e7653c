"""Per-token latency of MoE experts on this device, for the latency-aware balance loss (cached on disk).

Timings depend on the device, thread count, torch version and expert shapes, so the cache key holds all of
them; a stale or corrupt cache costs one re-measurement, never a crash.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

DEFAULT_CACHE_DIR = Path("~/.cache/shiftadd_gnt")
CACHE_FILE_NAME = "latency.json"


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_module_latency(module: nn.Module, dim: int, tokens: int = 4096, device=None,
                           dtype: torch.dtype = torch.float32, repeats: int = 20, warmup: int = 3) -> float:
    """Seconds per token of module(x) for x [tokens, dim]: median over `repeats` timed runs after `warmup`.

    Runs an eval-mode copy (dropout off; the caller's module is not moved or cast) under inference_mode; on
    CUDA the timing is bracketed by torch.cuda.synchronize so it measures the kernels, not their launch.
    """
    device = torch.device(device) if device is not None else _module_device(module)
    timed = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
    x = torch.randn(tokens, dim, device=device, dtype=dtype)
    seconds = []
    with torch.inference_mode():
        for _ in range(max(warmup, 0)):
            timed(x)
        for _ in range(max(repeats, 1)):
            _synchronize(device)
            start = time.perf_counter()
            timed(x)
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
    per_token = statistics.median(seconds) / max(tokens, 1)
    return max(per_token, 1e-12)  # a timer tick of 0 would make the latency weighting divide by zero


def device_name(device: torch.device) -> str:
    """What the timing depends on besides the experts: the processor (and threads on CPU) or the GPU model."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    processor = platform.processor() or platform.machine()
    return f"{device.type}:{processor}:{torch.get_num_threads()}threads"


def _cache_key(experts: Sequence[nn.Module], device: torch.device, tokens: int, dtype: torch.dtype) -> str:
    described = []
    for expert in experts:
        shapes = [list(p.shape) for p in expert.parameters()]
        described.append(f"{type(expert).__name__}{shapes}")
    return "|".join([device_name(device), f"torch={torch.__version__}", f"tokens={tokens}", str(dtype),
                     ";".join(described)])


def _read_cache(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            raise ValueError(f"expected a JSON object, got {type(cache).__name__}")
        return cache
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        warnings.warn(f"ignoring unreadable latency cache {path} ({error}); it will be rewritten", stacklevel=3)
        return {}


def _write_cache(path: Path, cache: dict) -> None:
    """Atomic: write a temp file beside it, then rename over it (a crash never leaves half a file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as file:
                json.dump(cache, file, indent=2, sort_keys=True)
            os.replace(temp_name, path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
    except OSError as error:
        warnings.warn(f"could not write latency cache {path} ({error})", stacklevel=3)


def measure_expert_latency(experts: Sequence[nn.Module], dim: int, tokens: int = 4096, device=None,
                           cache_dir: str | Path | None = None) -> list[float]:
    """[E] seconds per token of each expert on `device` (default: the first expert's), cached as JSON.

    The cache (cache_dir/latency.json, default ~/.cache/shiftadd_gnt) is keyed by device name, torch version,
    the experts' class names and parameter shapes, tokens and dtype.
    """
    device = torch.device(device) if device is not None else _module_device(experts[0])
    dtype = torch.float32
    path = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser() / CACHE_FILE_NAME
    key = _cache_key(experts, device, tokens, dtype)
    cache = _read_cache(path)
    cached = cache.get(key)
    if (isinstance(cached, list) and len(cached) == len(experts)
            and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in cached)):
        return [float(v) for v in cached]
    latency = [float(measure_module_latency(expert, dim, tokens=tokens, device=device, dtype=dtype))
               for expert in experts]
    cache[key] = latency
    _write_cache(path, cache)
    return latency
