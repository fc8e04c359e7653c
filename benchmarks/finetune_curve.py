"""Fern quality against per-scene training steps, starting from the shipped cross-scene model vs from nothing.

  python benchmarks/finetune_curve.py --config configs/fern.yaml --init pretrained --milestones 0 100 200 400 800 \
      --out results/fern_finetune_curve_cpu.json [eval.stride=2 ...]

For each start (`--init` checkpoint, and `scratch`), one run is trained up to each milestone in turn (resuming the
same run, so the curve is one training run sampled at several points) and evaluated on the held-out views.
Milestone 0 from a checkpoint is its zero-shot quality. Seconds per step on quiet cores come from
benchmarks/train_speed.py, which turns steps into minutes.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import load_config  # noqa: E402
from gnt_shiftadd.evaluation.baselines import trivial_baselines_for  # noqa: E402
from gnt_shiftadd.evaluation.evaluate import environment, evaluate  # noqa: E402
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene, resolve_device  # noqa: E402
from gnt_shiftadd.pretrained import resolve_checkpoint  # noqa: E402
from gnt_shiftadd.runtime import tune_cpu_allocator  # noqa: E402
from gnt_shiftadd.training.checkpoint import config_of_checkpoint, load_checkpoint  # noqa: E402
from gnt_shiftadd.training.trainer import train  # noqa: E402


def evaluate_checkpoint(cfg, checkpoint: Path, out_dir: Path) -> dict:
    device = resolve_device(cfg.device)
    model = build_model(cfg, device)
    load_checkpoint(checkpoint, cfg, model)
    return evaluate(model, SceneTensors(load_scene(cfg), device), cfg, out_dir, progress=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--init", default="pretrained", help="checkpoint to fine-tune from ('pretrained': the shipped one)")
    parser.add_argument("--milestones", type=int, nargs="+", required=True)
    parser.add_argument("--starts", nargs="+", default=["init", "scratch"], choices=["init", "scratch"])
    parser.add_argument("--scratch-snapshots", type=Path,
                        help="instead of training the scratch curve here: a folder of step<N>.pt checkpoints of a run "
                             "from nothing with the same config (e.g. saved while training the per-scene model)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    tune_cpu_allocator()
    init = resolve_checkpoint(args.init)
    base = load_config(args.config, [*args.overrides, "render.kernels=torch", "train.val_every=0"])
    base.model = config_of_checkpoint(init).model  # both starts use the same architecture
    record = json.loads(args.out.read_text()) if args.out.is_file() else {}
    record.update({"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "environment": environment(),
                   "init_checkpoint": str(init), "curves": record.get("curves", {})})
    tensors = SceneTensors(load_scene(base), resolve_device(base.device))
    record["baselines"] = {k: v["mean"] for k, v in trivial_baselines_for(base, tensors).items()}
    if args.scratch_snapshots:
        curve = record["curves"].setdefault("scratch", {})
        for snapshot in sorted(args.scratch_snapshots.glob("step*.pt"), key=lambda p: int(p.stem[4:])):
            step = int(snapshot.stem[4:])
            if str(step) in curve:
                continue
            cfg = load_config(None, [f"name={base.name}_curve_scratch_snapshots"], base=base)
            metrics = evaluate_checkpoint(cfg, snapshot, cfg.run_dir / f"eval_step{step}")
            curve[str(step)] = {"steps": step, "rays_per_step": cfg.train.n_rand, "snapshot": str(snapshot),
                                **metrics["mean"]}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2))
            print(f"scratch snapshot @ {step}: PSNR {metrics['mean']['psnr']:.2f} LPIPS {metrics['mean']['lpips']}")
    for start in args.starts:
        if start == "scratch" and args.scratch_snapshots:
            continue
        curve = record["curves"].setdefault(start, {})
        name = f"{base.name}_curve_{'from_' + _start_name(args.init) if start == 'init' else 'scratch'}"
        for milestone in sorted(args.milestones):
            if str(milestone) in curve:
                continue
            cfg = load_config(None, [f"name={name}", f"train.steps={max(milestone, 1)}"], base=base)
            if start == "init":
                cfg.train.init_from = str(init)
            if milestone == 0:
                if start == "scratch":
                    continue  # an untrained model has nothing to show
                metrics = evaluate_checkpoint(cfg, init, cfg.run_dir / "eval_step0")
            else:
                result = train(cfg, resume="auto")
                metrics = evaluate_checkpoint(cfg, result.checkpoint, cfg.run_dir / f"eval_step{milestone}")
            curve[str(milestone)] = {"steps": milestone, "rays_per_step": cfg.train.n_rand, **metrics["mean"]}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2))
            m = metrics["mean"]
            print(f"{start} @ {milestone}: PSNR {m['psnr']:.2f} SSIM {m['ssim']:.3f} LPIPS {m['lpips']}")
    return 0


def _start_name(init) -> str:
    """A run name per starting checkpoint: <run>/checkpoints/latest.pt is named by its run (every run's latest.pt
    would otherwise share one folder, and the trainer refuses to resume a folder started from another init)."""
    path = Path(str(init))
    return path.parent.parent.name if path.stem == "latest" and path.parent.name == "checkpoints" else path.stem


if __name__ == "__main__":
    sys.exit(main())
