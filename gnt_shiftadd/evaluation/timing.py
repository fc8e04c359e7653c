"""Wall-clock timing of renders, done the same way everywhere a latency is reported (benchmarks, report).

GPU work is asynchronous: every timed region starts and ends with a device synchronisation. Times are medians
over repeats after warm-up runs (the first render builds/loads kernels and fills caches).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from kernels.dispatch import all_kernels_required
from renderer.render import RenderSettings
from renderer.views import render_novel_view


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall-clock seconds of fn() over `repeats` runs after `warmup` untimed runs."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


@torch.no_grad()
def render_heldout(model, tensors, cfg, view: int) -> torch.Tensor:
    """Held-out `view` rendered at cfg.eval.stride from its nearest training views -> rgb [H', W', 3]."""
    scene = tensors.scene
    near, far = scene.depth_range(view)
    return render_novel_view(model, tensors, scene.c2w[view], scene.intrinsics[view], near, far,
                             RenderSettings.from_config(cfg), exclude_view=view)


def frame_latency(model, tensors, cfg, view: int, repeats: int = 3,
                  require_kernels: bool = False) -> tuple[float, torch.Tensor, dict]:
    """(median seconds per rendered frame of held-out `view`, the rendered image, {module: {kernel: how}}) after
    one warm-up render. With require_kernels (a row timed as "tvm"), KernelFallbackError if any module ran on the
    PyTorch reference instead of its kernel: a timing is never wrong about what ran."""
    if not require_kernels:
        image = render_heldout(model, tensors, cfg, view)
        return median_seconds(lambda: render_heldout(model, tensors, cfg, view), tensors.device, repeats, warmup=0), \
            image, {}
    with all_kernels_required(model) as ran:
        image = render_heldout(model, tensors, cfg, view)
        seconds = median_seconds(lambda: render_heldout(model, tensors, cfg, view), tensors.device, repeats, warmup=0)
    return seconds, image, ran
