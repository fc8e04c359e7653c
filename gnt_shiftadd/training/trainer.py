"""GNT training loop: one target view per step, N_rand rays, MSE, Adam (two groups), StepLR.

Resumable exactly: batches and sample jitter are drawn from RNGs seeded by (seed, step, rank), and the
checkpoint holds model, optimizer, scheduler, global RNG states (dropout) and the step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from gnt_shiftadd.config import Config
from gnt_shiftadd.evaluation.lpips import load_lpips
from gnt_shiftadd.evaluation.metrics import mse_to_psnr, psnr
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene, resolve_device
from gnt_shiftadd.training import distributed
from gnt_shiftadd.training.batch import sample_training_batch, step_rng
from gnt_shiftadd.shiftadd.moe import MoEFeedForward, total_auxiliary_loss
from gnt_shiftadd.training.multiscene import load_training_scenes, pick_scene
from gnt_shiftadd.training.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from gnt_shiftadd.training.run_lock import run_folder_lock
from gnt_shiftadd.training.warm_start import load_model_of, source_config, warm_start
from renderer.render import Renderer, RenderSettings
from renderer.views import render_novel_view


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last checkpoint on disk is intact."""


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss of the steps run in this call
    model: torch.nn.Module | None = None


def checkpoint_path(cfg: Config) -> Path:
    return cfg.run_dir / "checkpoints" / "latest.pt"


def make_optimizer(model, cfg: Config):
    optimizer = torch.optim.Adam(model.parameter_groups(cfg.train.lr_transformer, cfg.train.lr_cnn))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.train.lr_decay_steps, gamma=cfg.train.lr_decay_factor)
    return optimizer, scheduler


def draw_batch(cfg: Config, training_scenes, step: int, rank: int = 0):
    """The step's RayBatch (random rays + the patch, if train.patch_size) and its sampling generator; depends only
    on (seed, step, rank), so a resumed run and benchmarks/train_speed.py draw exactly what training draws."""
    rng = step_rng(cfg.train.seed, step, rank)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    batch = sample_training_batch(pick_scene(training_scenes, rng), rng, cfg.train.n_rand, cfg.data.num_source_views,
                                  cfg.train.patch_size)
    return batch, generator


def compile_for_training(model, cfg: Config) -> None:
    """train.compile: compile the transformer in place (nn.Module.compile keeps the state_dict keys, so checkpoints
    stay interchangeable with eager runs); the CNN/feature front end and the loss stay eager."""
    if cfg.train.compile:
        getattr(model, "module", model).transformer.compile()


def perceptual_loss_module(cfg: Config, device):
    """Frozen LPIPS-Alex for the patch loss (the evaluation metric's own network; see evaluation/lpips.py), or
    None when train.perceptual_weight is 0."""
    return load_lpips("alex").to(device) if cfg.train.perceptual_weight > 0 else None


def training_step(model, batch, cfg: Config, generator: torch.Generator, teacher=None,
                  parts: dict | None = None, perceptual=None) -> torch.Tensor:
    """Loss for one RayBatch: colour MSE + MoE balance loss (if any) + distillation to a teacher (if given)
    + train.perceptual_weight x LPIPS of the batch's patch (if the batch has one and `perceptual`, an LPIPS
    module, is given).

    `model` may be DDP-wrapped (its forward runs CNN and transformer). `parts`, when given, receives the
    detached components ("rgb_mse", "balance", "distill") for logging.
    """
    renderer = Renderer(RenderSettings.from_config(cfg), kind=batch.kind)
    points = renderer.sample(batch.origins, batch.directions, batch.near, batch.far, stratified=True,
                             generator=generator)

    def radiance(net):  # the CNN runs inside the call, so DDP sees every parameter
        return lambda p, d, o: net(p, d, o[0], batch.src_rgb, batch.src_K, batch.src_c2w)

    rgb = renderer.shade(radiance(model), points, batch.directions, batch.origins)
    rgb_mse = F.mse_loss(rgb, batch.target_rgb)
    loss = rgb_mse
    if parts is not None:
        parts["rgb_mse"] = rgb_mse.detach()
    balance = total_auxiliary_loss(getattr(model, "module", model))
    if torch.is_tensor(balance):
        loss = loss + balance
        if parts is not None:
            parts["balance"] = balance.detach()
    if perceptual is not None and batch.patch_size and cfg.train.perceptual_weight > 0:
        size = batch.patch_size
        as_image = lambda colors: colors[-size * size:].reshape(1, size, size, 3).permute(0, 3, 1, 2) * 2 - 1  # noqa: E731
        distance = perceptual(as_image(rgb), as_image(batch.target_rgb)).mean()
        loss = loss + cfg.train.perceptual_weight * distance
        if parts is not None:
            parts["perceptual"] = distance.detach()
    if teacher is not None and cfg.train.distill_weight > 0:
        with torch.no_grad():
            teacher_rgb = renderer.shade(radiance(teacher), points, batch.directions, batch.origins)
        distill = F.mse_loss(rgb, teacher_rgb)
        loss = loss + cfg.train.distill_weight * distill
        if parts is not None:
            parts["distill"] = distill.detach()
    return loss


def _resolve_resume(cfg: Config, resume: str | bool | None) -> Path | None:
    """resume: False/None = fresh run (refuses to overwrite one), True = must resume, 'auto', or a path."""
    latest = checkpoint_path(cfg)
    if resume in (None, False):
        if latest.exists():
            step = read_checkpoint(latest)["step"]
            raise CheckpointError(
                f"{latest} already holds a run at step {step}; pass --resume to continue it, "
                f"or choose another name=... / out_dir=... (nothing was overwritten)"
            )
        return None
    if resume == "auto":
        path = latest if latest.exists() else None
    else:
        path = latest if resume is True else Path(resume)
        if not path.exists():
            raise CheckpointError(f"--resume: checkpoint {path} does not exist")
    if path is not None:
        _check_same_start(path, cfg)
    return path


def _check_same_start(path: Path, cfg: Config) -> None:
    """Resuming continues the run in `path`, which began from its own train.init_from: refuse when this run asks
    for another starting point (a run folder reused for a different init would silently carry on the old one)."""
    stored = (read_checkpoint(path).get("config") or {}).get("train", {}).get("init_from")
    wanted = cfg.train.init_from
    if wanted and (not stored or Path(stored).resolve() != Path(wanted).resolve()):
        raise CheckpointError(
            f"{path} continues a run that started from train.init_from={stored!r}, but this run asks for "
            f"{wanted!r}; choose another name=... / out_dir=... for the new start (nothing was overwritten)")


def validation_image(model, tensors: SceneTensors, cfg: Config):
    """Render the first held-out view (or a training view with itself excluded) at cfg.train.val_stride."""
    scene = tensors.scene
    view = int(scene.test_ids[0]) if len(scene.test_ids) else int(scene.train_ids[0])
    near, far = scene.depth_range(view)
    image = render_novel_view(model, tensors, scene.c2w[view], scene.intrinsics[view], near, far,
                              RenderSettings.from_config(cfg, stride=cfg.train.val_stride), exclude_view=view)
    target = tensors.images[view][:: cfg.train.val_stride, :: cfg.train.val_stride]
    return image, target


def train(cfg: Config, resume: str | bool | None = None, progress: bool = True) -> TrainResult:
    """Train (or continue) the run in cfg.run_dir up to cfg.train.steps steps."""
    info = distributed.init_distributed(cfg.device)
    try:
        with run_folder_lock(cfg.run_dir, enabled=info.is_main):
            return _train(cfg, resume, progress, info)
    finally:
        distributed.cleanup(info)


def _train(cfg: Config, resume, progress: bool, info: distributed.DistInfo) -> TrainResult:
    device = distributed.device_for(info, resolve_device(cfg.device))
    resume_path = _resolve_resume(cfg, resume)
    scene = load_scene(cfg) if info.is_main else None
    distributed.barrier(info)  # rank 0 may have generated the synthetic scene
    scene = scene or load_scene(cfg)
    if len(scene.train_ids) < 2 and not cfg.data.train_scenes:
        raise TrainingError(f"scene {scene.root} has {len(scene.train_ids)} training views; GNT needs at least 2")
    tensors = SceneTensors(scene, device)
    training_scenes = load_training_scenes(cfg, tensors, device)

    if resume_path is None and cfg.train.init_from:
        model, _, _ = warm_start(cfg, cfg.train.init_from, tensors, device, progress=progress and info.is_main)
    else:
        model = build_model(cfg, device)
        if resume_path is None:
            model.init_pretrained_parts()
    teacher = None
    if cfg.train.distill_weight > 0:
        teacher = load_model_of(cfg.train.distill_from, source_config(cfg, cfg.train.distill_from), device).eval()
        teacher.requires_grad_(False)
    perceptual = perceptual_loss_module(cfg, device)
    compile_for_training(model, cfg)
    optimizer, scheduler = make_optimizer(model, cfg)
    start = 0
    if resume_path is not None:
        start = load_checkpoint(resume_path, cfg, model, optimizer, scheduler, restore_rng=True)
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if info.enabled else model
    model.train()

    writer = None
    if info.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(_yaml_dump(cfg.to_dict()))
        writer = SummaryWriter(str(cfg.run_dir / "tensorboard"), purge_step=start + 1 if start else None)

    ckpt = checkpoint_path(cfg)
    losses: dict[int, float] = {}
    bar = tqdm(range(start + 1, cfg.train.steps + 1), initial=start, total=cfg.train.steps, desc=f"train {cfg.name}",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    rays_per_step = cfg.train.n_rand * info.world_size
    deadline = time.perf_counter() + 60.0 * cfg.train.max_minutes if cfg.train.max_minutes > 0 else None
    last_step = max(start, cfg.train.steps)
    for step in bar:
        tic = time.perf_counter()
        batch, generator = draw_batch(cfg, training_scenes, step, info.rank)
        parts: dict = {}
        loss = training_step(train_model, batch, cfg, generator, teacher, parts, perceptual)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss is {loss.item()} at step {step} (target view {batch.target_id}); stopping. "
                f"The last good checkpoint is {ckpt if ckpt.exists() else 'not written yet'}. Try a lower learning rate."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        losses[step] = loss_value
        if info.is_main:
            rays_per_s = rays_per_step / max(time.perf_counter() - tic, 1e-9)
            rgb_mse = float(parts["rgb_mse"])
            bar.set_postfix(loss=f"{loss_value:.4f}", psnr=f"{mse_to_psnr(rgb_mse):.2f}", rays_s=f"{rays_per_s:,.0f}")
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                writer.add_scalar("train/loss", loss_value, step)
                writer.add_scalar("train/psnr", mse_to_psnr(rgb_mse), step)
                for key in ("balance", "distill", "perceptual"):
                    if key in parts:
                        writer.add_scalar(f"train/{key}_loss", float(parts[key]), step)
                for name, moe in named_moe_modules(model):
                    writer.add_scalar(f"moe/{name}/shift_fraction", float(moe.routing_fractions()[-1]), step)
                writer.add_scalar("train/rays_per_s", rays_per_s, step)
                for group in optimizer.param_groups:
                    writer.add_scalar(f"lr/{group['name']}", group["lr"], step)
            if cfg.train.val_every and step % cfg.train.val_every == 0:
                _log_validation(model, tensors, cfg, writer, step)
            out_of_time = deadline is not None and time.perf_counter() >= deadline and step < cfg.train.steps
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or out_of_time:
                save_checkpoint(ckpt, cfg, model, optimizer, scheduler, step)
            if out_of_time:  # train.max_minutes: a wall-clock budget (a resumed run continues to train.steps)
                last_step = step
                break
    bar.close()
    if info.is_main and start >= cfg.train.steps and not ckpt.exists():
        save_checkpoint(ckpt, cfg, model, optimizer, scheduler, start)
    if writer is not None:
        writer.close()
    distributed.barrier(info)
    return TrainResult(cfg.run_dir, ckpt, last_step, losses, model)


def named_moe_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFeedForward)]


def _log_validation(model, tensors, cfg, writer, step) -> None:
    model.eval()
    image, target = validation_image(model, tensors, cfg)
    model.train()
    writer.add_scalar("val/psnr", psnr(image, target), step)
    writer.add_image("val/render", image.permute(2, 0, 1).cpu(), step)
    writer.add_image("val/target", target.permute(2, 0, 1).cpu(), step)


def _yaml_dump(values: dict) -> str:
    return yaml.safe_dump(values, sort_keys=False)
