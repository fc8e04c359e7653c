"""Seconds per training step of a config on this machine (run on quiet cores), to turn a step budget into minutes.

  python benchmarks/train_speed.py --out results/train_speed_cpu.json --steps 30 \
      --run fern=configs/fern.yaml --run fern_gnt=configs/fern_gnt.yaml [--set NAME key=value ...]

Each run builds the model fresh (compiled with train.compile=true), warms up for 3 steps (the compile happens there), then times `--steps` full training steps (batch sampling,
forward, backward, optimizer) and reports the median and mean. The JSON also records threads and load average:
numbers from a loaded machine are not comparable.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import load_config  # noqa: E402
from gnt_shiftadd.evaluation.evaluate import environment  # noqa: E402
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene  # noqa: E402
from gnt_shiftadd.runtime import tune_cpu_allocator  # noqa: E402
from gnt_shiftadd.training.multiscene import load_training_scenes  # noqa: E402
from gnt_shiftadd.training.trainer import (compile_for_training, draw_batch, make_optimizer,  # noqa: E402
                                           perceptual_loss_module, training_step)  # noqa: E402


def seconds_per_step(cfg, steps: int, warmup: int = 3) -> list[float]:
    """Times the trainer's own step (draw_batch + training_step with the patch loss when configured)."""
    device = torch.device("cpu")
    tensors = SceneTensors(load_scene(cfg), device)
    scenes = load_training_scenes(cfg, tensors, device)
    model = build_model(cfg, device)
    model.init_pretrained_parts()
    model.train()
    compile_for_training(model, cfg)
    optimizer, _ = make_optimizer(model, cfg)
    perceptual = perceptual_loss_module(cfg, device)
    times = []
    for step in range(1, warmup + steps + 1):
        tic = time.perf_counter()
        batch, generator = draw_batch(cfg, scenes, step)
        loss = training_step(model, batch, cfg, generator, perceptual=perceptual)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step > warmup:
            times.append(time.perf_counter() - tic)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=CONFIG")
    parser.add_argument("--set", action="append", nargs="+", default=[], metavar="NAME key=value",
                        help="overrides for one run")
    args = parser.parse_args()
    tune_cpu_allocator()
    overrides = {}
    for name, *values in args.set:
        overrides.setdefault(name, []).extend(values)
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "environment": environment(),
              "threads": torch.get_num_threads(), "load_average_before": os.getloadavg(), "runs": {}}
    for item in args.run:
        name, config = item.split("=", 1)
        cfg = load_config(config, overrides.get(name, []))
        times = seconds_per_step(cfg, args.steps)
        record["runs"][name] = {"config": config, "overrides": overrides.get(name, []), "rays_per_step": cfg.train.n_rand,
                                "patch_rays_per_step": cfg.train.patch_size ** 2,
                                "median_s_per_step": statistics.median(times), "mean_s_per_step": statistics.fmean(times),
                                "steps_timed": len(times)}
        print(f"{name}: {statistics.median(times):.3f} s/step (median of {len(times)})")
    record["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
