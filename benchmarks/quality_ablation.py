"""Quality per CPU minute: train each run of an ablation file (resumably), score it on the held-out views next to
the trivial baselines, and record everything as JSON.

  python benchmarks/quality_ablation.py --ablation configs/ablations/fern_quality.yaml \
      --out results/fern_quality_ablation_cpu.json [--only RUN ...] [key=value ...]

An ablation file names a base config and runs (name -> list of overrides). Finished runs are reused (their
checkpoint and, if newer than it, their eval/metrics.json), so the file can grow and the command be re-run.
Each run records its steps, rays per step, training wall and CPU seconds (measured only for the steps this call
ran; the machine may have been shared, which the record's load average shows), and held-out PSNR/SSIM/LPIPS.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import ConfigError, load_config  # noqa: E402
from gnt_shiftadd.evaluation.baselines import beats, trivial_baselines_for  # noqa: E402
from gnt_shiftadd.evaluation.evaluate import environment  # noqa: E402
from gnt_shiftadd.experiment import SceneTensors, load_scene  # noqa: E402
from gnt_shiftadd.runtime import tune_cpu_allocator  # noqa: E402
from gnt_shiftadd.training.checkpoint import read_checkpoint  # noqa: E402
from gnt_shiftadd.training.trainer import checkpoint_path, train  # noqa: E402
from gnt_shiftadd.workflows import run_eval  # noqa: E402


def read_ablation(path: Path) -> tuple[str, dict[str, list[str]]]:
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"ablation file {path}: {err}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("base"), str) or not isinstance(spec.get("runs"), dict):
        raise ConfigError(f"ablation file {path}: expected 'base: <config>' and 'runs: {{name: [overrides]}}'")
    for name, overrides in spec["runs"].items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"ablation file {path}: runs.{name} must be a list of key=value strings")
    return spec["base"], spec["runs"]


def metrics_of(cfg, checkpoint: Path) -> dict:
    """The run's held-out metrics, re-evaluated only when the checkpoint is newer than its metrics.json."""
    saved = cfg.run_dir / "eval" / "metrics.json"
    if saved.is_file() and saved.stat().st_mtime > checkpoint.stat().st_mtime:
        result = json.loads(saved.read_text())
        if result.get("stride") == cfg.eval.stride:
            return result
    return run_eval(cfg, checkpoint, progress=True)


def late_training_psnr(cfg, last_steps: int = 300) -> float | None:
    """PSNR of the mean training-batch MSE over the run's last `last_steps` steps, from its TensorBoard `train/psnr`
    (logged every train.log_every steps): next to the held-out PSNR it tells underfitting from overfitting."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415 (only here)

    values = []
    for events in sorted((cfg.run_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "train/psnr" in accumulator.Tags()["scalars"]:
            values += [e.value for e in accumulator.Scalars("train/psnr") if e.step > cfg.train.steps - last_steps]
    if not values:
        return None
    return float(-10 * np.log10(np.mean(10 ** (-np.asarray(values) / 10))))


def scene_baselines(cfg, cache: dict) -> dict:
    """The trivial baselines of cfg's scene, scored like its runs (same views, stride); computed once per scene,
    so an ablation over several scenes compares each run with its own scene's baselines."""
    key = f"{cfg.data.scene} (factor {cfg.data.factor}, stride {cfg.eval.stride}, views {cfg.eval.views or 'all'})"
    if key not in cache:
        tensors = SceneTensors(load_scene(cfg), torch.device("cpu"))
        cache[key] = trivial_baselines_for(cfg, tensors)
    return cache[key]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablation", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--only", nargs="*", help="train/evaluate only these runs (the others keep their recorded entries)")
    parser.add_argument("overrides", nargs="*", help="applied to every run, e.g. eval.stride=2")
    args = parser.parse_args()
    tune_cpu_allocator()
    base, runs = read_ablation(args.ablation)
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "environment": environment(),
              "ablation": str(args.ablation), "base": base, "runs": {}}
    previous_record = json.loads(args.out.read_text()) if args.out.is_file() else {}
    record["runs"] = previous_record.get("runs", {})
    baselines_by_scene: dict[str, dict] = previous_record.get("baselines_by_scene", {})
    record["baselines_by_scene"] = baselines_by_scene  # filled per scene as runs are scored
    for name, overrides in runs.items():
        cfg = load_config(base, [*overrides, *args.overrides, f"name={name}", "render.kernels=torch"])
        ckpt = checkpoint_path(cfg)
        if args.only and name not in args.only:
            continue
        done_before = read_checkpoint(ckpt)["step"] if ckpt.is_file() else 0
        wall, cpu = time.perf_counter(), time.process_time()
        result = train(cfg, resume="auto")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        metrics = metrics_of(cfg, result.checkpoint)
        baselines = scene_baselines(cfg, baselines_by_scene)
        previous = record["runs"].get(name, {})
        timing = {"steps_run_by_this_call": result.step - done_before, "wall_seconds": wall, "cpu_seconds": cpu,
                  "torch_threads": torch.get_num_threads(), "load_average_1_5_15": os.getloadavg()}
        if timing["steps_run_by_this_call"] == 0:  # trained before (or by `run_nerf.py train` with the same overrides)
            timing = previous.get("training_timing") or {
                "note": "trained outside this call; seconds per step on quiet cores: benchmarks/train_speed.py"}
        record["runs"][name] = {
            "overrides": overrides, "steps": result.step, "rays_per_step": cfg.train.n_rand,
            "rays_seen": result.step * cfg.train.n_rand, "training_timing": timing,
            "heldout_mean": metrics["mean"], "heldout_per_view": metrics["per_view"],
            "training_psnr_last_300_steps": late_training_psnr(cfg),
            "resolution": metrics["resolution"], "scene": cfg.data.scene,
            "baselines": {kind: value["mean"] for kind, value in baselines.items()},
            "beats_nearest_view": beats(metrics["mean"], baselines["nearest"]["mean"]),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
        m = metrics["mean"]
        lpips = "off" if m["lpips"] is None else f"{m['lpips']:.3f}"
        print(f"{name}: PSNR {m['psnr']:.2f} SSIM {m['ssim']:.3f} LPIPS {lpips} after {result.step} steps")
    print(f"recorded in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
