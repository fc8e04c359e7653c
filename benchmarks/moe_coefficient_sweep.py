"""How the latency-aware balance coefficient moves tokens between the Mult and Shift experts, and what the split
does to held-out quality: continue one stage-1 checkpoint (attention already hashed) into MoE FFNs for each
coefficient, with fixed expert latencies, and evaluate.

  python benchmarks/moe_coefficient_sweep.py --config configs/fern.yaml --config configs/shiftadd/e_moe.yaml \
      --stage1 outputs/fern_cpu_e_moe_stage1/checkpoints/latest.pt --latency 0.6 0.4 --coefs 0 0.1 1.0 \
      --steps 100 --out results/fern_moe_sweep_cpu.json eval.stride=2 train.val_every=0
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import load_config  # noqa: E402
from gnt_shiftadd.evaluation.evaluate import environment  # noqa: E402
from gnt_shiftadd.shiftadd.moe import MoEFeedForward  # noqa: E402
from gnt_shiftadd.evaluation.opcount import count_frame_ops  # noqa: E402
from gnt_shiftadd.training.trainer import train  # noqa: E402
from gnt_shiftadd.workflows import load_trained, run_eval  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--stage1", required=True, help="checkpoint with the attention converted, FFNs dense")
    parser.add_argument("--latency", type=float, nargs=2, required=True, metavar=("MULT", "SHIFT"))
    parser.add_argument("--coefs", type=float, nargs="+", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = None
    for path in args.config[:-1]:
        base = load_config(path, (), base=base)
    base = load_config(args.config[-1], args.overrides, base=base)
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "environment": environment(),
              "stage1": args.stage1, "latency_mult_shift": args.latency, "steps": args.steps, "runs": []}
    for coef in args.coefs:
        cfg = copy.deepcopy(base)
        cfg.name = f"{base.name}_moe_sweep_coef{coef:g}"
        cfg.train.steps, cfg.train.init_from = args.steps, args.stage1
        cfg.shiftadd.moe_balance_coef, cfg.shiftadd.moe_expert_latency = coef, list(args.latency)
        result = train(cfg, resume="auto")
        metrics = run_eval(cfg, result.checkpoint)
        model, tensors, _ = load_trained(cfg, result.checkpoint, backend="torch")  # op counts hook the modules
        ops = count_frame_ops(model, tensors, cfg)  # its forward also records the routing of held-out rays
        shares = [float(m.routing_fractions()[-1]) for m in model.modules() if isinstance(m, MoEFeedForward)]
        record["runs"].append({"balance_coef": coef, "shift_share_heldout": sum(shares) / len(shares),
                               "shift_share_per_layer": shares, "heldout_mean": metrics["mean"],
                               "energy_per_frame_pj": ops["per_frame"]["energy_pj"]})
        Path(args.out).write_text(json.dumps(record, indent=2))
    for run in record["runs"]:
        print(f"coef {run['balance_coef']:g}: shift share {run['shift_share_heldout']:.2f}, "
              f"PSNR {run['heldout_mean']['psnr']:.2f}, energy/frame {run['energy_per_frame_pj'] / 1e9:.0f} mJ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
