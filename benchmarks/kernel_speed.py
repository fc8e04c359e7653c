"""TVM kernels vs PyTorch, same machine, same run: per kernel, and ms per rendered fern frame end to end.

  python benchmarks/kernel_speed.py --config configs/fern.yaml --out results/kernels_cpu.json \
      --dense outputs/fern_cpu_a_dense/checkpoints/latest.pt \
      --shiftadd c=outputs/fern_cpu_c_hash_shift_linears/checkpoints/latest.pt \
      --shiftadd e=outputs/fern_cpu_e_moe/checkpoints/latest.pt eval.stride=2

Per kernel (shapes of one render chunk of the config): MatShift vs torch addmm(+relu); the fused FFN sublayer
(dense, shift, MoE) vs the PyTorch block (LN + FFN + residual; MoE with its sync-free dispatch); the fused view
attention vs `ViewAttention`; hashed attention (quadratic and linear) vs the PyTorch cores and vs dense SDPA.
End to end (held-out view 8 of the scene at eval.stride): dense GNT eager fp32, dense GNT torch.compile, dense
GNT on the TVM kernels, and each ShiftAdd variant on the PyTorch reference and on the TVM kernels, with the PSNR
of the rendered frame (TVM must match the reference) and a breakdown by component (CNN, view attention, ray
attention, FFN, rest = projection into the views, feature MLP, position fusion, head).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import load_config  # noqa: E402
from gnt_shiftadd.training.checkpoint import config_of_checkpoint  # noqa: E402
from gnt_shiftadd.evaluation.evaluate import environment  # noqa: E402
from gnt_shiftadd.evaluation.metrics import psnr  # noqa: E402
from gnt_shiftadd.evaluation.timing import median_seconds, render_heldout, sync  # noqa: E402
from gnt_shiftadd.shiftadd.hashed_attention import HashedLinearAttention, HashedQuadraticAttention  # noqa: E402
from gnt_shiftadd.shiftadd.moe import MoEFeedForward  # noqa: E402
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec  # noqa: E402
from gnt_shiftadd.shiftadd.reparameterize import shift_feedforward  # noqa: E402
from gnt_shiftadd.models.transformers import FeedForward, ViewAttention  # noqa: E402
from gnt_shiftadd.workflows import load_trained  # noqa: E402
from kernels import apply as kernel_apply  # noqa: E402
from kernels.ffn import ffn_sublayer, ffn_weights  # noqa: E402
from kernels.hashed_attention import hash_pack, linear_attention, quadratic_attention  # noqa: E402
from kernels.mat_shift import mat_shift  # noqa: E402
from kernels.view_attention import view_attention, view_attention_weights  # noqa: E402
from kernels.view_features import ViewFeatureWeights, view_features  # noqa: E402
from gnt_shiftadd.models.gnt import masked_max_over_views  # noqa: E402
from gnt_shiftadd.runtime import allocator_state, tune_cpu_allocator  # noqa: E402


# ------------------------------------------------------------------------------------------------- per kernel


@torch.no_grad()
def kernel_benchmarks(cfg, device: torch.device, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    dim, views = cfg.model.netwidth, cfg.data.num_source_views
    hidden = cfg.model.ff_mult * dim
    tokens = cfg.render.chunk_rays * cfg.render.n_samples
    rows = []

    def row(name, shape, tvm_fn, torch_fn, torch_name):
        tvm_s, torch_s = median_seconds(tvm_fn, device, repeats), median_seconds(torch_fn, device, repeats)
        rows.append({"kernel": name, "shape": shape, "tvm_ms": tvm_s * 1e3, "torch_ms": torch_s * 1e3,
                     "torch_op": torch_name, "speedup": torch_s / tvm_s})
        print(f"{name:28s} {shape:34s} tvm {tvm_s * 1e3:8.2f} ms  torch {torch_s * 1e3:8.2f} ms  "
              f"x{torch_s / tvm_s:5.2f}  ({torch_name})")

    x = torch.randn(tokens, dim, device=device)
    linear = torch.nn.Linear(dim, hidden).to(device)
    shift = ShiftLinear.from_linear(linear, ShiftSpec()).to(device)
    packed = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in shift.export_codes().items()}
    weight, bias = shift.effective_weight().detach(), shift.bias.detach()
    row("mat_shift+bias+relu", f"[{tokens},{dim}]x[{dim},{hidden}]", lambda: mat_shift(x, packed, "relu"),
        lambda: torch.relu(torch.addmm(bias, x, weight.t())), "relu(addmm)")

    norm = torch.nn.LayerNorm(dim, eps=1e-6).to(device)
    dense_ff = FeedForward(dim, hidden).to(device).eval()
    shift_ff = shift_feedforward(dense_ff, ShiftSpec()).eval()
    moe = MoEFeedForward([dense_ff, shift_feedforward(dense_ff, ShiftSpec())], dim=dim, dispatch="sorted").to(device)
    torch.nn.init.normal_(moe.router.weight)
    moe.eval()
    for name, ff in (("dense", dense_ff), ("shift", shift_ff), ("moe", moe)):
        w = ffn_weights(norm, ff)
        row(f"ffn_sublayer[{name}]", f"[{tokens},{dim}] hidden {hidden}", lambda w=w: ffn_sublayer(x, w),
            lambda ff=ff: x + ff(norm(x)), "x + ff(LN(x)) eager")

    attention = ViewAttention(dim).to(device).eval()
    view_tokens = tokens
    features = torch.randn(view_tokens, views, dim, device=device)
    ray_diff = torch.randn(view_tokens, views, 4, device=device)
    mask = (torch.rand(view_tokens, views, device=device) > 0.2).float()
    qp = torch.randn(view_tokens, dim, device=device)
    weights = view_attention_weights(attention)
    # the module applies q_fc and out_fc itself; the kernel covers everything in between
    q_in = torch.randn(view_tokens, 1, dim, device=device)
    row("view_attention", f"[{view_tokens},{views},{dim}]",
        lambda: view_attention(qp, features, ray_diff, mask, weights),
        lambda: attention(q_in, features[:, None], ray_diff[:, None], mask[:, None, :, None]),
        "ViewAttention eager (incl. q_fc/out_fc)")

    feat_channels = cfg.model.feature_channels
    rgb_s = torch.rand(views, 3, tokens, device=device)
    feat_s = torch.randn(views, feat_channels, tokens, device=device)
    mask_s = (torch.rand(tokens, views, device=device) > 0.2).float()
    fc1, fc2 = torch.nn.Linear(3 + feat_channels, dim).to(device), torch.nn.Linear(dim, dim).to(device)
    front_weights = ViewFeatureWeights.from_linears(fc1, fc2)

    def torch_front():  # what GNT does after grid_sample: concatenate, per-view MLP, max-pool the visible views
        rgb_feat = torch.cat([rgb_s.permute(2, 0, 1), feat_s.permute(2, 0, 1)], dim=-1)
        features = fc2(torch.relu(fc1(rgb_feat)))
        return features, masked_max_over_views(features, mask_s[..., None])

    row("view_features", f"[{tokens},{views},{3 + feat_channels}]->{dim}",
        lambda: view_features(rgb_s, feat_s, mask_s, front_weights), torch_front, "cat + rgbfeat MLP + max-pool eager")

    heads, samples = cfg.model.num_heads, cfg.render.n_samples
    rays = cfg.render.chunk_rays
    head_dim = dim // heads
    q, k, v = (torch.randn(rays, heads, samples, head_dim, device=device) for _ in range(3))
    quadratic = HashedQuadraticAttention(heads, head_dim, cfg.shiftadd.hash_bits).to(device)
    linear_core = HashedLinearAttention(heads, head_dim, cfg.shiftadd.hash_bits).to(device)
    hw, hb = quadratic.hasher.weight.detach(), quadratic.hasher.bias.detach()
    scale, n_bits = quadratic.scale.detach(), cfg.shiftadd.hash_bits
    lw, lb = linear_core.hasher.weight.detach(), linear_core.hasher.bias.detach()
    shape = f"[{rays},{heads},{samples},{head_dim}] {n_bits} bits"
    row("hashed_quadratic(+hashing)", shape,
        lambda: quadratic_attention(hash_pack(q, hw, hb), hash_pack(k, hw, hb), v, scale, n_bits),
        lambda: quadratic(q, k, v), "HashedQuadraticAttention eager")
    row("hashed_quadratic(+hashing)", shape,
        lambda: quadratic_attention(hash_pack(q, hw, hb), hash_pack(k, hw, hb), v, scale, n_bits),
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), "dense SDPA")
    row("hashed_linear(+hashing)", shape,
        lambda: linear_attention(hash_pack(q, lw, lb), hash_pack(k, lw, lb), v, n_bits),
        lambda: linear_core(q, k, v), "HashedLinearAttention eager")
    return rows


# ------------------------------------------------------------------------------------------------- end to end


class ComponentTimer:
    """Milliseconds per component of one render: hooks on the CNN, the blocks and the blocks' FFNs (PyTorch
    path), plus the fused FFN kernel calls (TVM path). An FFN's time is booked as FFN, not as its block's."""

    def __init__(self, model, device):
        self.device, self.totals, self.handles, self._starts, self._open_blocks = device, {}, [], {}, []
        transformer = model.transformer
        hooked = [(model.feature_net, "cnn")]
        for block in transformer.view_blocks:
            hooked += [(block, "view_attention"), (block.ffn, "ffn")]
        for block in transformer.ray_blocks:
            hooked += [(block, "ray_attention"), (block.ffn, "ffn")]
        for module, kind in hooked:
            self.handles.append(module.register_forward_pre_hook(lambda m, a, k=kind: self._start(m, k)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, k=kind: self._stop(m, k)))

    def _start(self, module, kind):
        sync(self.device)
        self._starts[id(module)] = time.perf_counter()
        self._open_blocks.append(kind)

    def _stop(self, module, kind):
        sync(self.device)
        elapsed = time.perf_counter() - self._starts.pop(id(module))
        self._open_blocks.pop()
        self.totals[kind] = self.totals.get(kind, 0.0) + elapsed
        if kind == "ffn" and self._open_blocks:  # nested in a block: take it out of the block's share
            parent = self._open_blocks[-1]
            self.totals[parent] = self.totals.get(parent, 0.0) - elapsed

    def close(self):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def end_to_end(label, overrides, ckpt, backend, compile_model, view, repeats):
    """Render held-out `view` with the checkpoint's own model config (+ overrides) on `backend`."""
    cfg = load_config(None, [*overrides, f"render.kernels={backend}"], base=config_of_checkpoint(ckpt))
    model, tensors, _ = load_trained(cfg, ckpt)
    if compile_model:
        model.transformer = torch.compile(model.transformer, dynamic=False)
    scene = tensors.scene
    image = render_heldout(model, tensors, cfg, view)  # warm-up: builds/loads kernels, compiles
    seconds = median_seconds(lambda: render_heldout(model, tensors, cfg, view), tensors.device, repeats, warmup=0)
    target = torch.from_numpy(scene.images[view][::cfg.eval.stride, ::cfg.eval.stride]).to(image.device)
    frame_psnr = float(psnr(image.clamp(0, 1), target.float()))
    breakdown = {}
    if not compile_model:
        timer = ComponentTimer(model, tensors.device)
        try:
            tic = time.perf_counter()
            render_heldout(model, tensors, cfg, view)
            sync(tensors.device)
            total = time.perf_counter() - tic
        finally:
            timer.close()
        breakdown = {k: v * 1e3 for k, v in timer.totals.items()}
        breakdown["rest"] = total * 1e3 - sum(breakdown.values())
        breakdown["total_with_hooks"] = total * 1e3
    height, width = image.shape[:2]
    print(f"{label:34s} {seconds * 1e3:9.0f} ms/frame  PSNR {frame_psnr:.3f}  " +
          " ".join(f"{k} {v:.0f}" for k, v in breakdown.items()))
    return {"label": label, "checkpoint": str(ckpt), "backend": backend, "torch_compile": compile_model,
            "ms_per_frame": seconds * 1e3, "frame_psnr": frame_psnr, "resolution": [width, height],
            "breakdown_ms": breakdown}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dense", required=True, help="checkpoint of the dense GNT (variant a)")
    parser.add_argument("--shiftadd", action="append", default=[], metavar="NAME=CKPT",
                        help="a ShiftAdd variant's checkpoint; repeatable")
    parser.add_argument("--view", type=int, default=8, help="held-out view to render")
    parser.add_argument("--repeats", type=int, default=3, help="timed renders per row (median)")
    parser.add_argument("--kernel-repeats", type=int, default=7)
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile baseline")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    tune_cpu_allocator()
    cfg = load_config(args.config, args.overrides)
    import tvm

    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "environment": environment() | {"tvm": str(tvm.__version__), "allocator": allocator_state()},
              "device": str(device)}
    print("per kernel (one render chunk):")
    record["kernels"] = kernel_benchmarks(cfg, device, args.kernel_repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"end to end (held-out view {args.view}, stride {cfg.eval.stride}):")
    o, view, repeats = args.overrides, args.view, args.repeats
    rows = [end_to_end("dense GNT, torch eager fp32", o, args.dense, "torch", False, view, repeats)]
    if not args.skip_compile:
        rows.append(end_to_end("dense GNT, torch.compile", o, args.dense, "torch", True, view, repeats))
    if device.type == "cuda":  # the GPU's own fast baselines: half-precision autocast
        for precision in ("bf16", "fp16"):
            rows.append(end_to_end(f"dense GNT, torch eager {precision} autocast", [*o, f"render.autocast={precision}"],
                                   args.dense, "torch", False, view, repeats))
    rows.append(end_to_end("dense GNT, TVM kernels", o, args.dense, "tvm", False, view, repeats))
    for spec in args.shiftadd:
        name, ckpt = spec.split("=", 1)
        rows.append(end_to_end(f"ShiftAdd {name}, torch reference", o, ckpt, "torch", False, view, repeats))
        rows.append(end_to_end(f"ShiftAdd {name}, TVM kernels", o, ckpt, "tvm", False, view, repeats))
    baseline = rows[0]["ms_per_frame"]
    for row in rows:
        row["speedup_vs_dense_eager"] = baseline / row["ms_per_frame"]
    record["end_to_end"] = rows
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"recorded in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
