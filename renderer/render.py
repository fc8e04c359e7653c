"""The Renderer: sampling along rays and the call of the model, in one place for training, evaluation,
calibration and op counting; whole images in chunks so any resolution fits in memory.

Like nerfacc's `rendering(..., rgb_sigma_fn=...)`, the Renderer knows nothing about the model: it takes a
radiance function

    fn(points [R, S, 3], directions [R, 3], origins [R, 3]) -> rgb [R, 3]

(e.g. `lambda p, d, o: model.render_points(p, d, o[0], views)`), samples the rays the way the scene's kind needs
(renderer.sampling.sample_along_rays) and calls fn under the configured autocast. `RenderSettings` holds what
used to be render_novel_view's parameter list; `RenderSettings.from_config(cfg)` reads it from a Config.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable

import torch
from tqdm.auto import tqdm

from data.scene import FORWARD_FACING
from renderer.rays import camera_rays
from renderer.sampling import sample_along_rays

RadianceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["RenderSettings", "Renderer", "RadianceFn", "autocast_context"]


def autocast_context(device: torch.device, mode: str):
    """bf16/fp16 autocast on CUDA; a no-op on CPU or with mode 'none'."""
    if mode == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    return torch.autocast(device_type="cuda", dtype=dtype)


@dataclass(frozen=True)
class RenderSettings:
    """How to render: samples per ray, source views per target, pixel stride, rays per model call (chunk) and
    autocast mode ("none" | "bf16" | "fp16", CUDA only)."""

    n_samples: int
    num_source_views: int = 10
    stride: int = 1
    chunk: int = 1024
    autocast: str = "none"

    @classmethod
    def from_config(cls, cfg, stride: int | None = None) -> "RenderSettings":
        """cfg.render / cfg.data as settings; `stride` defaults to cfg.eval.stride."""
        return cls(n_samples=cfg.render.n_samples, num_source_views=cfg.data.num_source_views,
                   stride=cfg.eval.stride if stride is None else stride, chunk=cfg.render.chunk_rays,
                   autocast=cfg.render.autocast)

    def with_(self, **changes) -> "RenderSettings":
        return replace(self, **changes)


class Renderer:
    """Samples rays of a scene of `kind` (Scene.kind) and calls a radiance function on the samples."""

    def __init__(self, settings: RenderSettings, kind: str = FORWARD_FACING):
        self.settings = settings
        self.kind = kind

    def sample(self, origins, directions, near, far, stratified: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """origins, directions [R, 3]; near/far scalars or [R] -> points [R, S, 3] (stratified for training)."""
        _, points = sample_along_rays(origins, directions, near, far, self.settings.n_samples, stratified, generator,
                                      self.kind)
        return points

    def shade(self, fn: RadianceFn, points, directions, origins) -> torch.Tensor:
        """fn on the samples under the configured autocast -> rgb [R, 3] float32."""
        with autocast_context(origins.device, self.settings.autocast):
            rgb = fn(points, directions, origins)
        return rgb.float()

    def render_rays(self, fn: RadianceFn, origins, directions, near, far, stratified: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """origins, directions [R, 3] -> rgb [R, 3] float32: sample, then shade."""
        points = self.sample(origins, directions, near, far, stratified, generator)
        return self.shade(fn, points, directions, origins)

    @torch.no_grad()
    def render_image(self, fn: RadianceFn, K, c2w, height: int, width: int, near, far, device: torch.device,
                     progress: bool = False) -> torch.Tensor:
        """One camera (K [3, 3], c2w [4, 4]) at settings.stride, settings.chunk rays per call -> rgb [H', W', 3]
        in [0, 1]."""
        origins, dirs = camera_rays(K, c2w.to(device), height, width, self.settings.stride)
        shape = origins.shape[:2]
        origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        out = torch.empty_like(origins)
        chunk = self.settings.chunk
        for start in tqdm(range(0, origins.shape[0], chunk), desc="render", leave=False, disable=not progress,
                          unit="chunk"):
            end = start + chunk
            out[start:end] = self.render_rays(fn, origins[start:end], dirs[start:end], near, far)
        return out.reshape(*shape, 3).clamp(0.0, 1.0)
