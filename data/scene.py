"""The in-memory scene every loader returns and every consumer (training, evaluation, rendering) reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


FORWARD_FACING = "forward_facing"
AROUND_360 = "360"
SCENE_KINDS = (FORWARD_FACING, AROUND_360)
FORWARD_FACING_MAX_DEGREES = 30.0


class SceneError(ValueError):
    """A scene on disk is missing or malformed. The message names the file and what is wrong."""


@dataclass
class Scene:
    """A posed image collection.

    images:     [N, H, W, 3] float32 in [0, 1]
    c2w:        [N, 4, 4] float32 OpenCV camera-to-world (x right, y down, z forward), recentred and rescaled
    intrinsics: [N, 3, 3] float32 pinhole K at the loaded image resolution
    bounds:     [N, 2] float32 per-view near/far scene depth bounds (after rescaling)
    train_ids, test_ids: int64 index arrays into the N views (disjoint)
    kind:       "forward_facing" or "360" (measured from the cameras by scene_kind(); decides ray sampling)
    depth_margin: (near, far) multipliers depth_range() applies to the bounds (GNT: 0.9 / 1.6 for LLFF scenes,
                1 / 1 where the bounds are already the sampling range, as Blender's fixed 2 / 6)
    source_format: which reader produced it (llff, colmap, transforms, blender)
    """

    name: str
    root: Path
    images: np.ndarray
    c2w: np.ndarray
    intrinsics: np.ndarray
    bounds: np.ndarray
    train_ids: np.ndarray
    test_ids: np.ndarray
    image_paths: list[str] = field(default_factory=list)
    kind: str = FORWARD_FACING
    depth_margin: tuple[float, float] = (0.9, 1.6)
    source_format: str = "llff"

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    @property
    def num_views(self) -> int:
        return int(self.images.shape[0])

    def depth_range(self, index: int | None = None) -> tuple[float, float]:
        """GNT's sampling range: near bound x depth_margin[0], far bound x depth_margin[1] (GNT's LLFF values:
        0.9 and 1.6), of one view, or of the whole scene."""
        b = self.bounds if index is None else self.bounds[index : index + 1]
        return float(b[:, 0].min() * self.depth_margin[0]), float(b[:, 1].max() * self.depth_margin[1])


def view_spread_degrees(c2w: np.ndarray) -> float:
    """Largest angle (degrees) between a camera's viewing direction and the mean viewing direction.

    c2w: [N, 4, 4] (or [N, 3, 4]) OpenCV camera-to-world; the viewing direction is the camera's +z column.
    180 when the directions cancel out (cameras all around an object).
    """
    forward = np.asarray(c2w, dtype=np.float64)[:, :3, 2]
    forward = forward / np.linalg.norm(forward, axis=1, keepdims=True)
    mean = forward.mean(axis=0)
    if np.linalg.norm(mean) < 1e-6:
        return 180.0
    cosines = np.clip(forward @ (mean / np.linalg.norm(mean)), -1.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


def scene_kind(c2w: np.ndarray) -> str:
    """forward_facing when every camera looks within FORWARD_FACING_MAX_DEGREES of the mean direction, else 360.

    Measured: LLFF fern 9.5, flower 4.3, horns 14.1; the inward-looking fox capture (partial circle) 52,
    Blender chair (upper hemisphere) 92.
    """
    return FORWARD_FACING if view_spread_degrees(c2w) <= FORWARD_FACING_MAX_DEGREES else AROUND_360


def optical_axes_focus(c2w: np.ndarray) -> np.ndarray:
    """The point closest (least squares) to every camera's optical axis: what an inward capture looks at. [3]."""
    centres, forward = c2w[:, :3, 3], c2w[:, :3, 2] / np.linalg.norm(c2w[:, :3, 2], axis=1, keepdims=True)
    projectors = np.eye(3)[None] - forward[:, :, None] * forward[:, None, :]  # onto the plane normal to each axis
    return np.linalg.lstsq(projectors.sum(0), (projectors @ centres[:, :, None]).sum(0)[:, 0], rcond=None)[0]
