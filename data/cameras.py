"""Camera helpers shared by the COLMAP, transforms.json and Blender readers.

Conventions (as everywhere in the project, see renderer/rays.py): OpenCV camera-to-world (x right, y down,
z forward) and K in pixel-centre coordinates (pixel column j has its centre at u = j). COLMAP, nerfstudio,
instant-ngp and NeRF's Blender scenes put the image origin at the top-left *corner* of the first pixel, so their
principal points are shifted by -0.5 here (`pinhole_matrix`).
"""
from __future__ import annotations

import numpy as np
import pycolmap
import torch
import torch.nn.functional as F

from data.llff import average_pose, llff_rescale_factor
from data.scene import FORWARD_FACING, SceneError, optical_axes_focus

OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])  # right-multiply a c2w: flips the camera's y and z axes


def pinhole_matrix(fx: float, fy: float, cx: float, cy: float, scale_x: float = 1.0, scale_y: float = 1.0) -> np.ndarray:
    """[3, 3] K at an image resized by (scale_x, scale_y), from corner-origin intrinsics (COLMAP/nerfstudio)."""
    return np.array([[fx * scale_x, 0.0, cx * scale_x - 0.5],
                     [0.0, fy * scale_y, cy * scale_y - 0.5],
                     [0.0, 0.0, 1.0]])


def resized_size(width: int, height: int, factor: int) -> tuple[int, int]:
    """(width, height) of an image downscaled by 1 / factor (as the LLFF loader rounds)."""
    return max(1, round(width / factor)), max(1, round(height / factor))


def undistortion_grid(camera: pycolmap.Camera) -> torch.Tensor:
    """Where the lens put each pixel of the ideal pinhole camera with the same fx, fy, cx, cy: a grid_sample
    grid [1, H, W, 2] (COLMAP's own distortion model via camera.img_from_cam, so every model COLMAP knows works)."""
    width, height = camera.width, camera.height
    fx, fy = camera.focal_length_x, camera.focal_length_y
    cx, cy = camera.principal_point_x, camera.principal_point_y
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")  # corner-origin centres
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=-1).reshape(-1, 3)
    source = camera.img_from_cam(rays, check_cheirality=False).reshape(height, width, 2)  # distorted (x, y)
    grid = np.stack([source[..., 0] / width * 2 - 1, source[..., 1] / height * 2 - 1], axis=-1)
    return torch.from_numpy(grid[None]).float()


def undistort_image(image: np.ndarray, camera: pycolmap.Camera, grid: torch.Tensor | None = None) -> np.ndarray:
    """A distorted photo [H, W, C] float (at camera's resolution) resampled to the ideal pinhole camera with the
    same fx, fy, cx, cy -> [H, W, C] float32. Pixels whose source falls outside the photo repeat its border.
    `grid`: undistortion_grid(camera), to reuse across photos of one camera."""
    grid = undistortion_grid(camera) if grid is None else grid
    pixels = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


class Undistorter:
    """undistort_image with the grid cached per camera (photos of one camera share it)."""

    def __init__(self):
        self._grids: dict[tuple, torch.Tensor] = {}

    def __call__(self, image: np.ndarray, camera: pycolmap.Camera) -> np.ndarray:
        key = (camera.model.name, camera.width, camera.height, tuple(np.asarray(camera.params).tolist()))
        if key not in self._grids:
            self._grids[key] = undistortion_grid(camera)
        return undistort_image(image, camera, self._grids[key])


def normalize_cameras(c2w: np.ndarray, bounds: np.ndarray, kind: str, bd_factor: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """Bring an arbitrary-scale capture into the frame the LLFF loader produces.

    c2w [N, 4, 4] OpenCV, bounds [N, 2] near/far depths -> (c2w, bounds) rescaled so the nearest bound is
    1 / bd_factor (NeRF's LLFF rule); forward-facing captures are recentred on the average pose (as NeRF does),
    360-degree captures are translated so the point the optical axes converge on is the origin (no rotation).
    """
    scale = llff_rescale_factor(bounds, bd_factor)
    c2w = np.array(c2w, dtype=np.float64)
    c2w[:, :3, 3] *= scale
    if kind == FORWARD_FACING:
        c2w_gl = c2w @ OPENGL_TO_OPENCV  # average_pose works on OpenGL axes (the flip is its own inverse)
        c2w = (np.linalg.inv(average_pose(c2w_gl))[None] @ c2w_gl) @ OPENGL_TO_OPENCV
    else:
        c2w[:, :3, 3] -= optical_axes_focus(c2w)
    return c2w, bounds * scale


def bounds_from_points(c2w: np.ndarray, points: np.ndarray, visible: list[np.ndarray], path_hint: str) -> np.ndarray:
    """Per-view near/far as LLFF's imgs2poses does: the 0.1 and 99.9 percentiles of the depths of the sparse
    points each view sees. c2w [N, 4, 4] OpenCV; points [P, 3]; visible: per view, indices into points."""
    bounds = np.zeros((len(c2w), 2))
    w2c = np.linalg.inv(c2w)
    for view, ids in enumerate(visible):
        depths = (points[ids] @ w2c[view, :3, :3].T + w2c[view, :3, 3])[:, 2]
        depths = depths[depths > 0]
        if len(depths) < 2:
            raise SceneError(f"{path_hint}: view {view} sees {len(depths)} sparse points in front of it; "
                             f"cannot derive its near/far bounds")
        bounds[view] = np.percentile(depths, 0.1), np.percentile(depths, 99.9)
    return bounds
