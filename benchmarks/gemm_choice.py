"""Evidence for kernels.apply's gemm="auto" on this machine: MatShift and the fused FFN kernel vs BLAS GEMMs on
the decoded +-2^k weights, at the shapes a fern render chunk uses, same run.

  python benchmarks/gemm_choice.py --config configs/fern.yaml --out results/gemm_choice_cpu.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import load_config  # noqa: E402
from gnt_shiftadd.evaluation.evaluate import environment  # noqa: E402
from gnt_shiftadd.evaluation.timing import median_seconds  # noqa: E402
from gnt_shiftadd.models.transformers import FeedForward  # noqa: E402
from gnt_shiftadd.runtime import tune_cpu_allocator  # noqa: E402
from gnt_shiftadd.shiftadd.reparameterize import shift_feedforward  # noqa: E402
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec, decode_shift_codes  # noqa: E402
from kernels.ffn import ffn_sublayer, ffn_weights, gemm_ffn_sublayer  # noqa: E402
from kernels.mat_shift import mat_shift  # noqa: E402


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    tune_cpu_allocator()
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cpu")
    torch.manual_seed(0)
    dim, hidden = cfg.model.netwidth, cfg.model.ff_mult * cfg.model.netwidth
    tokens = cfg.render.chunk_rays * cfg.render.n_samples
    x = torch.randn(tokens, dim)
    rows = []
    for in_features, out_features, where in ((dim, dim, "attention q/k/v/out"), (dim, hidden, "FFN fc1"),
                                             (hidden, dim, "FFN fc2")):
        inputs = x if in_features == dim else torch.randn(tokens, in_features)
        packed = ShiftLinear.from_linear(torch.nn.Linear(in_features, out_features), ShiftSpec()).export_codes()
        weight, bias = decode_shift_codes(packed), packed["bias"]
        tvm_s = median_seconds(lambda: mat_shift(inputs, packed), device, args.repeats)
        blas_s = median_seconds(lambda: torch.addmm(bias, inputs, weight.t()), device, args.repeats)
        rows.append({"op": f"shift linear [{tokens},{in_features}]x[{in_features},{out_features}] ({where})",
                     "tvm_ms": tvm_s * 1e3, "blas_ms": blas_s * 1e3, "tvm_speedup": blas_s / tvm_s})
    norm = torch.nn.LayerNorm(dim, eps=1e-6)
    dense = FeedForward(dim, hidden).eval()
    for name, ff in (("dense", dense), ("shift", shift_feedforward(dense, ShiftSpec()).eval())):
        w = ffn_weights(norm, ff)
        tvm_s = median_seconds(lambda: ffn_sublayer(x, w), device, args.repeats)
        blas_s = median_seconds(lambda: gemm_ffn_sublayer(x, w), device, args.repeats)
        rows.append({"op": f"FFN sublayer ({name}) [{tokens},{dim}] hidden {hidden}", "tvm_ms": tvm_s * 1e3,
                     "blas_ms": blas_s * 1e3, "tvm_speedup": blas_s / tvm_s})
    for row in rows:
        print(f"{row['op']:60s} tvm {row['tvm_ms']:7.2f} ms  blas {row['blas_ms']:7.2f} ms  x{row['tvm_speedup']:.2f}")
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "environment": environment(),
              "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
