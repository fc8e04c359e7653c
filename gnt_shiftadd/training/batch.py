"""One GNT training batch: a random target view, a randomized set of nearby source views, random rays."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.source_views import sample_training_source_views
from renderer.rays import rays_from_pixels


@dataclass
class RayBatch:
    """origins, directions [R, 3]; target_rgb [R, 3]; sources: rgb [V, H, W, 3], K [V, 3, 3], c2w [V, 4, 4]."""

    target_id: int
    source_ids: np.ndarray
    origins: torch.Tensor
    directions: torch.Tensor
    target_rgb: torch.Tensor
    src_rgb: torch.Tensor
    src_K: torch.Tensor
    src_c2w: torch.Tensor
    near: float
    far: float
    kind: str = "forward_facing"  # Scene.kind: how points are sampled along the rays
    patch_size: int = 0  # > 0: the last patch_size**2 rays form one patch of the target (row-major)


def step_rng(seed: int, step: int, rank: int = 0) -> np.random.Generator:
    """Randomness derived from (seed, step, rank) only, so a resumed run draws exactly the same batches."""
    return np.random.default_rng([seed, step, rank])


def sample_training_batch(tensors, rng: np.random.Generator, n_rand: int, num_source_views: int,
                          patch_size: int = 0) -> RayBatch:
    """`tensors` is an experiment.SceneTensors. Source views are GNT's randomized nearest-neighbour subset.
    With patch_size P > 0, the last P * P rays are one P x P patch of the target in row-major order (for a
    perceptual loss); they are drawn after everything else, so P = 0 gives exactly the batches it always gave."""
    scene = tensors.scene
    train_ids = tensors.train_ids
    slot = int(rng.integers(len(train_ids)))
    target = int(train_ids[slot])
    picked = sample_training_source_views(rng, scene.c2w[target], scene.c2w[train_ids], num_source_views, exclude=slot)
    source_ids = train_ids[picked]

    flat = rng.choice(scene.height * scene.width, size=min(n_rand, scene.height * scene.width), replace=False)
    rows, cols = np.divmod(flat, scene.width)
    if patch_size:
        if patch_size > min(scene.height, scene.width):
            raise ValueError(f"train.patch_size {patch_size} is larger than the images ({scene.width}x{scene.height})")
        top = int(rng.integers(scene.height - patch_size + 1))
        left = int(rng.integers(scene.width - patch_size + 1))
        patch_rows, patch_cols = np.meshgrid(np.arange(top, top + patch_size), np.arange(left, left + patch_size),
                                             indexing="ij")
        rows, cols = np.concatenate([rows, patch_rows.ravel()]), np.concatenate([cols, patch_cols.ravel()])
    device = tensors.device
    pixels = torch.from_numpy(np.stack([cols, rows], axis=-1).astype(np.float32)).to(device)
    origins, directions = rays_from_pixels(pixels, tensors.K[target], tensors.c2w[target])
    target_rgb = tensors.images[target][torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)]
    src_rgb, src_K, src_c2w = tensors.source_inputs(source_ids)
    near, far = scene.depth_range(target)
    return RayBatch(target, source_ids, origins, directions, target_rgb, src_rgb, src_K, src_c2w, near, far, scene.kind,
                    patch_size)
