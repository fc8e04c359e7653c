"""Every kernel against its PyTorch reference on one device, at odd sizes: the cases of
tests/kernels/test_cuda_kernels.py, kept here so the AOT export (kernels/aot.py) can compile exactly the kernels
they call and the GPU check can run them on a machine without the TVM compiler.

  run_checks(device, quick=False) -> [Check]      every case; quick uses the small token counts only
  python -m kernels.selfcheck --device cuda [--json FILE]   prints one line per case, exit 1 on any failure

Tolerances are those of the CPU kernel tests (1e-4; 1e-2 for fp16 MatShift; hash codes bit-exact except where a
projection is within 1e-4 of zero, whose sign may depend on the summation order).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gnt_shiftadd.models.transformers import FeedForward, ViewAttention
from gnt_shiftadd.shiftadd.hashed_attention import pack_bits
from gnt_shiftadd.shiftadd.moe import MoEFeedForward
from gnt_shiftadd.shiftadd.reparameterize import shift_feedforward
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec
from kernels.dispatch import recording
from kernels.ffn import ffn_sublayer, ffn_weights, reference_ffn_sublayer
from kernels.hashed_attention import hash_pack, linear_attention, quadratic_attention, reference_hash_pack, \
    reference_linear, reference_quadratic
from kernels.mat_shift import mat_shift, reference_mat_shift
from kernels.view_attention import PreparedViewWeights, reference_view_attention, view_attention, \
    view_attention_weights
from kernels.view_blend import PreparedBlendWeights, reference_view_blend, view_blend
from kernels.view_features import ViewFeatureWeights, reference_view_features, view_features

__all__ = ["TOKENS", "RAYS", "Check", "mat_shift_checks", "ffn_checks", "view_checks", "hashed_checks", "run_checks"]

TOKENS = [1, 17, 4096 + 3]  # one token, a partial tile, many tiles plus a tail
RAYS = [1, 37, 2048]
FFN_KINDS = ("dense", "shift", "moe")


@dataclass
class Check:
    """One kernel output against its reference; `ran` says how the kernels ran ({kernel: "tvm" | "reference"})."""

    label: str
    got: torch.Tensor
    expected: torch.Tensor
    tol: float
    ran: dict
    ignore_bits: torch.Tensor | None = None  # int words: bits allowed to differ (hash codes near zero)

    def error(self) -> str | None:
        """None when the output matches its reference, else what differs."""
        if self.ignore_bits is not None:
            differing = (self.got ^ self.expected) & ~self.ignore_bits
            count = int((differing != 0).sum())
            return None if count == 0 else f"{count} hash words differ beyond the near-zero projections"
        try:
            torch.testing.assert_close(self.got.float(), self.expected.float(), rtol=self.tol, atol=self.tol)
        except AssertionError as failure:
            return str(failure).strip().splitlines()[0] + " " + " ".join(str(failure).split())[:300]
        return None

    def summary(self) -> dict:
        return {"label": self.label, "ok": self.error() is None, "error": self.error(), "ran": self.ran,
                "shape": list(self.got.shape), "dtype": str(self.got.dtype).replace("torch.", ""),
                "max_abs_diff": None if self.ignore_bits is not None else
                float((self.got.float() - self.expected.float()).abs().max()) if self.got.numel() else 0.0}


def _ran(fn):
    record: dict = {}
    with recording(record), torch.no_grad():
        out = fn()
    return out, record


def mat_shift_checks(device: torch.device, tokens: int, dtype: torch.dtype) -> list[Check]:
    torch.manual_seed(0)
    packed = ShiftLinear.from_linear(torch.nn.Linear(33, 70), ShiftSpec()).export_codes()
    packed = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in packed.items()}
    x = torch.randn(tokens, 33, device=device, dtype=dtype)
    got, ran = _ran(lambda: mat_shift(x, packed, "relu"))
    return [Check(f"mat_shift[{tokens},{str(dtype).replace('torch.', '')}]", got,
                  reference_mat_shift(x, packed, "relu"), 1e-2 if dtype == torch.float16 else 1e-4, ran)]


def ffn_checks(device: torch.device, tokens: int, kind: str) -> list[Check]:
    torch.manual_seed(1)
    dense = FeedForward(32, 128).eval()
    ff = {"dense": dense, "shift": shift_feedforward(dense, ShiftSpec()).eval(),
          "moe": MoEFeedForward([dense, shift_feedforward(dense, ShiftSpec())], dim=32, dispatch="sorted")}[kind]
    if kind == "moe":
        torch.nn.init.normal_(ff.router.weight)
    w = ffn_weights(torch.nn.LayerNorm(32, eps=1e-6).to(device), ff.to(device).eval())
    x = torch.randn(tokens, 32, device=device)
    got, ran = _ran(lambda: ffn_sublayer(x, w))
    return [Check(f"ffn_sublayer[{kind},{tokens}]", got, reference_ffn_sublayer(x, w), 1e-4, ran)]


def view_checks(device: torch.device, tokens: int) -> list[Check]:
    """The fused view attention, the fused front end and the blend head's view blend (8 views, width 32), a token no
    view sees included."""
    torch.manual_seed(2)
    views, dim = 8, 32
    weights = PreparedViewWeights.from_dict(view_attention_weights(ViewAttention(dim).to(device).eval()))
    qp, features = torch.randn(tokens, dim, device=device), torch.randn(tokens, views, dim, device=device)
    ray_diff = torch.randn(tokens, views, 4, device=device)
    mask = (torch.rand(tokens, views, device=device) > 0.3).float()
    mask[0] = 0
    got, ran = _ran(lambda: view_attention(qp, features, ray_diff, mask, weights))
    checks = [Check(f"view_attention[{tokens}]", got,
                    reference_view_attention(qp, features, ray_diff, mask, weights.source), 1e-4, ran)]
    front = ViewFeatureWeights.from_linears(torch.nn.Linear(35, dim).to(device), torch.nn.Linear(dim, dim).to(device))
    rgb, feat = torch.rand(views, 3, tokens, device=device), torch.randn(views, 32, tokens, device=device)
    (got_features, got_q), ran = _ran(lambda: view_features(rgb, feat, mask, front))
    expected_features, expected_q = reference_view_features(rgb, feat, mask, front)
    checks += [Check(f"view_features.features[{tokens}]", got_features, expected_features, 1e-4, ran),
               Check(f"view_features.q0[{tokens}]", got_q, expected_q, 1e-4, ran)]
    blend = PreparedBlendWeights.from_linears(torch.nn.Linear(2 * dim + 4, dim).to(device),
                                              torch.nn.Linear(dim, 1).to(device))
    hq, colors = blend.per_sample(qp), torch.rand(tokens, views, 3, device=device)
    got, ran = _ran(lambda: view_blend(hq, features, colors, ray_diff, mask, blend))
    checks.append(Check(f"view_blend[{tokens}]", got, reference_view_blend(hq, features, colors, ray_diff, mask,
                                                                          *blend.kernel_arguments()), 1e-4, ran))
    return checks


def hashed_checks(device: torch.device, rays: int) -> list[Check]:
    """hash + pack (bit-exact away from zero), XOR/popcount softmax attention and the additive linear form."""
    torch.manual_seed(3)
    heads, samples, head_dim, bits = 4, 24, 8, 16
    q, k, v = (torch.randn(rays, heads, samples, head_dim, device=device) for _ in range(3))
    weight, bias = torch.randn(heads, head_dim, bits, device=device), torch.randn(heads, bits, device=device) * 0.1
    (words_q, words_k), ran = _ran(lambda: (hash_pack(q, weight, bias), hash_pack(k, weight, bias)))
    projection = torch.einsum("rhsd,hdn->rhsn", q, weight) + bias[None, :, None, :]
    near_zero = pack_bits((projection.abs() < 1e-4).long())
    checks = [Check(f"hash_pack[{rays}]", words_q, reference_hash_pack(q, weight, bias), 0.0, ran, near_zero)]
    scale = torch.full((heads,), 0.3, device=device)
    got, ran = _ran(lambda: quadratic_attention(words_q, words_k, v, scale, bits))
    checks.append(Check(f"hashed_quadratic[{rays}]", got, reference_quadratic(words_q, words_k, v, scale, bits),
                        1e-4, ran))
    got, ran = _ran(lambda: linear_attention(words_q, words_k, v, bits))
    checks.append(Check(f"hashed_linear[{rays}]", got, reference_linear(words_q, words_k, v, bits), 1e-4, ran))
    return checks


def run_checks(device: torch.device | str, quick: bool = False) -> list[Check]:
    """Every case on `device` (quick: the two small sizes only; the kernels requested are the same)."""
    device = torch.device(device)
    tokens, rays = (TOKENS[:2], RAYS[:2]) if quick else (TOKENS, RAYS)
    checks: list[Check] = []
    for n in tokens:
        for dtype in (torch.float32, torch.float16):
            checks += mat_shift_checks(device, n, dtype)
        for kind in FFN_KINDS:
            checks += ffn_checks(device, n, kind)
        checks += view_checks(device, n)
    for r in rays:
        checks += hashed_checks(device, r)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    from kernels.aot import install_from_environment  # noqa: PLC0415 (cycle: aot -> selfcheck for its requests)

    install_from_environment()
    results = [check.summary() for check in run_checks(args.device, args.quick)]
    for result in results:
        fell_back = [k for k, how in result["ran"].items() if how != "tvm"]
        status = "ok" if result["ok"] and not fell_back else "FAIL"
        print(f"{status:4s} {result['label']:36s} ran {result['ran']}" + (f"  {result['error']}" if result["error"]
                                                                           else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "checks": results}, indent=1))
    failed = [r for r in results if not r["ok"] or any(how != "tvm" for how in r["ran"].values())]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
