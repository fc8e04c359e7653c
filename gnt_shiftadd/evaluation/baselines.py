"""The trivial baselines every render must beat, scored exactly like the model (same views, metrics, stride).

"nearest": show the training photo whose camera is closest to the held-out one (the source the model would
rank first); "mean": show the per-pixel mean of all training photos. A model whose renders do not beat the
nearest photo on PSNR, SSIM *and* LPIPS is not useful, whatever its PSNR alone says.
"""
from __future__ import annotations

import numpy as np
import torch

from gnt_shiftadd.evaluation.evaluate import heldout_views
from gnt_shiftadd.evaluation.metrics import ImageMetrics
from gnt_shiftadd.experiment import SceneTensors

METRICS = ("psnr", "ssim", "lpips")


@torch.no_grad()
def trivial_baselines(tensors: SceneTensors, stride: int = 1, metrics: ImageMetrics | None = None,
                      max_views: int = 0) -> dict:
    """{"nearest": {...}, "mean_image": {...}} with per-view and mean PSNR/SSIM/LPIPS over the held-out views
    (the same subset as evaluate() with eval.views=max_views)."""
    scene = tensors.scene
    metrics = metrics or ImageMetrics()
    mean_image = tensors.images[torch.as_tensor(tensors.train_ids, device=tensors.device)].mean(dim=0)
    per_view = {"nearest": [], "mean_image": []}
    for view in heldout_views(scene, max_views):
        target = tensors.images[view][::stride, ::stride]
        nearest = int(tensors.nearest_sources(scene.c2w[view], 1, exclude_view=view)[0])
        for name, image in (("nearest", tensors.images[nearest]), ("mean_image", mean_image)):
            per_view[name].append({"view": view, **metrics(image[::stride, ::stride], target)})
    out = {}
    for name, rows in per_view.items():
        mean = {k: (float(np.mean([r[k] for r in rows])) if all(r[k] is not None for r in rows) else None) for k in METRICS}
        out[name] = {"mean": mean, "per_view": rows}
    return out


def trivial_baselines_for(cfg, tensors: SceneTensors) -> dict:
    """trivial_baselines scored exactly as evaluate() scores a model under cfg: same stride, held-out subset
    (eval.views) and metrics (LPIPS only with eval.lpips)."""
    return trivial_baselines(tensors, stride=cfg.eval.stride, metrics=ImageMetrics(use_lpips=cfg.eval.lpips),
                             max_views=cfg.eval.views)


def beats(model: dict, baseline: dict) -> dict[str, bool]:
    """Per metric, whether `model`'s mean is better than `baseline`'s (higher PSNR/SSIM, lower LPIPS)."""
    result = {}
    for key in METRICS:
        a, b = model.get(key), baseline.get(key)
        result[key] = None if a is None or b is None else (a < b if key == "lpips" else a > b)
    return result
