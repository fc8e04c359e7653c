"""Video camera paths (OpenCV c2w): NeRF's spiral around the average pose of a forward-facing capture, and an
orbit around the point a 360-degree capture looks at; `video_path` picks by the scene's kind."""
from __future__ import annotations

import numpy as np

from data.scene import FORWARD_FACING, optical_axes_focus


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


def orbit_path(c2w: np.ndarray, n_frames: int = 30) -> np.ndarray:
    """c2w [N, 4, 4] of an inward-looking capture -> [n_frames, 4, 4] poses on a circle around what it looks at.

    The circle is at the cameras' mean height and distance from the focus (optical_axes_focus), about their mean
    up direction. A full circle when the cameras go (nearly) all the way round; otherwise the path sweeps back
    and forth over the arc the cameras cover, so it never shows the side nobody photographed.
    """
    focus = optical_axes_focus(c2w)
    up = -_normalize(c2w[:, :3, 1].sum(axis=0))
    offsets = c2w[:, :3, 3] - focus
    height = float((offsets @ up).mean())
    flat = offsets - (offsets @ up)[:, None] * up
    radius = float(np.linalg.norm(flat, axis=1).mean())
    e1 = _normalize(flat.mean(axis=0)) if np.linalg.norm(flat.mean(axis=0)) > 1e-6 * radius else _normalize(flat[0])
    e2 = np.cross(up, e1)
    angles = np.arctan2(flat @ e2, flat @ e1)  # relative to the mean direction, in (-pi, pi]
    t = np.linspace(0.0, 1.0, n_frames + 1)[:-1]
    if angles.max() - angles.min() > 1.5 * np.pi:
        thetas = 2.0 * np.pi * t
    else:
        low, high = np.percentile(angles, [5, 95])
        thetas = 0.5 * (low + high) + 0.5 * (high - low) * np.sin(2.0 * np.pi * t)
    poses = [look_at_c2w(focus + height * up + radius * (np.cos(a) * e1 + np.sin(a) * e2), focus, -up) for a in thetas]
    return np.stack(poses).astype(np.float32)


def video_path(c2w: np.ndarray, bounds: np.ndarray, kind: str, n_frames: int = 30, n_rots: float = 2.0,
               zrate: float = 0.5) -> np.ndarray:
    """The video path a scene of `kind` (Scene.kind) needs: spiral_path when forward-facing, else orbit_path."""
    if kind == FORWARD_FACING:
        return spiral_path(c2w, bounds, n_frames, n_rots, zrate)
    return orbit_path(c2w, n_frames)
