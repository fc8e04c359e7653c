"""Held-out quality right after converting the trained dense GNT into each variant (no fine-tuning), next to
the fine-tuned grid: what the brief fine-tuning recovers.

  python benchmarks/conversion_quality.py --config configs/fern.yaml --teacher outputs/fern_cpu/checkpoints/latest.pt \
      --grid results/fern_shiftadd_cpu.json --out results/fern_conversion_cpu.json eval.stride=2
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import load_config  # noqa: E402
from gnt_shiftadd.evaluation.evaluate import environment  # noqa: E402
from gnt_shiftadd.runtime import tune_cpu_allocator  # noqa: E402
from gnt_shiftadd.variants import conversion_quality  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--teacher", required=True, help="trained dense GNT checkpoint")
    parser.add_argument("--grid", help="the fine-tuned grid's JSON (benchmarks/shiftadd_grid.py) to compare with")
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    tune_cpu_allocator()
    base = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as images:
        converted = conversion_quality(base, args.teacher, images, only=args.only)
    grid = json.loads(Path(args.grid).read_text())["variants"] if args.grid else {}
    rows = {}
    for name, metrics in converted.items():
        tuned = grid.get(name, {}).get("heldout_mean")
        rows[name] = {"converted": metrics, "fine_tuned": tuned,
                      "recovered_db": tuned["psnr"] - metrics["psnr"] if tuned else None}
        print(f"{name:24s} converted {metrics['psnr']:.2f} dB" + (f"  fine-tuned {tuned['psnr']:.2f} dB" if tuned else ""))
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "environment": environment(),
              "teacher": args.teacher, "eval_stride": base.eval.stride, "variants": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
