"""A folder of photos -> an LLFF-format scene, with COLMAP's structure-from-motion through pycolmap (CPU).

Steps: SIFT features (one shared SIMPLE_RADIAL camera), matching (exhaustive up to EXHAUSTIVE_MAX_IMAGES photos,
sequential with loop-free overlap beyond, for video frames in name order), incremental mapping, undistortion to
a pinhole camera, then per-view near/far from the depths of the sparse points each view sees (0.1 / 99.9
percentiles, as LLFF's imgs2poses). Written into the scene folder:

  poses_bounds.npy    LLFF poses + bounds (hwf at images/ resolution)
  images/             the undistorted photos;  images_<factor>/: them downscaled (factor > 1)
  sparse/0/           the undistorted (PINHOLE) COLMAP model, readable with data.format=colmap
  prepare.json        the report: views registered, mean reprojection error, points, focal, scene kind
  colmap/             COLMAP's database and raw (distorted) model, kept for inspection
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pycolmap
from PIL import Image
from tqdm.auto import tqdm

from data.cameras import bounds_from_points, resized_size
from data.llff import IMAGE_SUFFIXES, image_size
from data.scene import SceneError, scene_kind, view_spread_degrees

EXHAUSTIVE_MAX_IMAGES = 150
MIN_MODEL_SIZE = 3  # report splits down to 3 views instead of COLMAP's default 10 (which would hide them)


class PrepareError(SceneError):
    """The photos cannot become a scene; the message says which photos and what to try."""


def list_photos(images_dir: Path) -> list[Path]:
    """The photos to reconstruct, sorted by name; refuses an empty/missing folder, one photo, mixed sizes."""
    if not images_dir.is_dir():
        raise PrepareError(f"--images {images_dir} is not a folder of photos")
    photos = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not photos:
        raise PrepareError(f"{images_dir} contains no .png/.jpg/.jpeg photos")
    if len(photos) == 1:
        raise PrepareError(f"{images_dir} contains one photo ({photos[0].name}); structure from motion needs several "
                           f"overlapping photos of the scene (20 or more work well)")
    sizes = {p: image_size(p) for p in photos}
    first = photos[0]
    for photo, size in sizes.items():
        if size != sizes[first]:
            raise PrepareError(f"{images_dir}: photos differ in size: {first.name} is {sizes[first][0]}x{sizes[first][1]} "
                               f"but {photo.name} is {size[0]}x{size[1]}; one camera needs one size (resize them alike)")
    return photos


class Stages:
    """The progress bar's steps and their wall seconds: `with stages("features", "prepare: SIFT features"): ...`
    names the step on the bar, times it into `stages.seconds` and advances the bar when it finishes."""

    def __init__(self, bar):
        self.bar, self.seconds = bar, {}

    @contextmanager
    def __call__(self, name: str, description: str):
        self.bar.set_description(description)
        tic = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - tic, 2)
        self.bar.update()


def run_sfm(images_dir: Path, photos: list[Path], work: Path, threads: int, stages: Stages) -> pycolmap.Reconstruction:
    """Features, matching and incremental mapping -> the reconstruction (or PrepareError naming what failed)."""
    database = work / "database.db"
    database.unlink(missing_ok=True)
    names = [p.name for p in photos]
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "SIMPLE_RADIAL"
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = threads
    with stages("features", "prepare: SIFT features"):
        pycolmap.extract_features(database, images_dir, image_names=names, camera_mode=pycolmap.CameraMode.SINGLE,
                                  reader_options=reader, extraction_options=extraction, device=pycolmap.Device.cpu)
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = threads
    exhaustive = len(photos) <= EXHAUSTIVE_MAX_IMAGES
    with stages("matching", f"prepare: exhaustive matching ({len(photos)} photos)" if exhaustive else
                f"prepare: sequential matching ({len(photos)} photos, in name order)"):
        match = pycolmap.match_exhaustive if exhaustive else pycolmap.match_sequential
        match(database, matching_options=matching, device=pycolmap.Device.cpu)
    mapping = pycolmap.IncrementalPipelineOptions()
    mapping.num_threads = threads
    mapping.min_model_size = MIN_MODEL_SIZE
    mapping.random_seed = 0
    sparse = work / "sparse"
    shutil.rmtree(sparse, ignore_errors=True)
    sparse.mkdir(parents=True)
    with stages("mapping", "prepare: incremental mapping"):
        models = pycolmap.incremental_mapping(database, images_dir, sparse, options=mapping)
    if not models:
        raise PrepareError(f"{images_dir}: no two photos could be matched into a model ({len(photos)} photos): "
                           f"they need more overlap and texture (move less between shots, avoid blank walls, "
                           f"glass and moving objects)")
    if len(models) > 1:
        groups = sorted((sorted(image.name for image in model.images.values() if image.has_pose)
                         for model in models.values()), key=len, reverse=True)
        listing = "; ".join(f"model {i}: {_short_list(g)}" for i, g in enumerate(groups))
        raise PrepareError(f"{images_dir}: the capture splits into {len(models)} separate models ({listing}). "
                           f"Add photos that bridge these groups, or prepare each group on its own")
    model = next(iter(models.values()))
    registered = {image.name for image in model.images.values() if image.has_pose}
    missing = [n for n in names if n not in registered]
    if missing:
        raise PrepareError(f"{images_dir}: {len(missing)} of {len(photos)} photos could not be registered: "
                           f"{_short_list(missing)}. Remove them (blurred, or seeing too little of the rest), or "
                           f"add photos between them and their neighbours")
    return model


def _short_list(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def write_llff_scene(model: pycolmap.Reconstruction, undistorted_images: Path, out: Path, factor: int) -> dict:
    """An undistorted (pinhole) model + its images -> poses_bounds.npy, images/, images_<factor>/. -> facts."""
    images = sorted((image for image in model.images.values() if image.has_pose), key=lambda image: image.name)
    cameras = {image.camera_id for image in images}
    if len(cameras) != 1:
        raise PrepareError(f"{out}: the model has {len(cameras)} cameras; prepare writes one shared camera")
    camera = model.cameras[cameras.pop()]
    fx, fy, cx, cy = camera.focal_length_x, camera.focal_length_y, camera.principal_point_x, camera.principal_point_y
    width, height = camera.width, camera.height
    c2w = []
    for image in images:
        w2c = np.eye(4)
        w2c[:3] = image.cam_from_world().matrix()
        c2w.append(np.linalg.inv(w2c))
    c2w = np.stack(c2w)
    point_ids = np.array(sorted(model.points3D.keys()), dtype=np.int64)
    points = np.stack([model.points3D[int(i)].xyz for i in point_ids])
    index_of = {int(pid): k for k, pid in enumerate(point_ids)}
    visible = [np.array([index_of[p.point3D_id] for p in image.get_observation_points2D()], dtype=np.int64)
               for image in images]
    bounds = bounds_from_points(c2w, points, visible, str(out / "sparse" / "0"))

    # OpenCV [right, down, forward] columns -> LLFF [down, right, back], plus [H, W, focal]
    llff = np.stack([c2w[:, :3, 1], c2w[:, :3, 0], -c2w[:, :3, 2], c2w[:, :3, 3]], axis=-1)
    hwf = np.broadcast_to(np.array([height, width, 0.5 * (fx + fy)])[None, :, None], (len(images), 3, 1))
    poses_bounds = np.concatenate([np.concatenate([llff, hwf], axis=-1).reshape(len(images), 15), bounds], axis=1)
    np.save(out / "poses_bounds.npy", poses_bounds)

    (out / "images").mkdir(exist_ok=True)
    for image in images:
        shutil.copy2(undistorted_images / image.name, out / "images" / image.name)
    if factor > 1:
        folder = out / f"images_{factor}"
        folder.mkdir(exist_ok=True)
        size = resized_size(width, height, factor)
        for image in images:
            with Image.open(undistorted_images / image.name) as photo:
                photo.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(folder / (Path(image.name).stem + ".png"))
    return {"width": width, "height": height, "fx": fx, "fy": fy, "cx": cx, "cy": cy,
            "near": float(bounds[:, 0].min()), "far": float(bounds[:, 1].max()),
            "scene_kind": scene_kind(c2w), "view_spread_degrees": round(view_spread_degrees(c2w), 2)}


def prepare_scene(images_dir, out, factor: int = 4, threads: int = -1, progress: bool = True,
                  overwrite: bool = False) -> dict:
    """Photos in images_dir -> an LLFF scene in out (see the module docstring). -> the report (also prepare.json)."""
    images_dir, out = Path(images_dir).resolve(), Path(out)
    if factor < 1:
        raise PrepareError(f"--factor must be >= 1, got {factor}")
    if (out / "poses_bounds.npy").exists() and not overwrite:
        raise PrepareError(f"{out} already holds a prepared scene (poses_bounds.npy); pass --overwrite to redo it "
                           f"(nothing was changed)")
    if images_dir == (out / "images").resolve() or images_dir == out.resolve():
        raise PrepareError(f"--images {images_dir} lies where the scene's undistorted images/ go; give another "
                           f"--out (e.g. {out.name}_prepared)")
    photos = list_photos(images_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / "images", out / f"images_{factor}"):
        shutil.rmtree(stale, ignore_errors=True)  # only reached for a fresh folder or with --overwrite
    work = out / "colmap"
    work.mkdir(exist_ok=True)
    pycolmap.logging.minloglevel = 2  # COLMAP's per-step INFO lines would drown the progress bar
    tic = time.perf_counter()
    with tqdm(total=5, desc="prepare", disable=not progress, unit="step") as bar:
        stages = Stages(bar)
        model = run_sfm(images_dir, photos, work, threads, stages)
        undistorted = work / "undistorted"
        with stages("undistortion", "prepare: undistortion"):
            shutil.rmtree(undistorted, ignore_errors=True)
            model_dir = work / "sparse" / "0"
            model.write(model_dir)
            pycolmap.undistort_images(undistorted, model_dir, images_dir, num_threads=threads)
        with stages("writing", "prepare: writing the scene"):
            pinhole = pycolmap.Reconstruction(undistorted / "sparse")
            shutil.rmtree(out / "sparse", ignore_errors=True)
            (out / "sparse" / "0").mkdir(parents=True)
            pinhole.write(out / "sparse" / "0")
            facts = write_llff_scene(pinhole, undistorted / "images", out, factor)
    report = {
        "images": str(images_dir), "scene": str(out), "photos": len(photos), "registered": pinhole.num_reg_images(),
        "points": pinhole.num_points3D(), "mean_reprojection_error_px": round(model.compute_mean_reprojection_error(), 4),
        "mean_track_length": round(model.compute_mean_track_length(), 3), "factor": factor,
        "distorted_camera": {"model": model.cameras[next(iter(model.cameras))].model.name,
                             "params": [float(x) for x in model.cameras[next(iter(model.cameras))].params]},
        **facts, "seconds": round(time.perf_counter() - tic, 2), "stage_seconds": stages.seconds,
        "load_average": [round(x, 2) for x in os.getloadavg()], "pycolmap": pycolmap.__version__,
    }
    (out / "prepare.json").write_text(json.dumps(report, indent=2))
    return report
