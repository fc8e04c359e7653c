"""Sample points along rays uniformly in inverse depth (disparity), as GNT/IBRNet do for forward-facing scenes."""
from __future__ import annotations

import torch


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
    rays = origins.shape[0]
    device, dtype = origins.device, origins.dtype
    near = torch.as_tensor(near, device=device, dtype=dtype).expand(rays)
    far = torch.as_tensor(far, device=device, dtype=dtype).expand(rays)
    t = torch.linspace(0.0, 1.0, n_samples, device=device, dtype=dtype)
    inv_z = (1.0 / near)[:, None] * (1.0 - t) + (1.0 / far)[:, None] * t
    z = 1.0 / inv_z  # [R, S], increasing
    if stratified:
        mids = 0.5 * (z[:, 1:] + z[:, :-1])
        upper = torch.cat([mids, z[:, -1:]], dim=-1)
        lower = torch.cat([z[:, :1], mids], dim=-1)
        u = torch.rand(z.shape, device="cpu", generator=generator, dtype=dtype).to(device)
        z = lower + (upper - lower) * u
    points = origins[:, None, :] + z[..., None] * directions[:, None, :]
    return z, points
