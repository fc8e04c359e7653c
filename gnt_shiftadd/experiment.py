"""Glue between a Config and the library: device, scene (loading or generating it) and model."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from data.formats import describe_scene, load_any_scene
from data.scene import Scene, SceneError
from data.source_views import nearest_views
from data.synthetic import make_synthetic_scene
from gnt_shiftadd.config import Config, is_dense
from gnt_shiftadd.models.gnt import GNT
from gnt_shiftadd.shiftadd.reparameterize import reparameterize

LLFF_DOWNLOAD_HINT = (
    "Real LLFF scenes (fern, flower, ...) are in 'nerf_llff_data' from the NeRF authors' release; "
    "point data.scene at one scene folder (it holds poses_bounds.npy and images_<factor>/)."
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was asked for but CUDA is not available; use device=cpu or auto")
    return device


def load_scene(cfg: Config) -> Scene:
    """Load cfg.data.scene in its format (data.format, auto-detected by default; see data/formats.py) and print its
    one-line description (format, kind, sampling); with data.make_synthetic, generate the procedural scene first."""
    root = Path(cfg.data.scene)
    if cfg.data.make_synthetic and not (root / "poses_bounds.npy").exists():

        make_synthetic_scene(
            root,
            num_views=cfg.data.synthetic_views,
            height=cfg.data.synthetic_height,
            width=cfg.data.synthetic_width,
            factor=cfg.data.factor,
        )
    try:
        scene = load_any_scene(root, cfg.data.format, factor=cfg.data.factor, llffhold=cfg.data.llffhold)
    except SceneError as err:
        if not root.exists():
            raise SceneError(f"{err}\n{LLFF_DOWNLOAD_HINT}") from None
        raise
    print(describe_scene(scene), file=sys.stderr)
    return scene


def build_model(cfg: Config, device: torch.device) -> GNT:
    """A GNT with the module structure of cfg's variant (a ShiftAdd variant is built unfitted: its weights and
    hash codes come from a checkpoint, or from `training.warm_start` which converts trained weights)."""
    torch.manual_seed(cfg.train.seed)
    model = GNT(cfg.model).to(device)
    if not is_dense(cfg):

        reparameterize(model, cfg.shiftadd)
    return model.to(device)


class SceneTensors:
    """A scene's images and cameras as tensors on the compute device, with source-view selection."""

    def __init__(self, scene: Scene, device: torch.device):
        self.scene = scene
        self.device = device
        self.images = torch.from_numpy(scene.images).to(device)
        self.K = torch.from_numpy(scene.intrinsics).float().to(device)
        self.c2w = torch.from_numpy(scene.c2w).float().to(device)
        self.train_ids = np.asarray(scene.train_ids)

    def nearest_sources(self, target_c2w: np.ndarray, k: int, exclude_view: int | None = None) -> np.ndarray:
        """Indices (into the scene) of the k training views closest to a camera, never the target itself."""
        exclude = None
        if exclude_view is not None and exclude_view in self.train_ids:
            exclude = int(np.flatnonzero(self.train_ids == exclude_view)[0])
        picked = nearest_views(target_c2w, self.scene.c2w[self.train_ids], k, exclude=exclude)
        return self.train_ids[picked]

    def source_inputs(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rgb [V, H, W, 3], K [V, 3, 3], c2w [V, 4, 4]) of the given views."""
        index = torch.as_tensor(np.asarray(ids), device=self.device, dtype=torch.long)
        return self.images[index], self.K[index], self.c2w[index]
