"""Does `run_nerf.py prepare` give cameras as good as the shipped LLFF poses? Same short training on both.

  python benchmarks/prepared_vs_shipped.py --out results/fern_prepared_vs_shipped_cpu.json \
      [--config configs/fern_blend.yaml] [key=value ...]

Prepares fern's 20 images_8 photos with pycolmap (outputs/fern_prepared, reused if there), then trains and
evaluates the config (configs/fern_blend.yaml by default, plus the overrides) once on the shipped poses_bounds.npy and once on the prepared
scene, with the same seed and budget, and records both held-out means and their difference. The prepared
photos are undistorted and cropped (497x372 instead of 504x378); each run is scored on its own scene's held-out
views (the same photos, 0 / 8 / 16).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.prepare import prepare_scene  # noqa: E402
from gnt_shiftadd.config import load_config  # noqa: E402
from gnt_shiftadd.evaluation.evaluate import environment  # noqa: E402
from gnt_shiftadd.runtime import tune_cpu_allocator  # noqa: E402
from gnt_shiftadd.training.trainer import train  # noqa: E402
from gnt_shiftadd.workflows import run_eval  # noqa: E402

FERN = ROOT.parent / "shared" / "data" / "nerf_llff_data" / "fern"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prepared", default="outputs/fern_prepared")
    parser.add_argument("--config", default=str(ROOT / "configs" / "fern_blend.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    tune_cpu_allocator()
    prepared = Path(args.prepared)
    if not (prepared / "poses_bounds.npy").exists():
        prepare_scene(FERN / "images_8", prepared, factor=1)
    report = json.loads((prepared / "prepare.json").read_text())
    runs = {}
    for label, scene, factor in (("shipped", FERN, 8), ("prepared", prepared, 1)):
        cfg = load_config(args.config,
                          [f"data.scene={scene}", f"data.factor={factor}", *args.overrides,
                           f"name=fern_{label}_poses_check"])
        tic = time.perf_counter()
        result = train(cfg, resume="auto")
        seconds = time.perf_counter() - tic
        metrics = run_eval(cfg, result.checkpoint)
        runs[label] = {"scene": str(scene), "factor": factor, "steps": result.step, "train_wall_seconds": seconds,
                       "heldout_mean": metrics["mean"], "eval_resolution": metrics["resolution"],
                       "heldout_per_view": metrics["per_view"]}
    record = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "environment": environment(), "config": cfg.to_dict(), "prepare": report, "runs": runs,
        "psnr_prepared_minus_shipped": runs["prepared"]["heldout_mean"]["psnr"] - runs["shipped"]["heldout_mean"]["psnr"],
        "load_average_after": os.getloadavg(),
        "note": "quality comparison at equal steps and seed; wall times are not a speed result (the load average "
                "says whether the machine was shared)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps({k: runs[k]["heldout_mean"] for k in runs}, indent=2))
    print(f"prepared - shipped PSNR: {record['psnr_prepared_minus_shipped']:+.2f} dB; recorded in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
