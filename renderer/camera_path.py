"""NeRF-style spiral camera path around the average pose of a forward-facing capture (OpenCV c2w)."""
from __future__ import annotations

import numpy as np


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def look_at_c2w(centre: np.ndarray, target: np.ndarray, down: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world [4, 4] at `centre` looking at `target` with image-down roughly along `down`."""
    forward = _normalize(target - centre)
    right = _normalize(np.cross(down, forward))
    down = np.cross(forward, right)
    c2w = np.eye(4, dtype=np.float32)
    c2w[:3, :3] = np.stack([right, down, forward], axis=1)
    c2w[:3, 3] = centre
    return c2w


def spiral_path(c2w: np.ndarray, bounds: np.ndarray, n_frames: int = 30, n_rots: float = 2.0, zrate: float = 0.5) -> np.ndarray:
    """c2w [N, 4, 4] of the capture, bounds [N, 2] -> [n_frames, 4, 4] poses on a spiral.

    As in NeRF: the spiral's radii are the 90th percentile of the cameras' offsets from their mean (in the mean
    camera's frame), and every frame looks at a focus point at a disparity-weighted depth between the bounds.
    """
    centre = c2w[:, :3, 3].mean(axis=0)
    forward = _normalize(c2w[:, :3, 2].sum(axis=0))
    down = _normalize(c2w[:, :3, 1].sum(axis=0))
    avg = look_at_c2w(centre, centre + forward, down)
    offsets = (c2w[:, :3, 3] - centre) @ avg[:3, :3]  # in the mean camera's frame
    radii = np.percentile(np.abs(offsets), 90, axis=0)
    close, far = bounds.min() * 0.9, bounds.max() * 5.0
    focus = 1.0 / (0.25 / close + 0.75 / far)
    target = centre + forward * focus
    poses = []
    for theta in np.linspace(0.0, 2.0 * np.pi * n_rots, n_frames + 1)[:-1]:
        local = np.array([np.cos(theta), np.sin(theta), np.sin(theta * zrate)]) * radii
        poses.append(look_at_c2w(centre + avg[:3, :3] @ local, target, down))
    return np.stack(poses).astype(np.float32)
