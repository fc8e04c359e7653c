"""Sample points along rays: uniformly in inverse depth (disparity) for forward-facing scenes, as GNT/IBRNet do
on LLFF, and uniformly in depth for 360-degree / object scenes (GNT on Blender). `sample_along_rays` picks by
the scene's kind; every renderer and training step goes through it."""
from __future__ import annotations

import torch

from data.scene import AROUND_360, FORWARD_FACING


def sample_along_rays(
    origins: torch.Tensor,
    directions: torch.Tensor,
    near: float | torch.Tensor,
    far: float | torch.Tensor,
    n_samples: int,
    stratified: bool,
    generator: torch.Generator | None = None,
    kind: str = FORWARD_FACING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling a scene of `kind` needs (Scene.kind): inverse depth for forward_facing, linear depth for 360.

    Same arguments and result as sample_inverse_depth: depths z [R, S], points [R, S, 3].
    """
    if kind == FORWARD_FACING:
        return sample_inverse_depth(origins, directions, near, far, n_samples, stratified, generator)
    if kind == AROUND_360:
        return sample_linear_depth(origins, directions, near, far, n_samples, stratified, generator)
    raise ValueError(f"unknown scene kind {kind!r}; expected {FORWARD_FACING!r} or {AROUND_360!r}")


def _bounds_and_steps(origins, near, far, n_samples: int):
    """near/far as [R] tensors on the rays' device and the S interpolation weights t in [0, 1]."""
    rays, device, dtype = origins.shape[0], origins.device, origins.dtype
    near = torch.as_tensor(near, device=device, dtype=dtype).expand(rays)
    far = torch.as_tensor(far, device=device, dtype=dtype).expand(rays)
    return near, far, torch.linspace(0.0, 1.0, n_samples, device=device, dtype=dtype)


def sample_linear_depth(
    origins: torch.Tensor,
    directions: torch.Tensor,
    near: float | torch.Tensor,
    far: float | torch.Tensor,
    n_samples: int,
    stratified: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like sample_inverse_depth, but evenly spaced in z between near and far (360-degree and object scenes)."""
    near, far, t = _bounds_and_steps(origins, near, far, n_samples)
    z = near[:, None] * (1.0 - t) + far[:, None] * t
    return _jitter_and_place(origins, directions, z, stratified, generator)


def sample_inverse_depth(
    origins: torch.Tensor,
    directions: torch.Tensor,
    near: float | torch.Tensor,
    far: float | torch.Tensor,
    n_samples: int,
    stratified: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """origins, directions [R, 3]; near/far scalars or [R] -> depths z [R, S], points o + z d [R, S, 3].

    Deterministic (evenly spaced in 1/z) when evaluating; `stratified` jitters each sample uniformly within its
    bin (between neighbouring midpoints) for training, with `generator` for reproducibility.
    """
    near, far, t = _bounds_and_steps(origins, near, far, n_samples)
    inv_z = (1.0 / near)[:, None] * (1.0 - t) + (1.0 / far)[:, None] * t
    z = 1.0 / inv_z  # [R, S], increasing
    return _jitter_and_place(origins, directions, z, stratified, generator)


def _jitter_and_place(origins, directions, z, stratified, generator):
    """z [R, S] increasing -> (z jittered within its bins when stratified, points o + z d [R, S, 3])."""
    dtype, device = z.dtype, z.device
    if stratified:
        mids = 0.5 * (z[:, 1:] + z[:, :-1])
        upper = torch.cat([mids, z[:, -1:]], dim=-1)
        lower = torch.cat([z[:, :1], mids], dim=-1)
        u = torch.rand(z.shape, device="cpu", generator=generator, dtype=dtype).to(device)
        z = lower + (upper - lower) * u
    points = origins[:, None, :] + z[..., None] * directions[:, None, :]
    return z, points
