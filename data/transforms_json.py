"""nerfstudio / instant-ngp `transforms.json` scenes -> Scene.

Fields read (file level, or per frame where nerfstudio allows it): fl_x, fl_y (else camera_angle_x /
camera_angle_y), cx, cy (default: image centre), w, h (default: the image's size), camera_model (OPENCV,
OPENCV_FISHEYE), distortion k1..k4, p1, p2; per frame file_path (relative to the json) and transform_matrix
(camera-to-world, OpenGL axes: x right, y up, z back; flipped to OpenCV here). Distorted photos are
undistorted to the pinhole camera with the same fx, fy, cx, cy (data.cameras.undistort_image).

The format carries no depth information, so near/far bounds are estimated from the cameras: each view's
depth d of the point the optical axes converge on (inward captures) gives [0.2 d, 2.5 d]; when the axes do not
converge in front of the cameras (forward-facing), d is 10x the cameras' spread. The estimate is logged.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pycolmap
from tqdm.auto import tqdm

from data.cameras import (OPENGL_TO_OPENCV, Undistorter, normalize_cameras, optical_axes_focus, pinhole_matrix,
                          resized_size)
from data.llff import IMAGE_SUFFIXES, _resize_float, image_size, read_image
from data.scene import Scene, SceneError, scene_kind

NEAR_FAR_OF_FOCUS_DEPTH = (0.2, 2.5)
RADIAL_KEYS, TANGENTIAL_KEYS = ("k1", "k2", "k3", "k4", "k5", "k6"), ("p1", "p2")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise SceneError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SceneError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list) or not data["frames"]:
        raise SceneError(f"{path} has no 'frames' list (each frame: file_path + transform_matrix)")
    return data


def common_image_size(paths: list[Path], where) -> tuple[int, int]:
    """(width, height) shared by every image, or one SceneError naming `where` and the first image that differs."""
    sizes = [image_size(p) for p in paths]
    for path, size in zip(paths, sizes):
        if size != sizes[0]:
            raise SceneError(f"{where}: images differ in size: {paths[0].name} is {sizes[0][0]}x{sizes[0][1]} "
                             f"but {path.name} is {size[0]}x{size[1]} (width x height)")
    return sizes[0]


def frame_image_path(json_path: Path, frame: dict, index: int) -> Path:
    """The photo of one frame; Blender-style file_paths without an extension try .png, .jpg, .jpeg."""
    if "file_path" not in frame:
        raise SceneError(f"{json_path}: frame {index} has no 'file_path'")
    path = json_path.parent / frame["file_path"]
    if path.is_file():
        return path
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        for suffix in (".png", ".jpg", ".jpeg"):
            if path.with_name(path.name + suffix).is_file():
                return path.with_name(path.name + suffix)
    raise SceneError(f"{json_path}: frame {index} references {frame['file_path']!r}, but {path} does not exist")


def frame_pose(json_path: Path, frame: dict, index: int) -> np.ndarray:
    """transform_matrix (OpenGL c2w, 3x4 or 4x4) -> OpenCV c2w [4, 4]."""
    try:
        matrix = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise SceneError(f"{json_path}: frame {index} has no numeric 'transform_matrix'") from None
    if matrix.shape not in ((4, 4), (3, 4)) or not np.isfinite(matrix).all():
        raise SceneError(f"{json_path}: frame {index} transform_matrix has shape {matrix.shape} or non-finite "
                         f"values; expected a finite 4x4 camera-to-world matrix")
    c2w = np.eye(4)
    c2w[:3] = matrix[:3]
    return c2w @ OPENGL_TO_OPENCV


def frame_camera(json_path: Path, meta: dict, frame: dict, index: int, width: int, height: int) -> pycolmap.Camera:
    """The frame's camera (its own keys override the file's) as a COLMAP camera at the photo's resolution."""
    def get(key, default=None):
        return frame.get(key, meta.get(key, default))

    w, h = get("w"), get("h")
    if (w is not None and int(round(float(w))) != width) or (h is not None and int(round(float(h))) != height):
        raise SceneError(f"{json_path}: frame {index} ({frame['file_path']}) is {width}x{height} but the json "
                         f"says w={w}, h={h}")
    fx = get("fl_x")
    if fx is None and get("camera_angle_x") is not None:
        fx = 0.5 * width / np.tan(0.5 * float(get("camera_angle_x")))
    fy = get("fl_y")
    if fy is None and get("camera_angle_y") is not None:
        fy = 0.5 * height / np.tan(0.5 * float(get("camera_angle_y")))
    if fx is None and fy is None:
        raise SceneError(f"{json_path}: no focal length for frame {index}: give fl_x/fl_y or camera_angle_x")
    fx, fy = float(fx if fx is not None else fy), float(fy if fy is not None else fx)
    cx, cy = float(get("cx", width / 2.0)), float(get("cy", height / 2.0))
    model = str(get("camera_model", "OPENCV")).upper()
    radial = [float(get(k, 0.0)) for k in RADIAL_KEYS]
    p1, p2 = (float(get(k, 0.0)) for k in TANGENTIAL_KEYS)
    if model == "OPENCV_FISHEYE":
        return pycolmap.Camera(model="OPENCV_FISHEYE", width=width, height=height,
                               params=[fx, fy, cx, cy, *radial[:4]])
    if model not in ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "PERSPECTIVE"):
        raise SceneError(f"{json_path}: camera_model {model!r} is not supported (OPENCV, OPENCV_FISHEYE, PINHOLE); "
                         f"undistort the photos to a pinhole camera first")
    if any(radial[2:]):
        return pycolmap.Camera(model="FULL_OPENCV", width=width, height=height,
                               params=[fx, fy, cx, cy, radial[0], radial[1], p1, p2, *radial[2:]])
    if any(radial[:2]) or p1 or p2:
        return pycolmap.Camera(model="OPENCV", width=width, height=height,
                               params=[fx, fy, cx, cy, radial[0], radial[1], p1, p2])
    return pycolmap.Camera(model="PINHOLE", width=width, height=height, params=[fx, fy, cx, cy])


def estimated_bounds(c2w: np.ndarray) -> np.ndarray:
    """[N, 2] near/far from the cameras alone (see the module docstring). c2w: [N, 4, 4] OpenCV."""
    centres = c2w[:, :3, 3]
    spread = float(np.linalg.norm(centres - centres.mean(0), axis=1).max()) or 1.0
    focus = optical_axes_focus(c2w)
    depth = np.einsum("nk,nk->n", focus[None] - centres, c2w[:, :3, 2])
    if (depth <= 0.05 * spread).any() or depth.max() > 100 * spread:
        depth = np.full(len(c2w), 10.0 * spread)
    near, far = NEAR_FAR_OF_FOCUS_DEPTH
    return np.stack([near * depth, far * depth], axis=1)


def load_transforms_scene(root, factor: int = 1, llffhold: int = 8, json_name: str = "transforms.json",
                          progress: bool = False) -> Scene:
    """root/transforms.json -> Scene; every llffhold-th frame (in file order) is held out; images / factor."""
    root = Path(root)
    json_path = root / json_name
    meta = read_json(json_path)
    frames = meta["frames"]
    if len(frames) < 2:
        raise SceneError(f"{json_path} has {len(frames)} frame; a scene needs at least 2")
    paths = [frame_image_path(json_path, frame, i) for i, frame in enumerate(frames)]
    c2w = np.stack([frame_pose(json_path, frame, i) for i, frame in enumerate(frames)])
    width, height = common_image_size(paths, json_path)
    target = resized_size(width, height, factor)
    images, K = [], []
    undistort = Undistorter()
    for index, (frame, path) in enumerate(tqdm(list(zip(frames, paths)), desc="read transforms.json views",
                                               disable=not progress, leave=False)):
        camera = frame_camera(json_path, meta, frame, index, width, height)
        pixels = read_image(path)
        if camera.model.name not in ("PINHOLE", "SIMPLE_PINHOLE"):
            pixels = undistort(pixels, camera)
        if target != (width, height):
            pixels = _resize_float(pixels, target)
        images.append(pixels)
        K.append(pinhole_matrix(camera.focal_length_x, camera.focal_length_y, camera.principal_point_x,
                                camera.principal_point_y, target[0] / width, target[1] / height))
    kind = scene_kind(c2w)
    bounds = estimated_bounds(c2w)
    warnings.warn(f"{json_path}: the format has no depths; near/far estimated from the cameras as "
                  f"{NEAR_FAR_OF_FOCUS_DEPTH[0]}..{NEAR_FAR_OF_FOCUS_DEPTH[1]} x the depth their optical axes "
                  f"converge at ({bounds[:, 0].min():.3g}..{bounds[:, 1].max():.3g} in the json's units)", stacklevel=2)
    c2w, bounds = normalize_cameras(c2w, bounds, kind)
    ids = np.arange(len(frames), dtype=np.int64)
    test_ids = ids[::llffhold] if llffhold > 0 else ids[:0]
    return Scene(name=root.name, root=root, images=np.stack(images).astype(np.float32), c2w=c2w.astype(np.float32),
                 intrinsics=np.stack(K).astype(np.float32), bounds=bounds.astype(np.float32),
                 train_ids=np.setdiff1d(ids, test_ids), test_ids=test_ids, image_paths=[str(p) for p in paths],
                 kind=kind, source_format="transforms")
