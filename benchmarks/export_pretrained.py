"""Ship a trained cross-scene model: weights + config (no optimizer) into gnt_shiftadd/pretrained/, with a record.

  python benchmarks/export_pretrained.py --ckpt outputs/llff_cross_scene/checkpoints/latest.pt --name gnt_llff_cpu_v1 \
      [--zero-shot results/fern_zero_shot_cpu.json]

The record names the scenes the model saw in training (so nobody reports a "zero-shot" figure on one of them),
the training command and config file, the step, the git commit, and the sha256 that `resolve_checkpoint` checks.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import config_from_dict  # noqa: E402
from gnt_shiftadd.pretrained import export_pretrained  # noqa: E402
from gnt_shiftadd.training.checkpoint import read_checkpoint  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--command", default="python run_nerf.py train --config configs/llff_cross_scene.yaml",
                        help="the command that trained it")
    parser.add_argument("--zero-shot", help="a results JSON with its zero-shot evaluation, referenced in the record")
    args = parser.parse_args()
    cfg = config_from_dict(read_checkpoint(args.ckpt)["config"])
    scenes = [e if isinstance(e, str) else e["scene"] for e in cfg.data.train_scenes] or [cfg.data.scene]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "trained_on": [Path(s).name for s in scenes],
        "trained_on_paths": scenes,
        "validated_on_unseen": Path(cfg.data.scene).name if cfg.data.train_scenes else None,
        "training_command": args.command,
        "rays_per_step": cfg.train.n_rand,
        "git_commit_at_export": commit,
        "zero_shot_results": args.zero_shot,
        "model": cfg.to_dict()["model"],
    }
    out = export_pretrained(args.ckpt, args.name, record)
    print(json.dumps(json.loads(out.with_suffix(".json").read_text()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
