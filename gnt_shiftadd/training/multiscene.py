"""Cross-scene training (GNT's generalizable setting): one model, targets drawn from several scenes.

`data.train_scenes` lists the training scenes; `data.scene` is then the evaluation scene and is never trained
on (the loader refuses a list that contains it). Every view of a training scene can be a target (its own
held-out split only matters when it is evaluated as a scene of its own).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from gnt_shiftadd.config import Config, ConfigError
from gnt_shiftadd.experiment import SceneTensors, load_scene


def training_scene_configs(cfg: Config) -> list[Config]:
    """One Config per entry of cfg.data.train_scenes (scene folder and factor set, nothing held out)."""
    configs = []
    for index, entry in enumerate(cfg.data.train_scenes):
        where = f"data.train_scenes[{index}]"
        if isinstance(entry, str):
            entry = {"scene": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("scene"), str) or set(entry) - {"scene", "factor"}:
            raise ConfigError(f"{where}: expected a folder or {{scene: folder, factor: N}}, got {entry!r}")
        factor = entry.get("factor", cfg.data.factor)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ConfigError(f"{where}: factor must be a positive integer, got {factor!r}")
        if Path(entry["scene"]).resolve() == Path(cfg.data.scene).resolve():
            raise ConfigError(f"{where}: {entry['scene']} is data.scene, the evaluation scene; cross-scene training "
                              f"must never see it (remove it from data.train_scenes or evaluate another scene)")
        scene_cfg = copy.deepcopy(cfg)
        scene_cfg.data.scene, scene_cfg.data.factor, scene_cfg.data.llffhold = entry["scene"], factor, 0
        scene_cfg.data.make_synthetic, scene_cfg.data.train_scenes = False, []
        configs.append(scene_cfg)
    return configs


def load_training_scenes(cfg: Config, evaluation_scene: SceneTensors, device: torch.device) -> list[SceneTensors]:
    """The scenes training draws targets from: cfg.data.train_scenes, or just the evaluation scene."""
    if not cfg.data.train_scenes:
        return [evaluation_scene]
    return [SceneTensors(load_scene(scene_cfg), device) for scene_cfg in training_scene_configs(cfg)]


def pick_scene(scenes: list[SceneTensors], rng: np.random.Generator) -> SceneTensors:
    """Uniform over scenes (a scene with many views is not favoured); the single-scene case draws nothing, so a
    single-scene run's batches are the same as before cross-scene training existed."""
    return scenes[0] if len(scenes) == 1 else scenes[int(rng.integers(len(scenes)))]
