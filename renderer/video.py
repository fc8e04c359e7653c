"""Write rendered frames as PNGs and an mp4 (imageio + imageio-ffmpeg)."""
from __future__ import annotations

import warnings
from pathlib import Path

import imageio.v2 as imageio
import numpy as np


def to_uint8(image) -> np.ndarray:
    """[H, W, 3] float in [0, 1] (torch or numpy; clipped) -> uint8."""
    array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image)
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, to_uint8(image))
    return path


def write_video(frames: list, path: str | Path, fps: int = 15) -> Path | None:
    """frames: list of [H, W, 3] images. Pads to even sizes (H.264 needs them). Returns None if no encoder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = [to_uint8(f) for f in frames]
    h, w = arrays[0].shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    arrays = [np.pad(a, pad, mode="edge") for a in arrays]
    try:
        imageio.mimwrite(path, arrays, fps=fps, quality=8, macro_block_size=1)
    except Exception as err:  # imageio-ffmpeg missing or ffmpeg failing: frames are still on disk
        warnings.warn(f"could not write {path} ({err}); the PNG frames are still saved")
        return None
    return path
