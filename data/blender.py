"""NeRF-synthetic ("Blender") scenes: transforms_{train,val,test}.json + RGBA renders -> Scene.

As GNT and NeRF use them: RGBA composited on a white background, focal = 0.5 W / tan(0.5 camera_angle_x),
OpenGL camera-to-world flipped to OpenCV, no rescaling, near/far 2 / 6 for every view (used as the sampling
range as is: depth_margin 1 / 1), the train split for training and the test split held out (val is not used).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from data.cameras import pinhole_matrix, resized_size
from data.scene import Scene, SceneError, scene_kind
from data.transforms_json import common_image_size, frame_image_path, frame_pose, read_json

BLENDER_NEAR_FAR = (2.0, 6.0)
SPLITS = ("train", "test")


def read_rgba_on_white(path: Path, size: tuple[int, int]) -> np.ndarray:
    """An RGBA (or RGB) render -> float32 [h, w, 3] in [0, 1], alpha-composited on white, resized to size (w, h).

    Resized premultiplied (colour x alpha and alpha separately), so edges do not bleed the transparent pixels'
    stored colour."""
    try:
        with Image.open(path) as image:
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    except Exception as err:
        raise SceneError(f"{path} cannot be read as an image ({type(err).__name__}: {err})") from None
    premultiplied = np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], axis=-1)
    if (rgba.shape[1], rgba.shape[0]) != size:
        channels = [Image.fromarray(np.ascontiguousarray(premultiplied[..., c]), "F").resize(size, Image.Resampling.BOX)
                    for c in range(4)]
        premultiplied = np.stack([np.asarray(c) for c in channels], axis=-1)
    rgb, alpha = premultiplied[..., :3], premultiplied[..., 3:]
    return np.clip(rgb + (1.0 - alpha), 0.0, 1.0).astype(np.float32)


def load_blender_scene(root, factor: int = 1, progress: bool = False) -> Scene:
    """root/transforms_{train,test}.json -> Scene at 1 / factor resolution (800 px chair: factor 4 -> 200 px)."""
    root = Path(root)
    frames, splits = [], []
    angle = None
    for split in SPLITS:
        json_path = root / f"transforms_{split}.json"
        meta = read_json(json_path)
        if "camera_angle_x" not in meta:
            raise SceneError(f"{json_path} has no 'camera_angle_x' (horizontal field of view in radians)")
        if angle is not None and abs(float(meta["camera_angle_x"]) - angle) > 1e-6:
            raise SceneError(f"{json_path}: camera_angle_x {meta['camera_angle_x']} differs from the train split's {angle}")
        angle = float(meta["camera_angle_x"])
        for index, frame in enumerate(meta["frames"]):
            frames.append((json_path, index, frame))
            splits.append(split)
    paths = [frame_image_path(json_path, frame, index) for json_path, index, frame in frames]
    c2w = np.stack([frame_pose(json_path, frame, index) for json_path, index, frame in frames])
    width, height = common_image_size(paths, root)
    target = resized_size(width, height, factor)
    images = np.stack([read_rgba_on_white(p, target) for p in tqdm(paths, desc="read Blender views",
                                                                    disable=not progress, leave=False)])
    focal = 0.5 * width / np.tan(0.5 * angle)
    K = pinhole_matrix(focal, focal, width / 2.0, height / 2.0, target[0] / width, target[1] / height)
    splits = np.array(splits)
    bounds = np.tile(np.array(BLENDER_NEAR_FAR, dtype=np.float32), (len(paths), 1))
    return Scene(name=root.name, root=root, images=images, c2w=c2w.astype(np.float32),
                 intrinsics=np.tile(K[None], (len(paths), 1, 1)).astype(np.float32), bounds=bounds,
                 train_ids=np.flatnonzero(splits == "train").astype(np.int64),
                 test_ids=np.flatnonzero(splits == "test").astype(np.int64),
                 image_paths=[str(p) for p in paths], kind=scene_kind(c2w), depth_margin=(1.0, 1.0),
                 source_format="blender")
