"""Reproduce the README's ShiftAdd variant table: convert a trained GNT into every variant in configs/shiftadd/,
fine-tune each for the same extra steps, evaluate held-out views, count ops and energy.

  python benchmarks/shiftadd_grid.py --config configs/fern.yaml --teacher outputs/fern_cpu/checkpoints/latest.pt \
      --steps 300 --out results/fern_shiftadd_cpu.json [--only a_dense b_hash_attention] [key=value ...]

Writes the JSON (command, device, versions, per-variant metrics/ops/energy/routing) and a Markdown table beside
it; finished variants are reused when re-run with the same --steps. `--recount-ops` only counts ops and energy
again for the variants the JSON holds (after a change to the op counter or the model's arithmetic; quality and
checkpoints stay as recorded) and records its own command as `ops_command`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import load_config  # noqa: E402
from gnt_shiftadd.variants import recount_variant_ops, run_variant_grid, variant_configs  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="scene/model config the teacher was trained with")
    parser.add_argument("--teacher", required=True, help="checkpoint of the trained dense GNT")
    parser.add_argument("--steps", type=int, required=True, help="extra fine-tuning steps per variant")
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--recount-ops", action="store_true",
                        help="only count ops/energy again for the variants already in --out (no training or eval)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.only:  # key=value after --only are overrides, which argparse would otherwise read as variant names
        args.overrides = [item for item in args.only if "=" in item] + args.overrides
        args.only = [item for item in args.only if "=" not in item]
        unknown = sorted(set(args.only) - set(variant_configs()))
        if unknown:
            parser.error(f"--only: no variant config named {unknown} in configs/shiftadd/ "
                         f"(known: {', '.join(variant_configs())})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    base = load_config(args.config, args.overrides)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.recount_ops:
        record = recount_variant_ops(base, args.out, only=args.only)
        record["ops_command"] = command
    else:
        record = run_variant_grid(base, args.teacher, args.steps, args.out, only=args.only)
        record["command"] = command
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
