"""Camera rays in the project's convention.

Convention (used everywhere in the project):
- cameras are OpenCV-style camera-to-world matrices `c2w` [4, 4]: x right, y down, z forward;
- pixel (row i, column j) has its centre at image coordinate (u, v) = (j, i); projection and
  `grid_sample(..., align_corners=True)` use the same convention, so a pixel ray projects back onto
  exactly that pixel;
- directions are *not* normalised: `d = R K^-1 [u, v, 1]^T`, so a point at camera depth z along a ray
  is `o + z * d`.
"""
from __future__ import annotations

import torch


def pixel_grid(height: int, width: int, stride: int = 1, device=None) -> torch.Tensor:
    """Pixel coordinates (u, v) of every `stride`-th pixel, [H', W', 2] float32 (u = column, v = row)."""
    v, u = torch.meshgrid(
        torch.arange(0, height, stride, dtype=torch.float32, device=device),
        torch.arange(0, width, stride, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def rays_from_pixels(pixels: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through pixel coordinates.

    pixels: [..., 2] (u, v); K: [3, 3]; c2w: [4, 4].
    Returns origins [..., 3] and directions [..., 3] (camera depth 1 per unit of t).
    """
    K = K.to(pixels)
    c2w = c2w.to(pixels)
    uv1 = torch.cat([pixels, torch.ones_like(pixels[..., :1])], dim=-1)
    dirs_cam = uv1 @ torch.linalg.inv(K).T
    dirs = dirs_cam @ c2w[:3, :3].T
    origins = c2w[:3, 3].expand_as(dirs)
    return origins, dirs


def camera_rays(K: torch.Tensor, c2w: torch.Tensor, height: int, width: int, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All rays of a camera image: origins, directions, each [H', W', 3] with H' = ceil(H / stride)."""
    pixels = pixel_grid(height, width, stride, device=torch.as_tensor(c2w).device)
    return rays_from_pixels(pixels, torch.as_tensor(K, dtype=torch.float32), torch.as_tensor(c2w, dtype=torch.float32))
