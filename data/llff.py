"""LLFF forward-facing scenes: poses_bounds.npy + images_<factor>/ -> Scene (OpenCV cameras, rescaled, recentred).

poses_bounds.npy holds N rows of 17 numbers: a 3x5 matrix (row-major) whose columns are the camera-to-world
rotation in LLFF's [down, right, back] axis order, the camera centre, and [H, W, focal] at full resolution;
then the view's near and far depth bounds.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data.scene import Scene, SceneError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def llff_rescale_factor(bounds: np.ndarray, bd_factor: float = 0.75) -> float:
    """NeRF's scene scale: the nearest bound lands at 1 / bd_factor after rescaling."""
    return float(1.0 / (np.min(bounds) * bd_factor))


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def average_pose(c2w: np.ndarray) -> np.ndarray:
    """[N, 4, 4] OpenGL-style (right, up, back) poses -> their average pose [4, 4] (NeRF's poses_avg)."""
    centre = c2w[:, :3, 3].mean(axis=0)
    back = _normalize(c2w[:, :3, 2].sum(axis=0))
    up = c2w[:, :3, 1].sum(axis=0)
    right = _normalize(np.cross(up, back))
    up = _normalize(np.cross(back, right))
    avg = np.eye(4)
    avg[:3, :3] = np.stack([right, up, back], axis=1)
    avg[:3, 3] = centre
    return avg


def read_poses_bounds(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (c2w_llff [N, 3, 4] in [down, right, back] order, hwf [N, 3] at full resolution, bounds [N, 2])."""
    path = root / "poses_bounds.npy"
    if not path.is_file():
        raise SceneError(f"{path} is missing: an LLFF scene folder needs poses_bounds.npy (N x 17)")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:
        raise SceneError(f"{path} cannot be read as a numpy array ({type(err).__name__}: {err})") from None
    if array.ndim != 2 or array.shape[1] != 17 or array.shape[0] == 0:
        raise SceneError(f"{path} has shape {array.shape}; expected (N, 17): a 3x5 pose and near/far per view")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        rows = sorted(set(np.argwhere(~np.isfinite(array))[:, 0].tolist()))
        raise SceneError(f"{path} has non-finite values (NaN/inf) in rows {rows}")
    bounds = array[:, 15:17]
    if (bounds <= 0).any() or (bounds[:, 0] >= bounds[:, 1]).any():
        raise SceneError(f"{path}: near/far bounds must be positive with near < far; got min {bounds.min():.4g}")
    poses = array[:, :15].reshape(-1, 3, 5)
    return poses[:, :, :4], poses[:, :, 4], bounds


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def read_image(path: Path, resize_to: tuple[int, int] | None = None) -> np.ndarray:
    """-> float32 [H, W, 3] in [0, 1]. Grayscale is replicated to RGB (with a warning); RGBA is refused."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
                raise SceneError(f"{path} is RGBA (has an alpha channel): flatten the alpha or convert it to RGB")
            if mode in ("L", "I", "I;16", "I;16B", "I;16L", "F", "1"):
                warnings.warn(f"{path} is grayscale ({mode}); replicating it to 3 channels")
            if resize_to is not None:
                image = image.resize(resize_to, Image.LANCZOS)
            array = np.asarray(image)
    except SceneError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise SceneError(f"{path} cannot be read as an image ({type(err).__name__}: {err})") from None
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype in (np.uint16, np.int32) or mode.startswith("I"):
        array = array.astype(np.float32) / 65535.0
    elif array.dtype == bool:
        array = array.astype(np.float32)
    else:
        array = np.clip(array.astype(np.float32), 0.0, 1.0)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.shape[-1] != 3:
        raise SceneError(f"{path} has {array.shape[-1]} channels; expected RGB")
    return array


def load_images(root: Path, factor: int) -> tuple[np.ndarray, list[str]]:
    """images_<factor>/ if present, else images/ resized by 1 / factor (in memory, with PIL)."""
    folder = root / ("images" if factor == 1 else f"images_{factor}")
    resize = False
    if not folder.is_dir():
        folder, resize = root / "images", factor != 1
        if not folder.is_dir():
            raise SceneError(f"{root} has neither images_{factor}/ nor images/: no images to load")
    paths = list_images(folder)
    if not paths:
        raise SceneError(f"{folder} contains no .png/.jpg images")
    size = None
    if resize:
        with Image.open(paths[0]) as first:
            size = (max(1, round(first.width / factor)), max(1, round(first.height / factor)))
    images = [read_image(p, size) for p in paths]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        odd = next(p for p, im in zip(paths, images) if im.shape != images[0].shape)
        raise SceneError(f"{folder}: images differ in size ({images[0].shape[:2]} vs {odd.name}: {shapes - {images[0].shape}})")
    return np.stack(images), [str(p) for p in paths]


def load_llff_scene(root, factor: int = 8, llffhold: int = 8, bd_factor: float = 0.75, recenter: bool = True) -> Scene:
    """Load an LLFF scene; held-out views are every llffhold-th (0, 8, 16, ... as in NeRF/GNT)."""
    root = Path(root)
    if not root.is_dir():
        raise SceneError(f"scene folder {root} does not exist")
    c2w_llff, hwf, bounds = read_poses_bounds(root)
    images, paths = load_images(root, factor)
    if len(images) != len(c2w_llff):
        raise SceneError(f"{root}: {len(images)} images in {Path(paths[0]).parent.name}/ but {len(c2w_llff)} poses in poses_bounds.npy")

    # [down, right, back] -> OpenGL [right, up, back]
    c2w = np.zeros((len(c2w_llff), 4, 4))
    c2w[:, :3, 0] = c2w_llff[:, :, 1]
    c2w[:, :3, 1] = -c2w_llff[:, :, 0]
    c2w[:, :3, 2] = c2w_llff[:, :, 2]
    c2w[:, :3, 3] = c2w_llff[:, :, 3]
    c2w[:, 3, 3] = 1.0
    scale = llff_rescale_factor(bounds, bd_factor)
    c2w[:, :3, 3] *= scale
    bounds = bounds * scale
    if recenter:
        c2w = np.linalg.inv(average_pose(c2w))[None] @ c2w
    c2w = c2w @ np.diag([1.0, -1.0, -1.0, 1.0])  # OpenGL -> OpenCV (x right, y down, z forward)

    height, width = images.shape[1:3]
    focal = hwf[:, 2] * width / hwf[:, 1]
    K = np.zeros((len(images), 3, 3))
    K[:, 0, 0] = K[:, 1, 1] = focal
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = width / 2.0, height / 2.0, 1.0

    ids = np.arange(len(images))
    test_ids = ids[::llffhold] if llffhold > 0 else ids[:0]
    train_ids = np.setdiff1d(ids, test_ids)
    return Scene(name=root.name, root=root, images=images, c2w=c2w.astype(np.float32), intrinsics=K.astype(np.float32),
                 bounds=bounds.astype(np.float32), train_ids=train_ids, test_ids=test_ids, image_paths=paths)
