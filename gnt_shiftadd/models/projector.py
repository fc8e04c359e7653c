"""Projecting target-ray sample points into the source views and gathering what those views see there.

Camera convention: see `renderer/rays.py` (OpenCV c2w, pixel (row i, col j) centred at (u, v) = (j, i),
`grid_sample(align_corners=True)` with x = 2u / (W - 1) - 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_MIN_DEPTH = 1e-6


@dataclass
class SourceViews:
    """Per-target inputs shared by all of its rays.

    rgb [V, H, W, 3] in [0, 1]; features [V, C, h, w] covering the same image extent; K [V, 3, 3]; c2w [V, 4, 4].
    """

    rgb: torch.Tensor
    features: torch.Tensor
    K: torch.Tensor
    c2w: torch.Tensor

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the source images, the frame in which pixel coordinates are expressed."""
        return self.rgb.shape[1], self.rgb.shape[2]


def world_to_camera(c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigid inverse of c2w [..., 4, 4] without a general matrix inverse: (R^T [..., 3, 3], -R^T t [..., 3])."""
    rot_t = c2w[..., :3, :3].transpose(-1, -2)
    trans = -(rot_t @ c2w[..., :3, 3:4])[..., 0]
    return rot_t, trans


def project_points(points: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """points [..., 3] -> pixels [V, ..., 2] as (u, v), depth [V, ...] (camera z) for V cameras (K [V,3,3], c2w [V,4,4]).

    Points at or behind a camera get a finite (mirrored) projection; callers mask them out by depth.
    """
    K, c2w = K.to(points), c2w.to(points)
    batch_shape = points.shape[:-1]
    flat = points.reshape(1, -1, 3)  # [1, N, 3]
    rot_t, trans = world_to_camera(c2w)  # [V, 3, 3], [V, 3]
    cam = flat @ rot_t.transpose(-1, -2) + trans[:, None, :]  # [V, N, 3]
    image = cam @ K.transpose(-1, -2)  # [V, N, 3] = (z u, z v, z) for a pinhole K
    depth = cam[..., 2]
    safe_z = torch.where(image[..., 2] >= 0, image[..., 2].clamp(min=_MIN_DEPTH), image[..., 2].clamp(max=-_MIN_DEPTH))
    pixels = (image[..., :2] / safe_z[..., None]).clamp(-1e6, 1e6)
    num_views = K.shape[0]
    return pixels.reshape(num_views, *batch_shape, 2), depth.reshape(num_views, *batch_shape)


def relative_direction_code(points: torch.Tensor, target_origin: torch.Tensor, source_origins: torch.Tensor) -> torch.Tensor:
    """GNT/IBRNet's 4-d view code: how the source viewing direction differs from the target's, [R, S, V, 4].

    points [R, S, 3], target_origin [3], source_origins [V, 3]. Output = (unit(diff), dot) with
    diff = to_target - to_source, both unit vectors from the point towards the camera centres.
    """
    target_origin, source_origins = target_origin.to(points), source_origins.to(points)
    to_target = F.normalize(target_origin - points, dim=-1)[..., None, :]  # [R, S, 1, 3]
    to_source = F.normalize(source_origins - points[..., None, :], dim=-1)  # [R, S, V, 3]
    diff = to_target - to_source
    direction = diff / diff.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    dot = (to_target * to_source).sum(dim=-1, keepdim=True)
    return torch.cat([direction, dot], dim=-1)


def _sample(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of images [V, C, h, w] at normalised grid [V, R, S, 2] -> [V, C, R, S]."""
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def sample_source_views(
    points: torch.Tensor, target_origin: torch.Tensor, views: SourceViews
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every source view sees at every sample point, in grid_sample's own layout (no copies).

    points [R, S, 3], target_origin [3] -> rgb [V, 3, R, S], feat [V, C, R, S] (bilinear samples of the images
    and the CNN features), ray_diff [R, S, V, 4] (see `relative_direction_code`), mask [R, S, V, 1]
    (1 = in front and inside the image). One grid_sample per tensor with the views as the batch.
    """
    height, width = views.image_size
    pixels, depth = project_points(points, views.K, views.c2w)  # [V, R, S, 2], [V, R, S]
    u, v = pixels.unbind(-1)
    inside = (depth > _MIN_DEPTH) & (u >= 0) & (u <= width - 1) & (v >= 0) & (v <= height - 1)

    scale = pixels.new_tensor([max(width - 1, 1), max(height - 1, 1)])
    # Beyond +-3 every bilinear tap lies outside any map of >= 2 pixels (zeros): the clamp only keeps the grid tame.
    grid = (2.0 * pixels / scale - 1.0).clamp(-3.0, 3.0)
    rgb = _sample(views.rgb.permute(0, 3, 1, 2).to(points), grid)  # [V, 3, R, S]
    feat = _sample(views.features.to(points), grid)  # [V, C, R, S]
    ray_diff = relative_direction_code(points, target_origin, views.c2w[:, :3, 3])
    mask = inside.permute(1, 2, 0)[..., None].to(points.dtype)
    return rgb, feat, ray_diff, mask


class SourceViewSampler(nn.Module):
    """`sample_source_views` as a swappable leaf (no parameters): (points [R, S, 3], target_origin [3], views)
    -> (rgb [V, 3, R, S], feat [V, F, R, S], ray_diff [R, S, V, 4], mask [R, S, V, 1]). kernels.apply swaps it
    for the fused projection + bilinear-gather kernel on the CPU."""

    def forward(self, points: torch.Tensor, target_origin: torch.Tensor, views: SourceViews):
        return sample_source_views(points, target_origin, views)


def gather_from_source_views(
    points: torch.Tensor, target_origin: torch.Tensor, views: SourceViews
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample_source_views` in the transformer's layout: rgb_feat [R, S, V, 3 + C] (colour then CNN features),
    ray_diff [R, S, V, 4], mask [R, S, V, 1]."""
    rgb, feat, ray_diff, mask = sample_source_views(points, target_origin, views)
    rgb_feat = torch.cat([rgb.permute(2, 3, 0, 1), feat.permute(2, 3, 0, 1)], dim=-1)
    return rgb_feat, ray_diff, mask
