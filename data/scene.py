"""The in-memory scene every loader returns and every consumer (training, evaluation, rendering) reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


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
        """GNT's sampling range: 0.9 x near bound, 1.6 x far bound (of one view, or of the whole scene)."""
        b = self.bounds if index is None else self.bounds[index : index + 1]
        return float(b[:, 0].min() * 0.9), float(b[:, 1].max() * 1.6)
