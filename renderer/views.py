"""Render a novel view of a scene: pick the nearest training views as sources, encode them once, render."""
from __future__ import annotations

import numpy as np
import torch

from renderer.render import render_image


@torch.no_grad()
def render_novel_view(model, tensors, c2w, K, num_source_views, n_samples, near, far, stride=1, chunk=1024,
                      autocast="none", exclude_view=None, progress=False) -> torch.Tensor:
    """tensors: experiment.SceneTensors; c2w [4, 4], K [3, 3] (numpy or torch) -> rgb [H', W', 3] in [0, 1].

    `exclude_view` keeps a training view from being its own source (when re-rendering a training camera).
    """
    c2w_np = c2w.detach().cpu().numpy() if torch.is_tensor(c2w) else np.asarray(c2w)
    source_ids = tensors.nearest_sources(c2w_np, num_source_views, exclude_view=exclude_view)
    views = model.encode_sources(*tensors.source_inputs(source_ids))
    scene = tensors.scene
    return render_image(
        model, views, torch.as_tensor(K, dtype=torch.float32), torch.as_tensor(c2w_np, dtype=torch.float32),
        scene.height, scene.width, near, far, n_samples, stride=stride, chunk=chunk, autocast=autocast, progress=progress,
    )
