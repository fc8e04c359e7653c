"""Held-out evaluation (PSNR/SSIM/LPIPS per view and mean, JSON + images) and spiral novel-view videos."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gnt_shiftadd.config import Config
from gnt_shiftadd.evaluation.metrics import ImageMetrics, psnr
from gnt_shiftadd.evaluation.timing import sync
from gnt_shiftadd.runtime import allocator_state, openmp_policy
from gnt_shiftadd.experiment import SceneTensors
from renderer.camera_path import video_path
from renderer.video import save_png, write_video
from renderer.render import RenderSettings
from renderer.views import render_novel_view


def write_record(path, record: dict, indent: int = 1, note: str = "recorded in") -> Path:
    """Write a result record as JSON (its folder made), say where: every benchmark ends this way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=indent))
    if note:
        print(f"{note} {path}")
    return path


def environment() -> dict:
    """Where a number was measured: device name and library versions, stored with every result."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": device, "torch": torch.__version__, "python": platform.python_version(), "numpy": np.__version__,
            "cpu_allocator_tuned": allocator_state()["tuned"], "openmp_policy": openmp_policy()}


def heldout_views(scene, max_views: int = 0) -> list[int]:
    """The held-out views that are scored: all of scene.test_ids, or `max_views` of them evenly spaced (first and
    last included), so models and trivial baselines are always scored on the same views."""
    views = [int(v) for v in scene.test_ids]
    if max_views < 0:
        raise ValueError(f"eval.views must be >= 0 (0: all held-out views), got {max_views}")
    if 0 < max_views < len(views):
        views = [views[i] for i in np.unique(np.round(np.linspace(0, len(views) - 1, max_views)).astype(int))]
    return views


@torch.no_grad()
def evaluate(model, tensors: SceneTensors, cfg: Config, out_dir: str | Path, progress: bool = True) -> dict:
    """Render every held-out view with its nearest training views as sources; write metrics.json and PNGs."""
    scene = tensors.scene
    if len(scene.test_ids) == 0:
        raise ValueError(f"scene {scene.root} has no held-out views (data.llffhold={cfg.data.llffhold}); nothing to evaluate")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    metrics = ImageMetrics(use_lpips=cfg.eval.lpips)
    stride = cfg.eval.stride
    settings = RenderSettings.from_config(cfg, stride=stride)
    per_view = []
    for view in tqdm(heldout_views(scene, cfg.eval.views), desc="evaluate", disable=not progress):
        near, far = scene.depth_range(view)
        sync(tensors.device)
        tic = time.perf_counter()
        image = render_novel_view(model, tensors, scene.c2w[view], scene.intrinsics[view], near, far, settings,
                                  exclude_view=view)
        sync(tensors.device)
        seconds = time.perf_counter() - tic
        target = tensors.images[view][::stride, ::stride]
        nearest = int(tensors.nearest_sources(scene.c2w[view], 1, exclude_view=view)[0])
        record = {"view": view, **metrics(image, target), "seconds": seconds,
                  "nearest_source_view": nearest,
                  "nearest_view_psnr": psnr(tensors.images[nearest][::stride, ::stride], target)}
        per_view.append(record)
        if cfg.eval.save_images:
            save_png(image, out_dir / f"view{view:03d}_pred.png")
            save_png(target, out_dir / f"view{view:03d}_gt.png")
    keys = ["psnr", "ssim", "lpips", "seconds", "nearest_view_psnr"]
    mean = {k: (float(np.mean([r[k] for r in per_view])) if all(r[k] is not None for r in per_view) else None) for k in keys}
    result = {
        "scene": str(scene.root), "resolution": [int(target.shape[1]), int(target.shape[0])], "stride": stride,
        "views": [r["view"] for r in per_view], "heldout_views_total": len(scene.test_ids),
        "num_source_views": cfg.data.num_source_views, "n_samples": cfg.render.n_samples,
        "trans_depth": cfg.model.trans_depth, "mean": mean, "per_view": per_view, "environment": environment(),
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def render_spiral_video(model, tensors: SceneTensors, cfg: Config, out_dir: str | Path, progress: bool = True) -> dict:
    """Render cfg.video.frames frames on a spiral around the capture; PNG frames + video.mp4 + timing."""
    scene = tensors.scene
    out_dir = Path(out_dir)
    model.eval()
    poses = video_path(scene.c2w[scene.train_ids], scene.bounds, scene.kind, cfg.video.frames, cfg.video.n_rots,
                       cfg.video.zrate)  # spiral (forward-facing) or orbit (360)
    near, far = scene.depth_range()
    K = scene.intrinsics[0]
    frames, seconds = [], []
    settings = RenderSettings.from_config(cfg, stride=cfg.video.stride)
    for index, pose in enumerate(tqdm(poses, desc="render video", disable=not progress)):
        sync(tensors.device)
        tic = time.perf_counter()
        frame = render_novel_view(model, tensors, pose, K, near, far, settings)
        sync(tensors.device)
        seconds.append(time.perf_counter() - tic)
        frames.append(frame.cpu())
        save_png(frame, out_dir / "frames" / f"frame{index:04d}.png")
    video = write_video(frames, out_dir / "video.mp4", fps=cfg.video.fps)
    result = {"frames": len(frames), "video": str(video) if video else None, "resolution": [int(frames[0].shape[1]), int(frames[0].shape[0])],
              "ms_per_frame": 1000.0 * float(np.mean(seconds)), "environment": environment()}
    (out_dir / "render.json").write_text(json.dumps(result, indent=2))
    return result
