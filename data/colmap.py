"""COLMAP sparse models (binary or text: cameras, images, points3D) + their photos -> Scene.

Read with pycolmap (COLMAP's own reader, both encodings, old and new text layouts). Per view: full pinhole
intrinsics (fx, fy, cx, cy, so an off-centre principal point is kept), the pose, and near/far bounds from the
depths of the sparse points it sees (LLFF's percentile rule). Distorted camera models (SIMPLE_RADIAL, OPENCV,
...) are undistorted here to the pinhole camera with the same fx, fy, cx, cy (data.cameras.undistort_image).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pycolmap
from tqdm.auto import tqdm

from data.cameras import Undistorter, bounds_from_points, normalize_cameras, pinhole_matrix, resized_size
from data.llff import _resize_float, image_size, read_image
from data.scene import Scene, SceneError, scene_kind

MODEL_FILES = ("cameras", "images", "points3D")
PINHOLE_MODELS = {"SIMPLE_PINHOLE", "PINHOLE"}


def find_model_folder(root: Path) -> Path | None:
    """The folder holding cameras/images/points3D (.bin or .txt): sparse/0, sparse, or the scene folder itself."""
    for folder in (root / "sparse" / "0", root / "sparse", root):
        for ext in (".bin", ".txt"):
            if all((folder / f"{name}{ext}").is_file() for name in MODEL_FILES):
                return folder
    return None


def find_image_folder(root: Path) -> Path:
    folder = root / "images"
    if not folder.is_dir():
        raise SceneError(f"{root} has a COLMAP model but no images/ folder with the photos it was built from")
    return folder


def read_model(folder: Path) -> pycolmap.Reconstruction:
    try:
        return pycolmap.Reconstruction(str(folder))
    except Exception as err:  # pycolmap raises plain RuntimeError/ValueError with COLMAP's message
        raise SceneError(f"{folder}: cannot read the COLMAP model ({type(err).__name__}: {err})") from None


def load_colmap_scene(root, factor: int = 1, llffhold: int = 8, progress: bool = False) -> Scene:
    """A COLMAP model in root (sparse/0, sparse or root) with photos in root/images -> Scene.

    Views are the registered images sorted by name; every llffhold-th is held out; images are resized by
    1 / factor. Cameras are rescaled/recentred like LLFF scenes (data.cameras.normalize_cameras).
    """
    root = Path(root)
    folder = find_model_folder(root)
    if folder is None:
        raise SceneError(f"{root}: no COLMAP model (cameras, images, points3D as .bin or .txt) in sparse/0/, "
                         f"sparse/ or the folder itself")
    model = read_model(folder)
    image_folder = find_image_folder(root)
    registered = sorted((image for image in model.images.values() if image.has_pose), key=lambda image: image.name)
    if len(registered) < 2:
        raise SceneError(f"{folder}: {len(registered)} registered image(s); a scene needs at least 2")
    missing = [image.name for image in registered if not (image_folder / image.name).is_file()]
    if missing:
        raise SceneError(f"{folder} references {len(missing)} image(s) missing from {image_folder}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")

    point_ids = np.array(sorted(model.points3D.keys()), dtype=np.int64)
    if len(point_ids) == 0:
        raise SceneError(f"{folder}: the model has no 3D points; near/far bounds cannot be derived")
    points = np.stack([model.points3D[int(i)].xyz for i in point_ids])
    index_of = {int(pid): k for k, pid in enumerate(point_ids)}

    c2w, K, images, visible, sizes = [], [], [], [], set()
    undistort = Undistorter()
    for image in tqdm(registered, desc="read COLMAP views", disable=not progress, leave=False):
        camera = model.cameras[image.camera_id]
        path = image_folder / image.name
        width, height = image_size(path)
        if (width, height) != (camera.width, camera.height):
            raise SceneError(f"{path} is {width}x{height} but its COLMAP camera {image.camera_id} is "
                             f"{camera.width}x{camera.height}: the model was built from other images")
        target = resized_size(width, height, factor)
        pixels = read_image(path)
        if camera.model.name not in PINHOLE_MODELS:
            pixels = undistort(pixels, camera)
        if target != (width, height):
            pixels = _resize_float(pixels, target)
        images.append(pixels)
        sizes.add(target)
        K.append(pinhole_matrix(camera.focal_length_x, camera.focal_length_y, camera.principal_point_x,
                                camera.principal_point_y, target[0] / width, target[1] / height))
        w2c = np.eye(4)
        w2c[:3] = image.cam_from_world().matrix()
        c2w.append(np.linalg.inv(w2c))
        visible.append(np.array([index_of[p.point3D_id] for p in image.get_observation_points2D()], dtype=np.int64))
    if len(sizes) > 1:
        raise SceneError(f"{image_folder}: the photos have different sizes {sorted(sizes)} after 1/{factor} "
                         f"downscaling; a scene needs one image size (crop or resize them alike)")
    c2w = np.stack(c2w)
    bounds = bounds_from_points(c2w, points, visible, str(folder))
    kind = scene_kind(c2w)
    c2w, bounds = normalize_cameras(c2w, bounds, kind)
    ids = np.arange(len(registered), dtype=np.int64)
    test_ids = ids[::llffhold] if llffhold > 0 else ids[:0]
    return Scene(name=root.name, root=root, images=np.stack(images).astype(np.float32), c2w=c2w.astype(np.float32),
                 intrinsics=np.stack(K).astype(np.float32), bounds=bounds.astype(np.float32),
                 train_ids=np.setdiff1d(ids, test_ids), test_ids=test_ids,
                 image_paths=[str(image_folder / image.name) for image in registered], kind=kind, source_format="colmap")
