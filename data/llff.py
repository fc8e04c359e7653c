"""LLFF forward-facing scenes: poses_bounds.npy + images_<factor>/ -> Scene (OpenCV cameras, rescaled, recentred).

poses_bounds.npy holds N rows of 17 numbers: a 3x5 matrix (row-major) whose columns are the camera-to-world
rotation in LLFF's [down, right, back] axis order, the camera centre, and [H, W, focal] at full resolution;
then the view's near and far depth bounds.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from data.scene import Scene, SceneError, scene_kind

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
GRAYSCALE_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def llff_rescale_factor(bounds: np.ndarray, bd_factor: float = 0.75) -> float:
    """NeRF's scene scale: world units x this put the nearest bound at 1 / bd_factor. bounds: [N, 2]."""
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


# ------------------------------------------------------------------------------------------ poses_bounds.npy

def read_poses_bounds(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (c2w_llff [N, 3, 4] in [down, right, back] order, hwf [N, 3] at full resolution, bounds [N, 2])."""
    path = Path(root) / "poses_bounds.npy"
    if not path.is_file():
        raise SceneError(f"{path} is missing: an LLFF scene folder needs poses_bounds.npy (N x 17)")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:
        raise SceneError(f"{path} cannot be read as a numpy array ({type(err).__name__}: {err})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != 17 or array.shape[0] == 0:
        shape = getattr(array, "shape", "an archive")
        raise SceneError(f"{path} has shape {shape}; expected (N, 17): a 3x5 pose and near/far per view")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise SceneError(f"{path} holds {array.dtype} values; expected real numbers (float64)")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        rows = sorted(set(np.argwhere(~np.isfinite(array))[:, 0].tolist()))
        raise SceneError(f"{path} has non-finite values (NaN/inf) in rows {rows}")
    poses, bounds = array[:, :15].reshape(-1, 3, 5), array[:, 15:17]
    if (bounds <= 0).any() or (bounds[:, 0] >= bounds[:, 1]).any():
        raise SceneError(f"{path}: near/far bounds must be positive with near < far; "
                         f"got near {bounds[:, 0].min():.4g}..{bounds[:, 0].max():.4g}, far min {bounds[:, 1].min():.4g}")
    if (poses[:, :, 4] <= 0).any():
        raise SceneError(f"{path}: the [H, W, focal] column must be positive; got min {poses[:, :, 4].min():.4g}")
    return poses[:, :, :4], poses[:, :, 4], bounds


# ------------------------------------------------------------------------------------------------- images

def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def find_image_files(root: Path, factor: int) -> tuple[Path, list[Path], bool]:
    """-> (folder, sorted image paths, whether they must be resized by 1 / factor): images_<factor>/, else images/."""
    folder = root / ("images" if factor == 1 else f"images_{factor}")
    resize = False
    if not folder.is_dir():
        folder, resize = root / "images", True
        if not folder.is_dir():
            raise SceneError(f"{root} has neither images_{factor}/ nor images/: no images to load")
    paths = list_images(folder)
    if not paths:
        raise SceneError(f"{folder} contains no .png/.jpg/.jpeg images")
    return folder, paths, resize


def _unreadable(path: Path, err: Exception) -> SceneError:
    return SceneError(f"{path} cannot be read as an image ({type(err).__name__}: {err})")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as err:
        raise _unreadable(path, err) from None


def _resize_float(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, C] float -> [h, w, C] with PIL's Lanczos on 32-bit float channels (keeps 16-bit precision)."""
    channels = [Image.fromarray(np.ascontiguousarray(array[..., c]), "F").resize(size, Image.Resampling.LANCZOS)
                for c in range(array.shape[-1])]
    return np.clip(np.stack([np.asarray(c) for c in channels], axis=-1), 0.0, 1.0)


def read_image(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """-> float32 [H, W, 3] in [0, 1], resized to size = (width, height) if given.

    Grayscale (8/16-bit) is replicated to RGB with a warning; palette/CMYK/YCbCr are converted to RGB;
    images with alpha are refused. 16-bit grayscale keeps its precision; Pillow reads 16-bit RGB PNGs
    at 8 bits per channel (correctly scaled).
    """
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
                what = "RGBA (4 channels)" if mode == "RGBA" else f"{mode} (has an alpha channel)"
                raise SceneError(f"{path} is {what}: flatten the alpha or convert to RGB")
            if mode in GRAYSCALE_MODES:
                warnings.warn(f"{path} is grayscale ({mode}); replicating it to 3 channels", stacklevel=3)
            elif mode != "RGB":
                image = image.convert("RGB")
            if size is not None and image.mode in ("RGB", "L"):
                image = image.resize(size, Image.Resampling.LANCZOS)  # 8-bit: PIL's fast path
            array = np.asarray(image)
    except SceneError:
        raise
    except Exception as err:
        raise _unreadable(path, err) from None
    if mode.startswith("I"):
        array = array.astype(np.float32) / 65535.0  # 16-bit PNGs (mode I;16 or I)
    elif array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    else:  # bilevel (bool) or float
        array = np.clip(array.astype(np.float32), 0.0, 1.0)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if size is not None and array.shape[:2] != (size[1], size[0]):
        array = _resize_float(array, size)
    return array.astype(np.float32)


def load_images(folder: Path, paths: list[Path], resize_factor: int | None) -> np.ndarray:
    """All images of one size -> [N, H, W, 3] float32; sizes are checked from headers before decoding."""
    sizes = [image_size(p) for p in paths]
    for path, size in zip(paths, sizes):
        if size != sizes[0]:
            raise SceneError(f"{folder}: images differ in size: {paths[0].name} is {sizes[0][0]}x{sizes[0][1]} "
                             f"but {path.name} is {size[0]}x{size[1]} (width x height)")
    target = None
    if resize_factor:
        width, height = sizes[0]
        target = (max(1, round(width / resize_factor)), max(1, round(height / resize_factor)))
    return np.stack([read_image(p, target) for p in paths])


# ------------------------------------------------------------------------------------------------- loader

def load_llff_scene(root, factor: int = 8, llffhold: int = 8, bd_factor: float = 0.75, recenter: bool = True) -> Scene:
    """Load an LLFF scene; held-out views are every llffhold-th (0, 8, 16, ... as in NeRF/GNT).

    Cameras follow NeRF's LLFF handling (to OpenGL [right, up, back], rescale by llff_rescale_factor,
    recentre on the average pose), then are flipped to the project's OpenCV convention.
    """
    root = Path(root)
    if not root.is_dir():
        raise SceneError(f"scene folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
    c2w_llff, hwf, bounds = read_poses_bounds(root)
    folder, paths, resize = find_image_files(root, factor)
    full = root / "images"
    if len(paths) != len(c2w_llff) and not resize and factor != 1 and full.is_dir():
        full_paths = list_images(full)
        if len(full_paths) == len(c2w_llff):
            warnings.warn(f"{root}: {folder.name}/ holds {len(paths)} images but poses_bounds.npy has "
                          f"{len(c2w_llff)} poses; images/ agrees ({len(full_paths)} images), so using it resized "
                          f"by 1/{factor}", stacklevel=2)
            folder, paths, resize = full, full_paths, True
    if len(paths) != len(c2w_llff):
        raise SceneError(f"{root}: {len(paths)} images in {folder.name}/ but {len(c2w_llff)} poses in poses_bounds.npy")
    images = load_images(folder, paths, factor if resize and factor != 1 else None)

    height, width = images.shape[1:3]
    aspect_full = hwf[:, 0] / hwf[:, 1]
    if np.abs(aspect_full - height / width).max() > 0.02 * height / width:
        warnings.warn(f"{root}: images are {width}x{height} but poses_bounds.npy says full resolution "
                      f"{hwf[0, 1]:.0f}x{hwf[0, 0]:.0f} (different aspect ratio); focal is scaled by width")

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

    focal = hwf[:, 2] * width / hwf[:, 1]
    K = np.zeros((len(images), 3, 3))
    K[:, 0, 0] = K[:, 1, 1] = focal
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = width / 2.0, height / 2.0, 1.0

    ids = np.arange(len(images), dtype=np.int64)
    test_ids = ids[::llffhold] if llffhold > 0 else ids[:0]
    train_ids = np.setdiff1d(ids, test_ids)
    return Scene(name=root.name, root=root, images=images, c2w=c2w.astype(np.float32), intrinsics=K.astype(np.float32),
                 bounds=bounds.astype(np.float32), train_ids=train_ids, test_ids=test_ids,
                 image_paths=[str(p) for p in paths], kind=scene_kind(c2w))
