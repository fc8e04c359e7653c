"""Render rays and whole images with a GNT-style model, in chunks so any resolution fits in memory."""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from renderer.rays import camera_rays
from renderer.sampling import sample_inverse_depth


def autocast_context(device: torch.device, mode: str):
    """bf16/fp16 autocast on CUDA; a no-op on CPU or with mode 'none'."""
    if mode == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    return torch.autocast(device_type="cuda", dtype=dtype)


def render_rays(model, views, origins, directions, near, far, n_samples, stratified=False, generator=None, autocast="none"):
    """origins, directions [R, 3] of one target camera -> rgb [R, 3] (float32).

    `model` provides `render_points(points [R, S, 3], ray_dirs [R, 3], target_origin [3], views)`.
    """
    _, points = sample_inverse_depth(origins, directions, near, far, n_samples, stratified, generator)
    with autocast_context(origins.device, autocast):
        rgb = model.render_points(points, directions, origins[0], views)
    return rgb.float()


@torch.no_grad()
def render_image(model, views, K, c2w, height, width, near, far, n_samples, stride=1, chunk=1024, autocast="none", progress=False):
    """Render one camera: K [3, 3], c2w [4, 4] (target), views = encoded sources -> rgb [H', W', 3] in [0, 1]."""
    device = views.rgb.device
    origins, dirs = camera_rays(K, c2w.to(device), height, width, stride)
    shape = origins.shape[:2]
    origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    out = torch.empty_like(origins)
    starts = range(0, origins.shape[0], chunk)
    for start in tqdm(starts, desc="render", leave=False, disable=not progress, unit="chunk"):
        end = start + chunk
        out[start:end] = render_rays(model, views, origins[start:end], dirs[start:end], near, far, n_samples, autocast=autocast)
    return out.reshape(*shape, 3).clamp(0.0, 1.0)
