"""The jobs the CLI runs, as library functions: train, evaluate, render a video, and all three in a row."""
from __future__ import annotations

import json
from pathlib import Path

from gnt_shiftadd.config import Config
from gnt_shiftadd.evaluation.evaluate import evaluate, render_spiral_video
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene, resolve_device
from gnt_shiftadd.training.checkpoint import load_checkpoint
from gnt_shiftadd.training.trainer import TrainResult, checkpoint_path, train


def load_trained(cfg: Config, ckpt: str | Path | None = None):
    """(model in eval mode, SceneTensors, checkpoint path) for a finished or partial run."""
    path = Path(ckpt) if ckpt else checkpoint_path(cfg)
    device = resolve_device(cfg.device)
    model = build_model(cfg, device)
    load_checkpoint(path, cfg, model)
    model.eval()
    return model, SceneTensors(load_scene(cfg), device), path


def run_eval(cfg: Config, ckpt=None, progress: bool = True) -> dict:
    model, tensors, _ = load_trained(cfg, ckpt)
    return evaluate(model, tensors, cfg, cfg.run_dir / "eval", progress=progress)


def run_render(cfg: Config, ckpt=None, progress: bool = True) -> dict:
    model, tensors, _ = load_trained(cfg, ckpt)
    return render_spiral_video(model, tensors, cfg, cfg.run_dir / "video", progress=progress)


def run_all(cfg: Config, resume="auto", progress: bool = True) -> dict:
    """Train (continuing an unfinished run), evaluate on held-out views, render the spiral video."""
    result: TrainResult = train(cfg, resume=resume, progress=progress)
    metrics = run_eval(cfg, result.checkpoint, progress)
    video = run_render(cfg, result.checkpoint, progress)
    summary = {"run_dir": str(cfg.run_dir), "checkpoint": str(result.checkpoint), "steps": result.step,
               "eval": metrics["mean"], "eval_json": str(cfg.run_dir / "eval" / "metrics.json"),
               "video": video["video"], "ms_per_frame": video["ms_per_frame"]}
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
