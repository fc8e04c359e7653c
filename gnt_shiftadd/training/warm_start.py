"""Start a run from another run's weights, converting them to this run's ShiftAdd variant.

This is how ShiftAddViT is meant to be used: reparameterize a *trained* model, then fine-tune briefly. The hash
codes of converted attention are fitted on real queries/keys from a calibration batch of this scene's rays, and
the MoE balance loss gets the experts' latencies measured on this device (unless the config gives them).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from gnt_shiftadd.config import Config, config_from_dict, model_signature
from gnt_shiftadd.experiment import SceneTensors, build_model
from gnt_shiftadd.models.transformers import FeedForward
from gnt_shiftadd.evaluation.latency import measure_expert_latency
from gnt_shiftadd.shiftadd.reparameterize import check_convertible, reparameterize, shift_feedforward, shift_spec
from gnt_shiftadd.training.batch import sample_training_batch
from gnt_shiftadd.training.checkpoint import CheckpointError, read_checkpoint
from renderer.render import Renderer, RenderSettings


def source_config(cfg: Config, path: str | Path) -> Config:
    """The config the checkpoint at `path` was trained with; its model section must match cfg's."""
    payload = read_checkpoint(path)
    source = config_from_dict(payload["config"])
    ours = {k: v for k, v in model_signature(cfg).items() if not k.startswith("shiftadd.")}
    theirs = {k: v for k, v in model_signature(source).items() if not k.startswith("shiftadd.")}
    diffs = [f"model.{k}: checkpoint has {theirs.get(k)!r}, config has {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if diffs:
        raise CheckpointError(f"train.init_from: {path} has a different model configuration:\n  " + "\n  ".join(diffs))
    return source


def load_model_of(path: str | Path, source: Config, device: torch.device):
    """Build the checkpoint's own variant and load its weights (no optimizer, no RNG)."""
    model = build_model(source, device)
    try:
        model.load_state_dict(read_checkpoint(path)["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit its own recorded configuration: {err}") from None
    return model


def calibration_forward(model, tensors: SceneTensors, cfg: Config):
    """A closure that runs `model` on a fixed batch of real training rays (deterministic for a seed)."""
    rng = np.random.default_rng(cfg.train.seed + 7919)
    batch = sample_training_batch(tensors, rng, cfg.train.calibration_rays, cfg.data.num_source_views)
    # fp32 like the conversion it feeds (no autocast), deterministic samples
    renderer = Renderer(RenderSettings.from_config(cfg).with_(autocast="none"), kind=batch.kind)
    points = renderer.sample(batch.origins, batch.directions, batch.near, batch.far)

    def run():
        return renderer.shade(lambda p, d, o: model(p, d, o[0], batch.src_rgb, batch.src_K, batch.src_c2w),
                              points, batch.directions, batch.origins)

    return run


def expert_latency_for(model, cfg: Config, device: torch.device) -> list[float] | None:
    """[mult, shift] per-token latency for the MoE balance loss: from the config, or measured here (cached)."""
    if cfg.shiftadd.ffn != "moe":
        return None
    if cfg.shiftadd.moe_expert_latency:
        return [float(x) for x in cfg.shiftadd.moe_expert_latency]
    ff = next((m for m in model.modules() if type(m) is FeedForward), None)
    if ff is None:
        return None

    experts = [copy.deepcopy(ff).eval(), shift_feedforward(ff, shift_spec(cfg.shiftadd)).eval()]
    return measure_expert_latency(experts, ff.fc1.in_features, device=device)


def warm_start(cfg: Config, path: str | Path, tensors: SceneTensors, device: torch.device, progress: bool = True):
    """(model converted to cfg's variant from the weights at `path`, ConversionReport, expert latency or None)."""

    source = source_config(cfg, path)
    check_convertible(source.shiftadd, cfg.shiftadd, str(path))
    source = copy.deepcopy(source)
    source.model = copy.deepcopy(cfg.model)  # dropout etc. follow this run
    model = load_model_of(path, source, device)
    latency = expert_latency_for(model, cfg, device)
    report = reparameterize(model, cfg.shiftadd, calibration_forward(model, tensors, cfg), expert_latency=latency)
    if progress:
        print(f"{cfg.name}: converted {path} -> {report.summary()}"
              + (f"; expert latency [mult, shift] = {latency}" if latency else ""))
    return model, report, latency
