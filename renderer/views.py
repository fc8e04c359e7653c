"""Render a novel view of a scene: pick the nearest training views as sources, encode them once, render."""
from __future__ import annotations

import numpy as np
import torch

from renderer.render import Renderer, RenderSettings


@torch.no_grad()
def render_novel_view(model, tensors, c2w, K, near, far, settings: RenderSettings, exclude_view=None,
                      progress=False) -> torch.Tensor:
    """tensors: experiment.SceneTensors; c2w [4, 4], K [3, 3] (numpy or torch) -> rgb [H', W', 3] in [0, 1].

    `settings` (RenderSettings.from_config(cfg)) gives the source-view count, samples, stride, chunk and autocast;
    `exclude_view` keeps a training view from being its own source (when re-rendering a training camera).
    """
    c2w_np = c2w.detach().cpu().numpy() if torch.is_tensor(c2w) else np.asarray(c2w)
    source_ids = tensors.nearest_sources(c2w_np, settings.num_source_views, exclude_view=exclude_view)
    views = model.encode_sources(*tensors.source_inputs(source_ids))
    scene = tensors.scene
    renderer = Renderer(settings, kind=scene.kind)
    return renderer.render_image(lambda points, dirs, origins: model.render_points(points, dirs, origins[0], views),
                                 torch.as_tensor(K, dtype=torch.float32), torch.as_tensor(c2w_np, dtype=torch.float32),
                                 scene.height, scene.width, near, far, views.rgb.device, progress=progress)
