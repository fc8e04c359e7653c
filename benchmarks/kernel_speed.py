"""Speed of ShiftAdd-GNT against every dense peer, same machine, same run: ms per rendered fern frame end to end,
the machine's arithmetic peaks, and per kernel (TVM vs PyTorch at the shapes of one render chunk).

  # trained checkpoints (the variant runs of the grid under outputs/, every configs/shiftadd/*.yaml found there)
  python benchmarks/kernel_speed.py --config configs/fern.yaml --out results/kernels_cpu.json \
      --runs-dir outputs eval.stride=2
  # or name them: --dense CKPT --shiftadd c_hash_shift_linears=CKPT ...
  # no checkpoint at all: a random-initialised fern model, every variant converted from it (calibrated on the
  # scene's rays), one 252x189 frame per row, ~10 minutes on a quiet 2-core CPU
  python benchmarks/kernel_speed.py --quick --config configs/fern.yaml --out /tmp/kernel_speed_quick.json

End to end (held-out view 8 at eval.stride): the dense peers, the same dense GNT
  - PyTorch eager fp32, torch.compile, our fused fp32 TVM kernels,
  - dynamic int8 quantization of its Linear layers (`torch.ao.quantization.quantize_dynamic`, what a CPU user
    tries first; CPU only), bf16 autocast (and fp16 on CUDA),
then every ShiftAdd variant on the TVM kernels (and on its PyTorch reference unless --no-reference). Every row is
loaded and warmed up first; then --repeats rounds each render every row once, in turn, so a drift in the machine's
speed reaches all rows alike. Each row records ms/frame (the median of its rounds, each round kept), `speedup_vs_fastest_dense`, `speedup_vs_dense_eager`, the frame's PSNR (and LPIPS when the
LPIPS weights are cached) against the held-out ground truth, which modules ran on which kernel, and its MACs per
frame (mults + shifts from gnt_shiftadd/evaluation/opcount.py: a shift layer's shift-and-add stands in for a
multiply-accumulate) over time as a fraction of the peak measured here by large fp32 / bf16 / int8 (VNNI)
matrix products (`peak_fraction` against each; `peak_fraction_own_arithmetic` against the row's main
arithmetic: int8 for the dynamic-int8 peer and the integer shift variants, bf16 under autocast, although parts of
every row stay fp32). The headline is the fastest ShiftAdd row against the fastest dense row.

Per kernel: MatShift vs torch addmm(+relu); the fused FFN sublayer (dense, shift, MoE) vs the PyTorch block (the
MoE against both dispatches: "sorted" runs every expert on every token, "gather" each expert on its tokens); the
view attention with its q/out projections on both sides vs `ViewAttention`; hashed attention (quadratic and
linear) vs the PyTorch cores and vs dense SDPA. A FILE.md table is written next to the JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from gnt_shiftadd.runtime import quiet_openmp_workers  # noqa: E402 (before torch: libgomp reads it once)

OPENMP_NOTE = quiet_openmp_workers(keep_default="--openmp-default" in sys.argv)  # no spinning beside the kernels

import torch  # noqa: E402
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import ConfigError, is_dense, load_config  # noqa: E402
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene, resolve_device  # noqa: E402
from gnt_shiftadd.training.checkpoint import config_of_checkpoint, save_checkpoint  # noqa: E402
from gnt_shiftadd.training.trainer import checkpoint_path  # noqa: E402
from gnt_shiftadd.training.warm_start import warm_start  # noqa: E402
from gnt_shiftadd.evaluation.baselines import trivial_baselines_for  # noqa: E402
from gnt_shiftadd.evaluation.evaluate import environment  # noqa: E402
from gnt_shiftadd.evaluation.lpips import LPIPSUnavailable, load_lpips, lpips_distance  # noqa: E402
from gnt_shiftadd.evaluation.metrics import psnr  # noqa: E402
from gnt_shiftadd.evaluation.timing import median_seconds, render_heldout, sync  # noqa: E402
from gnt_shiftadd.shiftadd.hashed_attention import HashedLinearAttention, HashedQuadraticAttention  # noqa: E402
from gnt_shiftadd.shiftadd.moe import MoEFeedForward  # noqa: E402
from gnt_shiftadd.evaluation.opcount import count_frame_ops  # noqa: E402
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec  # noqa: E402
from gnt_shiftadd.shiftadd.reparameterize import shift_feedforward  # noqa: E402
from gnt_shiftadd.models.transformers import FeedForward, ViewAttention  # noqa: E402
from gnt_shiftadd.variants import variant_config, variant_configs  # noqa: E402
from gnt_shiftadd.workflows import load_trained  # noqa: E402
from kernels.apply import kernel_summary  # noqa: E402
from kernels.build import match_tvm_threads_to_torch, tvm_available, tvm_thread_count, tvm_version  # noqa: E402
from kernels.dispatch import all_kernels_required  # noqa: E402
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
        baseline = "x + ff(LN(x)) eager" + (", sorted dispatch: both experts on every token" if ff is moe else "")
        row(f"ffn_sublayer[{name}]", f"[{tokens},{dim}] hidden {hidden}", lambda w=w: ffn_sublayer(x, w),
            lambda ff=ff: x + ff(norm(x)), baseline)
    # the fairer PyTorch MoE: each expert only on its own tokens (one host sync per expert for the slice sizes)
    moe_gather = copy.deepcopy(moe)
    moe_gather.dispatch = "gather"
    w = ffn_weights(norm, moe)
    row("ffn_sublayer[moe]", f"[{tokens},{dim}] hidden {hidden}", lambda: ffn_sublayer(x, w),
        lambda: x + moe_gather(norm(x)), "x + ff(LN(x)) eager, gather dispatch: each expert on its tokens")

    attention = ViewAttention(dim).to(device).eval()
    view_tokens = tokens
    features = torch.randn(view_tokens, views, dim, device=device)
    ray_diff = torch.randn(view_tokens, views, 4, device=device)
    mask = (torch.rand(view_tokens, views, device=device) > 0.2).float()
    weights = view_attention_weights(attention)
    # the module applies q_fc and out_fc itself and the kernel covers everything in between: both sides time the
    # same work, q_fc -> attention -> out_fc, as KernelViewBlock runs it in a render
    q_in = torch.randn(view_tokens, 1, dim, device=device)
    row("view_attention(+q/out proj)", f"[{view_tokens},{views},{dim}]",
        lambda: attention.out_fc(view_attention(attention.q_fc(q_in[:, 0]), features, ray_diff, mask, weights)),
        lambda: attention(q_in, features[:, None], ray_diff[:, None], mask[:, None, :, None]),
        "ViewAttention eager (q_fc/out_fc on both sides)")

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


# the parts ShiftAdd reparameterizes; everything else (CNN, front end, encodings, head, sampling) is shared with
# dense GNT, so total / (total - these) bounds any ShiftAdd speed-up of the frame (Amdahl)
BLOCK_PARTS = ("view_attention", "ray_attention", "ffn")


class ComponentTimer:
    """Self-time in seconds per part of one render, from hooks on the model's modules (PyTorch leaves or their
    kernels alike): cnn, source_views (projection into the source views, bilinear gathers, view codes), view_embedding
    (the per-view MLP + max-pool), front_end (both, when one fused kernel runs them: then those two are absent),
    view_attention / ray_attention (a block minus its FFN), ffn, pos_fuse, head, transformer (the transformer's own glue: positional encodings, concatenations).
    A part's time excludes the hooked parts nested in it, so the parts add up to the hooked total."""

    def __init__(self, model, device):
        self.device, self.totals, self.handles, self._stack = device, {}, [], []
        transformer = model.transformer
        hooked = [(model.feature_net, "cnn"), (transformer, "transformer"), (transformer.front_end, "front_end"),
                  (transformer.source_sampler, "source_views"), (transformer.view_embedding, "view_embedding"),
                  (transformer.head, "head"), (transformer.position_fusion, "pos_fuse")]
        for kind, blocks in (("view_attention", transformer.view_blocks), ("ray_attention", transformer.ray_blocks)):
            for block in blocks:
                hooked += [(block, kind), (block.ffn, "ffn")]
        for module, kind in hooked:
            self.handles.append(module.register_forward_pre_hook(lambda m, a, k=kind: self._start(k)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, k=kind: self._stop(k)))

    def _start(self, kind):
        sync(self.device)
        self._stack.append((kind, time.perf_counter()))

    def _stop(self, kind):
        sync(self.device)
        opened, started = self._stack.pop()
        assert opened == kind, (opened, kind)
        elapsed = time.perf_counter() - started
        self.totals[kind] = self.totals.get(kind, 0.0) + elapsed
        if self._stack:  # nested: take it out of the enclosing part's share
            parent = self._stack[-1][0]
            self.totals[parent] = self.totals.get(parent, 0.0) - elapsed

    def close(self):
        for handle in self.handles:
            handle.remove()


def component_breakdown(model, tensors, cfg, view: int, mode: str = "fp32") -> dict:
    """ms per part of one extra (hooked) render of `view` (ComponentTimer's parts), `rest` (outside every hooked
    module: rays, sample placement, chunking; the projection and gathers are `source_views`), the hooked
    total, and `blocks_bound`: the frame's speed-up if the ShiftAdd-reparameterized parts (BLOCK_PARTS) took no
    time at all."""
    timer = ComponentTimer(model, tensors.device)
    try:
        tic = time.perf_counter()
        with precision_context(mode, tensors.device):
            render_heldout(model, tensors, cfg, view)
        sync(tensors.device)
        total = time.perf_counter() - tic
    finally:
        timer.close()
    breakdown = {k: v * 1e3 for k, v in timer.totals.items()}
    breakdown["rest"] = total * 1e3 - sum(breakdown.values())
    breakdown["total_with_hooks"] = total * 1e3
    blocks = sum(breakdown.get(k, 0.0) for k in BLOCK_PARTS)
    breakdown["blocks_bound"] = breakdown["total_with_hooks"] / max(breakdown["total_with_hooks"] - blocks, 1e-9)
    return breakdown


# ------------------------------------------------------------------------------------------------- peaks


@torch.no_grad()
def measure_peaks(device: torch.device, size: int = 2048, repeats: int = 5) -> dict:
    """{arithmetic: {"gmac_per_s", "op", ...}} from [size]^3 matrix products: fp32 (FMA), bf16, int8 x int8 ->
    int32 (`torch._int_mm`: VNNI vpdpbusd on this CPU), fp16 on CUDA. The denominators of every row's peak
    fraction. An arithmetic this build or device lacks gets a null rate and the error, never a made-up one."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device) for _ in range(2))
    a8, b8 = (torch.randint(-128, 128, (size, size), dtype=torch.int8, generator=generator).to(device) for _ in range(2))
    a16, b16 = a.bfloat16(), b.bfloat16()
    products = {"fp32": (lambda: a @ b, "a @ b, fp32"),
                "bf16": (lambda: a16 @ b16, "a @ b, bf16 x bf16"),
                "int8": (lambda: torch._int_mm(a8, b8), "torch._int_mm, int8 x int8 -> int32")}
    if device.type == "cuda":
        h, g = a.half(), b.half()
        products["fp16"] = (lambda: h @ g, "a @ b, fp16 x fp16")
    peaks = {}
    for name, (fn, op) in products.items():
        entry = {"op": op, "shape": [size, size, size]}
        try:
            entry["gmac_per_s"] = size ** 3 / median_seconds(fn, device, repeats, warmup=1) / 1e9
        except RuntimeError as error:
            entry |= {"gmac_per_s": None, "error": str(error).splitlines()[0]}
        peaks[name] = entry
        print(f"peak {name:5s} {op:40s} " + (f"{entry['gmac_per_s']:7.1f} GMAC/s" if entry["gmac_per_s"] else
                                              f"unavailable: {entry['error']}"))
    return peaks


# ------------------------------------------------------------------------------------------------- end to end

# peer name -> (render.kernels, precision mode, label). "eager" is the reference every speed-up is also given against.
DENSE_PEERS = {
    "eager": ("torch", "fp32", "dense GNT, PyTorch eager fp32"),
    "compile": ("torch", "compile", "dense GNT, torch.compile fp32"),
    "tvm": ("tvm", "fp32", "dense GNT, TVM kernels fp32"),
    "int8": ("torch", "int8_dynamic", "dense GNT, torch.ao dynamic int8 Linear layers"),
    "bf16": ("torch", "bf16", "dense GNT, bf16 autocast"),
    "fp16": ("torch", "fp16", "dense GNT, fp16 autocast"),
}
DEFAULT_PEERS = {"cpu": ["eager", "compile", "tvm", "int8", "bf16"], "cuda": ["eager", "compile", "tvm", "bf16", "fp16"]}
ARITHMETIC = {"fp32": "fp32", "compile": "fp32", "int8_dynamic": "int8", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class RowSpec:
    """One end-to-end row: which model (dense peer or ShiftAdd variant), on which backend and precision."""

    label: str
    family: str  # "dense" (a peer) | "shiftadd"
    variant: str  # "dense" or the configs/shiftadd/ name
    checkpoint: str
    backend: str  # render.kernels: torch | tvm
    mode: str = "fp32"  # fp32 | compile | int8_dynamic | bf16 | fp16
    integer_bits: int = 0  # shiftadd.int_activations of an integer shift variant (its shift layers' arithmetic)

    @property
    def arithmetic(self) -> str:
        return f"int{self.integer_bits}" if self.integer_bits else ARITHMETIC[self.mode]


def precision_context(mode: str, device: torch.device):
    """bf16/fp16 autocast for the whole render (CNN included), on CPU as on CUDA."""
    if mode in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)
    return contextlib.nullcontext()


def prepare_model(spec: RowSpec, model, device: torch.device):
    """(model to render with, what runs where) for the row's mode. A "tvm" row is checked while it renders
    (time_row: kernels.dispatch.all_kernels_required fails it if any module fell back to the reference)."""
    if spec.backend == "tvm":
        return model, f"TVM kernels: {kernel_summary(model)}; the rest PyTorch fp32"
    if spec.mode == "compile":
        model.transformer = torch.compile(model.transformer, dynamic=False)
        return model, "PyTorch; transformer under torch.compile (inductor)"
    if spec.mode == "int8_dynamic":
        if device.type != "cpu":
            raise ValueError(f"{spec.label}: torch.ao dynamic quantization runs on the CPU only")
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        quantized = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())
        return model, (f"PyTorch; {quantized} nn.Linear as dynamic int8 "
                       f"({torch.backends.quantized.engine} engine), convolutions and the rest fp32")
    if spec.mode in ("bf16", "fp16"):
        return model, f"PyTorch under {spec.mode} autocast"
    return model, "PyTorch reference modules, fp32"


@torch.no_grad()
def frame_macs(ckpt: str, overrides: list[str], view: int, rendered_pixels: int) -> dict:
    """Multiply-accumulates of one rendered frame, counted by gnt_shiftadd.evaluation.opcount on a real forward pass:
    (mults + shifts) per ray x rendered pixels + the CNN's mults on the source views."""
    cfg = load_config(None, overrides, base=config_of_checkpoint(ckpt))
    model, tensors, _ = load_trained(cfg, ckpt, backend="torch")  # the hooks count the PyTorch modules
    ops = count_frame_ops(model, tensors, cfg, view=view)
    per_ray = ops["per_ray"]
    cnn_mults = ops["per_frame"]["by_component"].get("cnn", {}).get("mult_fp32", 0.0)
    return {"macs": (per_ray["mults"] + per_ray["shifts"]) * rendered_pixels + cnn_mults,
            "mults_per_ray": per_ray["mults"], "shifts_per_ray": per_ray["shifts"], "cnn_mults": cnn_mults,
            "rendered_pixels": rendered_pixels,
            # the unit-energy model (opcount.UNIT_ENERGY_PJ; 8-bit shifts where activations are 8-bit) for one
            # full-resolution frame, CNN included, as in the grid's table
            "energy_mj_full_frame": ops["per_frame"]["energy_pj"] * 1e-9}


@dataclass
class LiveRow:
    """A row loaded, prepared and warmed up, ready for its timed renders (see time_rows)."""

    spec: RowSpec
    cfg: object
    model: object
    tensors: object
    ran: str
    render: Callable[[], None]
    frames: list
    seconds: list = field(default_factory=list)


@torch.no_grad()
def start_row(spec: RowSpec, overrides: list[str], view: int, light_warmup: bool = False) -> LiveRow:
    """Load the checkpoint with its own model config (+ overrides), prepare the row's mode, render once untimed
    (builds/loads kernels, compiles). light_warmup: warm up on a 4x coarser frame (same chunk size, so the same
    kernels and allocations), except under torch.compile, whose static shapes need the real frame's last chunk."""
    cfg = load_config(None, [*overrides, f"render.kernels={spec.backend}"], base=config_of_checkpoint(spec.checkpoint))
    model, tensors, _ = load_trained(cfg, spec.checkpoint)
    model, ran = prepare_model(spec, model, tensors.device)
    warm_cfg = copy.deepcopy(cfg)
    if light_warmup and spec.mode != "compile":
        warm_cfg.eval.stride = cfg.eval.stride * 4
    frames: list = []

    def render(render_cfg=cfg):
        with precision_context(spec.mode, tensors.device):
            frames[:] = [render_heldout(model, tensors, render_cfg, view)]

    render(warm_cfg)
    return LiveRow(spec, cfg, model, tensors, ran, render, frames)


@torch.no_grad()
def time_rows(rows: list[LiveRow], repeats: int) -> list[dict]:
    """`repeats` rounds, each rendering every row once in turn, so a drift in this shared machine's speed reaches
    every row alike (rows timed one after the other moved 10-30% against each other). Each row timed as "tvm"
    fails if any module fell back to the reference in its timed renders; returns what each row's modules ran."""
    with contextlib.ExitStack() as stack:
        ran = [stack.enter_context(all_kernels_required(row.model)) if row.spec.backend == "tvm" else {}
               for row in rows]
        for _ in range(repeats):
            for row in rows:
                sync(row.tensors.device)
                tic = time.perf_counter()
                row.render()
                sync(row.tensors.device)
                row.seconds.append(time.perf_counter() - tic)
    return ran


@torch.no_grad()
def finish_row(row: LiveRow, kernels_ran: dict, view: int, breakdown: bool, lpips_model) -> dict:
    """The row's record: median of its timed renders, frame PSNR/LPIPS of its last frame against the ground truth,
    and (breakdown) per-component times from one extra hooked render."""
    spec, cfg, scene = row.spec, row.cfg, row.tensors.scene
    seconds = statistics.median(row.seconds)
    image = row.frames[0].float()  # the last timed frame
    target = torch.from_numpy(scene.images[view][::cfg.eval.stride, ::cfg.eval.stride]).to(image.device).float()
    frame_psnr = float(psnr(image.clamp(0, 1), target))
    frame_lpips = lpips_distance(image.clamp(0, 1), target, model=lpips_model) if lpips_model is not None else None
    # hooks do not fire inside a torch.compile graph: that row has no breakdown
    parts = component_breakdown(row.model, row.tensors, cfg, view, spec.mode) \
        if breakdown and spec.mode != "compile" else {}
    height, width = image.shape[:2]
    print(f"{spec.label:58s} {seconds * 1e3:9.0f} ms/frame  PSNR {frame_psnr:.3f}  " +
          " ".join(f"{k} {v:.0f}" for k, v in parts.items()))
    return asdict(spec) | {"arithmetic": spec.arithmetic, "ran": row.ran, "kernels_ran": kernels_ran,
                           "ms_per_frame": seconds * 1e3, "repeats": len(row.seconds),
                           "rounds_ms": [t * 1e3 for t in row.seconds], "frame_psnr": frame_psnr,
                           "frame_lpips": frame_lpips, "resolution": [width, height], "breakdown_ms": parts}


def summarize(rows: list[dict], peaks: dict) -> dict | None:
    """Add speed-ups and peak fractions to every row; return the headline (fastest ShiftAdd row vs fastest dense)."""
    dense = [r for r in rows if r["family"] == "dense"]
    eager = next(r for r in dense if r["backend"] == "torch" and r["mode"] == "fp32")
    fastest = min(dense, key=lambda r: r["ms_per_frame"])
    for row in rows:
        row["speedup_vs_fastest_dense"] = fastest["ms_per_frame"] / row["ms_per_frame"]
        row["speedup_vs_dense_eager"] = eager["ms_per_frame"] / row["ms_per_frame"]
        gmacs = row["macs_per_frame"] / (row["ms_per_frame"] * 1e-3) / 1e9
        row["gmac_per_s"] = gmacs
        row["peak_fraction"] = {name: (gmacs / p["gmac_per_s"] if p.get("gmac_per_s") else None)
                                for name, p in peaks.items()}
        row["peak_fraction_own_arithmetic"] = row["peak_fraction"].get(row["arithmetic"])
    shiftadd = [r for r in rows if r["family"] == "shiftadd"]
    if not shiftadd:
        return None
    best = min(shiftadd, key=lambda r: r["ms_per_frame"])
    return {"best_shiftadd": best["label"], "best_shiftadd_ms": best["ms_per_frame"],
            "fastest_dense": fastest["label"], "fastest_dense_ms": fastest["ms_per_frame"],
            "speedup_vs_fastest_dense": best["speedup_vs_fastest_dense"],
            "speedup_vs_dense_eager": best["speedup_vs_dense_eager"],
            "frame_psnr": best["frame_psnr"], "frame_lpips": best["frame_lpips"],
            "fastest_dense_frame_psnr": fastest["frame_psnr"], "fastest_dense_frame_lpips": fastest["frame_lpips"],
            "dense_eager_frame_psnr": eager["frame_psnr"], "dense_eager_frame_lpips": eager["frame_lpips"],
            # Amdahl: the best ShiftAdd row with its reparameterized parts (BLOCK_PARTS) taking no time at all
            "speedup_vs_fastest_dense_if_blocks_were_free": (
                best["breakdown_ms"]["blocks_bound"] * best["speedup_vs_fastest_dense"] if best.get("breakdown_ms") else None)}


def markdown(record: dict) -> str:
    """The end-to-end rows as a table (written next to the JSON)."""
    lines = [f"{record['environment']['device']}, torch {record['environment']['torch']}, "
             f"TVM {record['environment'].get('tvm')}; {record['model_source']}", "",
             "| row | ms/frame | vs fastest dense | vs dense eager | frame PSNR | frame LPIPS | GMAC/s | "
             "% of fp32 peak | % of own peak | energy/frame (mJ) | what ran |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(x):
        return f"{100 * x:.0f}%" if x is not None else "n/a"

    for r in record["end_to_end"]:
        if "speedup_vs_fastest_dense" not in r:
            continue
        lp = f"{r['frame_lpips']:.3f}" if r["frame_lpips"] is not None else "n/a"
        lines.append(f"| {r['label']} | {r['ms_per_frame']:,.0f} | {r['speedup_vs_fastest_dense']:.2f}x | "
                     f"{r['speedup_vs_dense_eager']:.2f}x | {r['frame_psnr']:.2f} | {lp} | {r['gmac_per_s']:.1f} | "
                     f"{pct(r['peak_fraction'].get('fp32'))} | {pct(r['peak_fraction_own_arithmetic'])} | "
                     f"{r['ops']['energy_mj_full_frame']:,.0f} | {r['ran']} |")
    photo = record.get("nearest_photo")
    if photo:
        lpips = f"{photo['lpips']:.3f}" if photo.get("lpips") is not None else "n/a"
        lines += ["", f"Showing the nearest training photo instead, on the same view and resolution: PSNR "
                      f"{photo['psnr']:.2f}, SSIM {photo['ssim']:.3f}, LPIPS {lpips}."]
    head = record.get("headline")
    if head:
        lines += ["", f"Headline: {head['best_shiftadd']} is {head['speedup_vs_fastest_dense']:.2f}x the speed of the "
                      f"fastest dense peer ({head['fastest_dense']}) and {head['speedup_vs_dense_eager']:.2f}x dense "
                      f"eager; frame PSNR {head['frame_psnr']:.2f} vs {head['fastest_dense_frame_psnr']:.2f} dB."]
        if head.get("speedup_vs_fastest_dense_if_blocks_were_free"):
            lines[-1] += (f" With its attention and FFN blocks taking no time at all it would be "
                          f"{head['speedup_vs_fastest_dense_if_blocks_were_free']:.2f}x the fastest dense peer.")
    parts = ("cnn", "front_end", "source_views", "rest", "view_embedding", "transformer", "pos_fuse", *BLOCK_PARTS, "head")
    broken_down = [r for r in record["end_to_end"] if r.get("breakdown_ms")]
    if broken_down:
        lines += ["", "Where the time goes (ms, self time per part of one extra hooked render; `source_views` = projection "
                      "into the source views and bilinear gathers; `front_end` = those and the per-view MLP in one "
                      "kernel; `rest` = rays, sample placement; `transformer` = its glue: encodings, concatenations; "
                      "bound = the frame's speed-up if the ShiftAdd-reparameterized parts took no time):", "",
                  "| row | " + " | ".join(parts) + " | hooked total | bound |", "|---" * (len(parts) + 3) + "|"]
        for r in broken_down:
            b = r["breakdown_ms"]
            lines.append(f"| {r['label']} | " + " | ".join(f"{b.get(p, 0.0):,.0f}" for p in parts) +
                         f" | {b['total_with_hooks']:,.0f} | {b['blocks_bound']:.2f}x |")
    peaks = ", ".join(f"{k} {v['gmac_per_s']:.0f}" for k, v in record["peaks"].items() if v.get("gmac_per_s"))
    lines += ["", f"Peaks (GMAC/s, {record['peaks']['fp32']['shape'][0]}^3 products, same run): {peaks}."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- models


def quick_checkpoints(cfg, variants: dict[str, Path], workdir: Path) -> tuple[str, dict[str, str]]:
    """No trained checkpoint needed: a random-initialised model of cfg (seed train.seed) and every variant
    converted from it as `run_nerf.py reparam` does (hash codes fitted on a calibration batch of the scene's
    rays), written to `workdir`. -> (dense checkpoint, {variant: checkpoint})."""
    device = resolve_device(cfg.device)
    dense = save_checkpoint(workdir / "dense_random_init.pt", cfg, build_model(cfg, device), step=0)
    tensors = SceneTensors(load_scene(cfg), device)
    converted = {}
    for name, path in variants.items():
        vcfg = variant_config(cfg, name, path, steps=0)
        if vcfg.shiftadd.ffn == "moe" and not vcfg.shiftadd.moe_expert_latency:
            vcfg.shiftadd.moe_expert_latency = [1.0, 1.0]  # only the training loss reads it: skip timing the experts
        torch.manual_seed(vcfg.train.seed)  # the MoE router's initialisation
        tic = time.perf_counter()
        model, _, _ = warm_start(vcfg, dense, tensors, device, progress=False)
        converted[name] = str(save_checkpoint(workdir / f"{name}.pt", vcfg, model, step=0))
        print(f"converted {name} from the random-initialised model in {time.perf_counter() - tic:.1f} s")
    return str(dense), converted


def shiftadd_variants(names: list[str] | None) -> dict[str, Path]:
    """The non-dense variant configs in configs/shiftadd/ (all of them, or `names`), so new ones appear unasked."""
    available = {name: path for name, path in variant_configs().items()
                 if not is_dense(load_config(path, ()))}
    if names is None:
        return available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"--variants: unknown ShiftAdd variant(s) {unknown}; configs/shiftadd/ has {sorted(available)}")
    return {n: available[n] for n in names}


def checkpoints_from_args(args, base_cfg, variants: dict[str, Path]) -> tuple[str, dict[str, str], list[str]]:
    """(dense checkpoint, {variant: checkpoint}, variants without a finished run) from --dense/--shiftadd/--runs-dir."""
    found, missing = {}, []
    dense = args.dense
    if args.runs_dir:
        runs = load_config(None, [f"out_dir={args.runs_dir}"], base=base_cfg)
        for name, path in variants.items():
            ckpt = checkpoint_path(variant_config(runs, name, path, steps=0))
            (found.__setitem__(name, str(ckpt)) if ckpt.is_file() else missing.append(name))
        dense_run = checkpoint_path(variant_config(runs, "a_dense", variant_configs()["a_dense"], steps=0))
        dense = dense or (str(dense_run) if dense_run.is_file() else None)
    for spec in args.shiftadd:
        if "=" not in spec:
            raise SystemExit(f"--shiftadd {spec!r}: expected NAME=CHECKPOINT")
        name, ckpt = spec.split("=", 1)
        found[name] = ckpt
    if not dense:
        raise SystemExit("no dense checkpoint: pass --dense CKPT, a --runs-dir holding <name>_a_dense, or --quick")
    for path in [dense, *found.values()]:
        if not Path(path).is_file():
            raise SystemExit(f"checkpoint {path} does not exist")
    return dense, found, missing


def machine() -> dict:
    """What the numbers were measured on, beyond environment(): CPU model, relevant ISA flags, threads, load."""
    info = {"threads": torch.get_num_threads(), "os_cpus": os.cpu_count(), "load_average_1_5_15": os.getloadavg(),
            "platform": platform.platform(), "quantized_engine": torch.backends.quantized.engine}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        text = cpuinfo.read_text()
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_vpopcntdq", "avx512_bitalg", "amx_int8")
        info |= {"cpu_model": model, "isa": [f for f in wanted if f in flags]}
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="base config (model, scene, render); default: the built-in defaults")
    parser.add_argument("--out", required=True, help="JSON to write (and a .md table beside it)")
    parser.add_argument("--quick", action="store_true",
                        help="no checkpoints: random-initialised model, every variant converted from it; 1 timed "
                             "render per row at eval.stride=2, no per-kernel table, no breakdown, no reference rows")
    parser.add_argument("--dense", help="checkpoint of the dense GNT (variant a)")
    parser.add_argument("--shiftadd", action="append", default=[], metavar="NAME=CKPT",
                        help="a ShiftAdd variant's checkpoint; repeatable")
    parser.add_argument("--runs-dir", help="take <config name>_<variant>/checkpoints/latest.pt here for every "
                                           "variant config (and _a_dense as the dense model unless --dense)")
    parser.add_argument("--variants", nargs="+", help="only these configs/shiftadd/ variants (default: all)")
    parser.add_argument("--peers", nargs="+", choices=sorted(DENSE_PEERS),
                        help="dense peers to time (default cpu: eager compile tvm int8 bf16; cuda: fp16 for int8)")
    parser.add_argument("--skip-compile", action="store_true", help="drop the torch.compile peer")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                        help="also time each variant on its PyTorch reference (default: on, off with --quick)")
    parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=None,
                        help="per-component times from one extra hooked render (default: on, off with --quick)")
    parser.add_argument("--view", type=int, default=8, help="held-out view to render")
    parser.add_argument("--repeats", type=int, help="timed renders per row (median; default 3, 1 with --quick)")
    parser.add_argument("--kernel-repeats", type=int, default=7)
    parser.add_argument("--skip-kernels", action="store_true", help="no per-kernel table (always with --quick)")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the peak-rate matrix products")
    parser.add_argument("--openmp-default", action="store_true",
                        help="keep libgomp's spinning idle workers (default: OMP_WAIT_POLICY=PASSIVE unless set; "
                             "see gnt_shiftadd/runtime.py and benchmarks/thread_policy.py)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    overrides = (["eval.stride=2"] if args.quick else []) + list(args.overrides)  # quick: a 252x189 fern frame
    cfg = load_config(args.config, overrides)
    device = resolve_device(cfg.device)
    repeats = args.repeats or (1 if args.quick else 3)
    reference = args.reference if args.reference is not None else not args.quick
    breakdown = args.breakdown if args.breakdown is not None else not args.quick
    peers = args.peers or DEFAULT_PEERS["cuda" if device.type == "cuda" else "cpu"]
    peers = [p for p in peers if not (args.skip_compile and p == "compile")]
    if "eager" not in peers:
        parser.error("--peers must include eager (every speed-up is also given against it)")
    scene = load_scene(cfg)
    if not 0 <= args.view < len(scene.images) or args.view in scene.train_ids:
        parser.error(f"--view {args.view}: not a held-out view of {cfg.data.scene} (held out: {list(scene.test_ids)})")
    variants = shiftadd_variants(args.variants)
    if not args.quick:  # every named checkpoint must exist before anything is measured
        dense, checkpoints, missing = checkpoints_from_args(args, cfg, variants if args.runs_dir else {})
    tune_cpu_allocator()  # after the arguments are checked: it changes this process's heap for good

    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv[:1] + (argv or sys.argv[1:])),
              "environment": environment() | {"tvm": tvm_version() if tvm_available() else None,
                                              "allocator": allocator_state()} | machine(),
              "device": str(device), "view": args.view, "repeats": repeats, "quick": args.quick,
              "openmp": OPENMP_NOTE}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write():
        out.write_text(json.dumps(record, indent=2))
        if "end_to_end" in record and any("speedup_vs_fastest_dense" in r for r in record["end_to_end"]):
            out.with_suffix(".md").write_text(markdown(record))

    # the trivial baseline every frame is read against: the nearest training photo on the same view and stride
    nearest = trivial_baselines_for(cfg, SceneTensors(load_scene(cfg), device))["nearest"]["per_view"]
    record["nearest_photo"] = next((row for row in nearest if row["view"] == args.view), None)
    print("arithmetic peaks:")
    record["peaks"] = measure_peaks(device, args.peak_size, repeats=3 if args.quick else 5)
    if not (args.quick or args.skip_kernels):
        print("per kernel (one render chunk):")
        record["kernels"] = kernel_benchmarks(cfg, device, args.kernel_repeats)
    write()
    lpips_model = None
    try:  # eval.lpips=false (e.g. frames too small for AlexNet) or no cached weights: LPIPS is null, said so
        lpips_model = load_lpips("alex", fetch=False).to(device).eval() if cfg.eval.lpips else None
    except LPIPSUnavailable as error:
        record["lpips_unavailable"] = str(error)
        print(f"frame LPIPS not computed: {error}")
    with tempfile.TemporaryDirectory(prefix="kernel_speed_") as workdir:
        if args.quick:
            record["model_source"] = ("random-initialised model (seed train.seed), variants converted from it with "
                                      "calibration on the scene's rays: timings only, PSNR/LPIPS are not quality")
            dense, checkpoints = quick_checkpoints(cfg, variants, Path(workdir))
        else:
            record["model_source"] = "trained checkpoints (each row names its own)"
            record["variants_without_checkpoint"] = missing
            if missing:
                print(f"no finished run for: {', '.join(missing)} (skipped)")
        specs = []
        for peer in peers:
            backend, mode, label = DENSE_PEERS[peer]
            specs.append(RowSpec(label, "dense", "dense", dense, backend, mode))
        for name, ckpt in checkpoints.items():
            bits = config_of_checkpoint(ckpt).shiftadd.int_activations
            specs.append(RowSpec(f"ShiftAdd {name}, TVM kernels", "shiftadd", name, ckpt, "tvm", integer_bits=bits))
            if reference:
                specs.append(RowSpec(f"ShiftAdd {name}, PyTorch reference", "shiftadd", name, ckpt, "torch",
                                     integer_bits=bits))
        print(f"end to end (held-out view {args.view}, stride {cfg.eval.stride}, {repeats} round(s), each row "
              f"rendered once per round):")
        live = [start_row(spec, overrides, args.view, light_warmup=args.quick) for spec in specs]
        kernels_ran = time_rows(live, repeats)
        record["end_to_end"] = rows = []
        macs = {}
        for spec, live_row, ran in zip(specs, live, kernels_ran):
            row = finish_row(live_row, ran, args.view, breakdown, lpips_model)
            if spec.checkpoint not in macs:
                width, height = row["resolution"]
                macs[spec.checkpoint] = frame_macs(spec.checkpoint, overrides, args.view, width * height)
            row["macs_per_frame"] = macs[spec.checkpoint]["macs"]
            row["ops"] = macs[spec.checkpoint]
            if args.quick:
                row["checkpoint"] = f"quick: {Path(spec.checkpoint).name} (temporary)"
            rows.append(row)
            write()
        record["headline"] = summarize(rows, record["peaks"])
    record["environment"]["load_average_at_end"] = os.getloadavg()
    match_tvm_threads_to_torch()
    record["environment"]["tvm_threads"] = tvm_thread_count()  # TVM's own pool (it ran 1 thread before this was set)
    record["wall_s"] = time.perf_counter() - started
    write()
    head = record["headline"]
    if head:
        print(f"headline: {head['best_shiftadd']} {head['speedup_vs_fastest_dense']:.2f}x vs the fastest dense peer "
              f"({head['fastest_dense']}), {head['speedup_vs_dense_eager']:.2f}x vs dense eager")
    print(f"recorded in {out} and {out.with_suffix('.md')} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
