"""Which reader a scene folder needs (data.format: auto | llff | colmap | transforms | blender), and loading it.

Detection (auto), first match wins:
  poses_bounds.npy                                  -> llff        (data/llff.py)
  transforms_train.json (+ transforms_test.json)     -> blender     (data/blender.py, NeRF-synthetic)
  transforms.json                                   -> transforms  (data/transforms_json.py, nerfstudio/instant-ngp)
  cameras/images/points3D .bin|.txt in sparse/0/, sparse/ or the folder -> colmap (data/colmap.py)
"""
from __future__ import annotations

from pathlib import Path

from data.blender import load_blender_scene
from data.colmap import find_model_folder, load_colmap_scene
from data.llff import load_llff_scene
from data.scene import AROUND_360, Scene, SceneError, view_spread_degrees
from data.transforms_json import load_transforms_scene

FORMATS = ("llff", "colmap", "transforms", "blender")


def detect_format(root: Path) -> str:
    """The format of a scene folder, from the files in it (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise SceneError(f"scene folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
    if (root / "poses_bounds.npy").is_file():
        return "llff"
    if (root / "transforms_train.json").is_file():
        return "blender"
    if (root / "transforms.json").is_file():
        return "transforms"
    if find_model_folder(root) is not None:
        return "colmap"
    raise SceneError(f"{root}: cannot tell the scene format: none of poses_bounds.npy (LLFF), transforms_train.json "
                     f"(NeRF-synthetic), transforms.json (nerfstudio/instant-ngp) or a COLMAP model "
                     f"(sparse/0/cameras.bin ...) is there. For a folder of photos run "
                     f"`python run_nerf.py prepare --images DIR --out SCENE` first")


def load_any_scene(root, fmt: str = "auto", factor: int = 4, llffhold: int = 8, progress: bool = False) -> Scene:
    """Load a scene folder in any supported format (fmt forces one). describe_scene(scene) is the line to log."""
    root = Path(root)
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt == "llff":
        scene = load_llff_scene(root, factor=factor, llffhold=llffhold)
    elif fmt == "colmap":
        scene = load_colmap_scene(root, factor=factor, llffhold=llffhold, progress=progress)
    elif fmt == "transforms":
        scene = load_transforms_scene(root, factor=factor, llffhold=llffhold, progress=progress)
    elif fmt == "blender":
        scene = load_blender_scene(root, factor=factor, progress=progress)
    else:
        raise SceneError(f"unknown scene format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    if scene.num_views < 2 or len(scene.train_ids) < 1:
        raise SceneError(f"{root}: {scene.num_views} view(s), {len(scene.train_ids)} for training; a scene needs "
                         f"at least 2 views and 1 training view")
    return scene


def describe_scene(scene: Scene) -> str:
    """One line for the logs: format, size, the measured kind and the sampling it implies."""
    sampling = "linear in depth" if scene.kind == AROUND_360 else "inverse depth"
    near, far = scene.depth_range()
    return (f"scene {scene.root}: {scene.source_format} format, {scene.num_views} views "
            f"({len(scene.train_ids)} train / {len(scene.test_ids)} held out) at {scene.width}x{scene.height}, "
            f"kind {scene.kind} (viewing directions within {view_spread_degrees(scene.c2w):.1f} deg of their mean), "
            f"samples {sampling} in {near:.3g}..{far:.3g}")
