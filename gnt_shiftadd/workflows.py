"""The jobs the CLI runs, as library functions: train, evaluate, render a video, and all three in a row."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from gnt_shiftadd.config import Config, ConfigError
from gnt_shiftadd.evaluation.evaluate import evaluate, render_spiral_video
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene, resolve_device
from gnt_shiftadd.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gnt_shiftadd.training.trainer import TrainResult, checkpoint_path, train
from gnt_shiftadd.training.warm_start import warm_start
from kernels.apply import use_kernels


def load_trained(cfg: Config, ckpt: str | Path | None = None, backend: str | None = None):
    """(model in eval mode, SceneTensors, checkpoint path) for a finished or partial run, its leaves swapped to the
    kernels per `backend` (default cfg.render.kernels; "torch" for anything that hooks the PyTorch modules, e.g.
    op counts)."""
    path = Path(ckpt) if ckpt else checkpoint_path(cfg)
    device = resolve_device(cfg.device)
    model = build_model(cfg, device)
    load_checkpoint(path, cfg, model)
    model.eval()
    use_kernels(model, backend or cfg.render.kernels, cfg.render.gemm)  # "torch" leaves the model alone
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


def finetune_stages(cfg: Config, init_from: str | Path) -> list[Config]:
    """ShiftAddViT's staged fine-tuning as a list of runs: stage 1 converts the attention parts and fine-tunes,
    stage 2 converts the FFNs and fine-tunes. cfg.train.steps is the total; a variant with only one kind of
    part converted is one stage. Each stage is its own resumable run (its checkpoint seeds the next)."""
    s = cfg.shiftadd
    has_attention = s.ray_attention != "dense" or s.attention_linears != "dense"
    if not (has_attention and s.ffn != "dense"):
        single = copy.deepcopy(cfg)
        single.train.init_from = str(init_from)
        return [single]
    stage1_steps = cfg.train.stage1_steps or cfg.train.steps // 2
    if not 0 < stage1_steps < cfg.train.steps:
        raise ConfigError(f"train.stage1_steps={stage1_steps} must be between 0 and train.steps={cfg.train.steps}")
    stage1 = copy.deepcopy(cfg)
    stage1.name, stage1.shiftadd.ffn = f"{cfg.name}_stage1", "dense"
    stage1.train.steps, stage1.train.init_from = stage1_steps, str(init_from)
    stage2 = copy.deepcopy(cfg)
    stage2.train.steps, stage2.train.init_from = cfg.train.steps - stage1_steps, str(checkpoint_path(stage1))
    return [stage1, stage2]


def run_finetune(cfg: Config, init_from: str | Path, progress: bool = True) -> TrainResult:
    """Convert the trained model at `init_from` to cfg's variant in stages and fine-tune (resumes unfinished stages)."""
    if not Path(init_from).is_file():
        raise CheckpointError(f"finetune: checkpoint {init_from} does not exist (train the dense model first)")
    result = None
    for stage in finetune_stages(cfg, init_from):
        result = train(stage, resume="auto", progress=progress)
    return result


def run_reparam(cfg: Config, init_from: str | Path, progress: bool = True) -> Path:
    """Convert without fine-tuning; writes <run>/checkpoints/converted.pt (evaluate it with --ckpt)."""
    device = resolve_device(cfg.device)
    tensors = SceneTensors(load_scene(cfg), device)
    model, _, _ = warm_start(cfg, init_from, tensors, device, progress=progress)
    return save_checkpoint(cfg.run_dir / "checkpoints" / "converted.pt", cfg, model, step=0)
