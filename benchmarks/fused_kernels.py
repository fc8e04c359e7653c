"""How close the fused fp32 transformer kernels come to this machine's peak, at the model's shapes, beside the
PyTorch modules they replace: one render chunk per call, multiply-accumulates counted per kernel, the fp32 and
int8 peaks measured in the same run (benchmarks/kernel_speed.measure_peaks).

  python benchmarks/fused_kernels.py --config configs/fern_blend.yaml --out results/fused_kernels_cpu.json [--repeats 15]
      [--rounds 5]   (the whole measurement, peaks included, that many times; medians over the rounds)
      [render.chunk_rays=2048]   (the chunk is the config's: the runs in results/ are at 2,048 rays)

Rows (every kernel is checked against its PyTorch reference before it is timed, and must run on TVM):
  ray_attention[dense|hashed]  x + out_fc(core(LN(x))) per ray (kernels/ray_attention.py) vs PreNormAttention eager
  view_blend                   the blend head's per-view MLP + softmax over views + blend (kernels/view_blend.py)
                               vs ViewColorBlend eager (its first layer split by input block)
  blend_head                   the whole blend head per ray (kernels/blend_head.py) vs the head on the view_blend
                               kernel with its norm, per-sample product and softmax over samples in PyTorch
  blend_head[integer]          the same with its per-view feature block an 8-bit integer shift layer (variant m) vs
                               the fp32 kernel
  view_attention               k/v, pos MLP, attention MLP, softmax over views, weighted sum (kernels/view_attention.py)
                               vs ViewAttention eager without q_fc/out_fc
  view_attention_sublayer      the same with the block's LN, q_fc, out_fc and residual in the kernel (what a model
                               runs on the CPU) vs those four in PyTorch around the view_attention kernel
  ffn_sublayer[dense]          x + FFN(LN(x)) (kernels/ffn.py) vs the same in eager PyTorch
  int_ffn                      the fused integer FFN (kernels/int_shift.py, 8-bit activations) vs the int8 peak
  int_ffn_sublayer             the same with the block's LayerNorm in the kernel (what a model runs)
  int_view_attention           the view attention with 8-bit integer shift layers (g, j) in one VNNI kernel
                               (kernels/int_view_attention.py) vs the same IntShiftLinear modules in PyTorch
  int_view_sublayer            the same with the block's LN, integer q_fc and out_fc and the residual in the kernel
                               (what g and j run) vs LN, q_fc, out_fc on their own kernels around int_view_attention
  int_ray_attention            a ray block's attention half with integer q/k/v/out layers and the hashed core in one
                               VNNI kernel per ray (kernels/int_ray_attention.py) vs LN, the layers on the int_shift
                               kernel and the hashed core on its kernels (what the model ran before); its products
                               are int8 (the layers) and fp32 (code projections, weighted sum), so its peak is the
                               rate at which both kinds would run at their own peaks ("int8+fp32")
  position_fusion              the points' NeRF encoding + the fusion MLP per ray (kernels/position_fusion.py) vs the
                               model's PositionFusion eager (the encoding included)
  position_fusion[integer]     variant n's: the query, the code's sines/cosines and fc2 as 8-bit integer shift
                               layers on VNNI (kernels/int_position_fusion.py), vs the fp32 kernel
  source_views                 projection + bilinear gathers + mask + view codes (kernels/source_views.py) vs the
                               model's sample_source_views (two grid_samples), on the scene's real cameras and
                               images, one chunk of a held-out view's rays, feature maps of the model's shape
  source_front_end             the same with GNT's front end (per-view MLP + max-pool over views) in the kernel,
                               vs the source_views and view_features kernels one after the other
  source_front_end[integer]    the folded front end with its second layer an 8-bit integer shift layer (variant l),
                               vs the same kernel with the fp32 second layer
The integer rows with a "[per_tensor]" suffix (int_ffn_sublayer, int_view_attention, int_view_sublayer,
int_ray_attention) are the same kernels with calibrated per-tensor activation scales (variant k: each quantization
a multiply, no per-row absmax), their layers calibrated on the row's own inputs.
MACs count only the multiply-accumulates of the products (a popcount, an exp or a max is not one), so the
fraction of peak says how much of the kernel's time its products would take at the peak rate (for source_views,
the 4 bilinear multiply-adds per channel: that kernel is bound by its gathers and its output, not arithmetic).
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path

from gnt_shiftadd.runtime import quiet_openmp_workers  # noqa: E402 (before torch: libgomp reads it once)

OPENMP_NOTE = quiet_openmp_workers(keep_default="--openmp-default" in sys.argv)  # no spinning beside the kernels

import torch  # noqa: E402
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnt_shiftadd.config import load_config  # noqa: E402
from gnt_shiftadd.evaluation.evaluate import environment, write_record  # noqa: E402
from gnt_shiftadd.evaluation.timing import median_seconds  # noqa: E402
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene  # noqa: E402
from gnt_shiftadd.models.encodings import PositionalEncoding  # noqa: E402
from gnt_shiftadd.models.gnt import PositionFusion  # noqa: E402
from gnt_shiftadd.models.projector import sample_source_views  # noqa: E402
from gnt_shiftadd.models.heads import BlendColorHead, RayColorBlend, ViewColorBlend  # noqa: E402
from gnt_shiftadd.models.transformers import FeedForward, PreNormAttention, RayAttention, RayTransformerBlock, \
    ViewAttention  # noqa: E402
from gnt_shiftadd.runtime import allocator_state, tune_cpu_allocator  # noqa: E402
from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear  # noqa: E402
from gnt_shiftadd.shiftadd.hashed_attention import HashedQuadraticAttention  # noqa: E402
from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear, export_int_shift, integer_fusion_mlp, integer_linears_  # noqa: E402
from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec  # noqa: E402
from gnt_shiftadd.shiftadd.reparameterize import calibrate_int_shift_linears  # noqa: E402
from kernels.apply import KernelConfig, KernelRayAttentionSublayer, KernelViewColorBlend, use_kernels_  # noqa: E402
from kernels.build import match_tvm_threads_to_torch, tvm_thread_count  # noqa: E402
from kernels.dispatch import recording  # noqa: E402
from kernels.ffn import ffn_sublayer, ffn_weights, reference_ffn_sublayer  # noqa: E402
from kernels.int_shift import int_ffn, int_ffn_sublayer, int_shift, prepare_int_shift, reference_int_ffn, \
    reference_int_ffn_sublayer, vnni_available  # noqa: E402
from kernels.int_ray_attention import IntRayWeights, int_ray_attention, quantization_margins, \
    reference_int_ray_attention  # noqa: E402
from kernels.int_view_attention import IntViewSublayerWeights, IntViewWeights, int_view_attention, int_view_sublayer, \
    reference_int_view_sublayer  # noqa: E402
from kernels.int_position_fusion import IntPositionFusionWeights, int_position_fusion  # noqa: E402
from kernels.position_fusion import PositionFusionWeights, position_fusion  # noqa: E402
from kernels.ray_attention import reference_ray_attention  # noqa: E402
from kernels.source_views import fold_feature_block, prepare_source_views, reference_source_front_end, \
    reference_source_views, source_front_end, source_views  # noqa: E402
from kernels.view_features import ViewFeatureWeights, view_features  # noqa: E402
from renderer.rays import camera_rays  # noqa: E402
from renderer.render import Renderer, RenderSettings  # noqa: E402
from kernels.view_attention import PreparedViewWeights, SublayerWeights, reference_view_attention, \
    reference_view_attention_sublayer, view_attention, view_attention_sublayer, view_attention_weights  # noqa: E402


def _checked(name: str, run, expected: torch.Tensor, tol: float, ok_rows: torch.Tensor | None = None,
             leaf: nn.Module | None = None) -> None:
    """run() must equal `expected` (rows in ok_rows only, if given) and run on TVM, else SystemExit. A kernel
    leaf keeps its own record (kernels.dispatch.KernelLeaf): pass it as `leaf`."""
    record: dict = {}
    if leaf is not None:
        leaf.kernels_ran = {}
    with recording(record), torch.no_grad():
        got = run()
    record = leaf.kernels_ran if leaf is not None else record
    if not record or set(record.values()) != {"tvm"}:
        raise SystemExit(f"{name}: the kernel did not run on TVM ({record}); refusing to time it as a kernel")
    if ok_rows is not None:
        got, expected = got[ok_rows], expected[ok_rows]
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def mixed_peak(macs_by_arithmetic: dict[str, float], peaks: dict) -> float:
    """The MAC rate of a kernel that did each kind of product at that kind's peak (int8 and fp32 MACs of one
    kernel): total MACs / the sum of each kind's MACs over its peak rate."""
    total = sum(macs_by_arithmetic.values())
    return total / sum(macs / peaks[kind]["gmac_per_s"] for kind, macs in macs_by_arithmetic.items())


def _row(name: str, shape: str, macs: float, kernel, eager, eager_name: str, repeats: int, peak: float,
         arithmetic: str = "fp32") -> dict:
    device = torch.device("cpu")
    with torch.no_grad():
        kernel_s = median_seconds(kernel, device, repeats)
        eager_s = median_seconds(eager, device, repeats)
    rate = macs / kernel_s / 1e9
    row = {"kernel": name, "shape": shape, "macs": macs, "kernel_ms": kernel_s * 1e3, "eager_ms": eager_s * 1e3,
           "eager": eager_name, "speedup_vs_eager": eager_s / kernel_s, "kernel_gmac_per_s": rate,
           "arithmetic": arithmetic, "peak_gmac_per_s": peak, "peak_fraction": rate / peak}
    print(f"{name:24s} {shape:28s} kernel {kernel_s * 1e3:7.2f} ms ({rate:6.1f} GMAC/s, {100 * rate / peak:3.0f}% of "
          f"{arithmetic} peak)  eager {eager_s * 1e3:7.2f} ms  x{eager_s / kernel_s:.2f}", flush=True)
    return row


def run(cfg, repeats: int, peaks: dict) -> list[dict]:
    torch.manual_seed(0)
    fp32, int8 = peaks["fp32"]["gmac_per_s"], peaks["int8"]["gmac_per_s"]
    dim, views, heads = cfg.model.netwidth, cfg.data.num_source_views, cfg.model.num_heads
    rays, samples = cfg.render.chunk_rays, cfg.render.n_samples
    tokens, head_dim, ff_hidden = rays * samples, dim // heads, cfg.model.ff_mult * dim
    rows = []

    x = torch.randn(rays, samples, dim)
    for core in ("dense", "hashed"):
        norm, attn = nn.LayerNorm(dim, eps=1e-6).eval(), RayAttention(dim, heads).eval()
        if core == "hashed":
            attn.core = HashedQuadraticAttention(heads, head_dim, cfg.shiftadd.hash_bits).eval()
            with torch.no_grad():
                attn.core.calibrate(*(torch.randn(rays, heads, samples, head_dim) for _ in range(3)))
        leaf, sublayer = KernelRayAttentionSublayer(norm, attn), PreNormAttention()
        expected, margin = reference_ray_attention(x, leaf.weights, return_codes_margin=True)
        _checked(f"ray_attention[{core}]", lambda: leaf(x, norm, attn), expected, 1e-4, margin > 1e-5, leaf=leaf)
        macs = rays * (samples * dim * 3 * dim + samples * dim * dim + heads * samples * samples * head_dim *
                       (1 if core == "hashed" else 2))
        if core == "hashed":
            macs += rays * 2 * samples * heads * head_dim * cfg.shiftadd.hash_bits  # the code projections
        rows.append(_row(f"ray_attention[{core}]", f"[{rays},{samples},{dim}] {heads} heads", macs,
                         lambda: leaf(x, norm, attn), lambda: sublayer(x, norm, attn), "PreNormAttention eager",
                         repeats, fp32))

    hidden = 32  # BlendColorHead's hidden width
    fc1, fc2 = nn.Linear(2 * dim + 4, hidden), nn.Linear(hidden, 1)
    h, features = torch.randn(rays, samples, dim), torch.randn(rays, samples, views, dim)
    colors, ray_diff = torch.rand(rays, samples, views, 3), torch.randn(rays, samples, views, 4)
    mask = (torch.rand(rays, samples, views, 1) > 0.2).float()
    blend, blend_leaf = ViewColorBlend(), KernelViewColorBlend(fc1, fc2)
    with torch.no_grad():
        _checked("view_blend", lambda: blend_leaf(h, features, colors, ray_diff, mask, fc1, fc2),
                 blend(h, features, colors, ray_diff, mask, fc1, fc2), 1e-4, leaf=blend_leaf)
    macs = tokens * (views * (dim + 4) * hidden + dim * hidden + views * hidden)
    rows.append(_row("view_blend", f"[{tokens},{views},{dim}] hidden {hidden}", macs,
                     lambda: blend_leaf(h, features, colors, ray_diff, mask, fc1, fc2),
                     lambda: blend(h, features, colors, ray_diff, mask, fc1, fc2), "ViewColorBlend eager",
                     repeats, fp32))

    # the whole head per ray against what it replaced: the view-blend kernel with the head's other ops in PyTorch
    head = BlendColorHead(dim, hidden).eval()
    on_view_blend, on_blend_head = copy.deepcopy(head), copy.deepcopy(head)
    use_kernels_(on_view_blend, filter_fn=lambda module, name: not isinstance(module, RayColorBlend))
    use_kernels_(on_blend_head)
    with torch.no_grad():
        _checked("blend_head", lambda: on_blend_head(h, features, colors, ray_diff, mask),
                 head(h, features, colors, ray_diff, mask), 1e-4, leaf=on_blend_head.ray_blend)
    macs += tokens * (dim + 1)  # the sample logits
    rows.append(_row("blend_head", f"[{rays},{samples},{views},{dim}] hidden {hidden}", macs,
                     lambda: on_blend_head(h, features, colors, ray_diff, mask),
                     lambda: on_view_blend(h, features, colors, ray_diff, mask),
                     "BlendColorHead on the view_blend kernel (norm, hq, sample softmax in PyTorch)", repeats, fp32))
    if vnni_available():
        rows.append(integer_head_row(head, (h, features, colors, ray_diff, mask), macs, tokens * views * dim * hidden,
                                     on_blend_head, peaks, repeats, f"[{rays},{samples},{views},{dim}] hidden {hidden}"))

    attention = ViewAttention(dim).eval()
    weights = PreparedViewWeights.from_dict(view_attention_weights(attention))
    qp, flat_features = torch.randn(tokens, dim), features.reshape(tokens, views, dim)
    flat_diff, flat_mask = ray_diff.reshape(tokens, views, 4), mask.reshape(tokens, views)
    _checked("view_attention", lambda: view_attention(qp, flat_features, flat_diff, flat_mask, weights),
             reference_view_attention(qp, flat_features, flat_diff, flat_mask, weights.source), 1e-4)
    small = max(dim // 8, 1)
    macs = tokens * views * (2 * dim * dim + 4 * small + small * dim + dim * small + small * dim)
    rows.append(_row("view_attention", f"[{tokens},{views},{dim}]", macs,
                     lambda: view_attention(qp, flat_features, flat_diff, flat_mask, weights),
                     lambda: reference_view_attention(qp, flat_features, flat_diff, flat_mask, weights.source),
                     "ViewAttention eager between q_fc and out_fc", repeats, fp32))

    attn_norm = nn.LayerNorm(dim, eps=1e-6).eval()
    sublayer = SublayerWeights.from_modules(attn_norm, attention)
    q_in = torch.randn(tokens, dim)

    def sublayer_eager():  # what the block runs without the fused sublayer: LN, q_fc, the kernel, out_fc, residual
        return q_in + attention.out_fc(view_attention(attention.q_fc(attn_norm(q_in)), flat_features, flat_diff,
                                                      flat_mask, weights))

    _checked("view_attention_sublayer", lambda: view_attention_sublayer(q_in, flat_features, flat_diff, flat_mask,
                                                                        weights, sublayer),
             reference_view_attention_sublayer(q_in, flat_features, flat_diff, flat_mask, weights, sublayer), 1e-4)
    rows.append(_row("view_attention_sublayer", f"[{tokens},{views},{dim}] + LN, q_fc, out_fc",
                     macs + tokens * 2 * dim * dim,
                     lambda: view_attention_sublayer(q_in, flat_features, flat_diff, flat_mask, weights, sublayer),
                     sublayer_eager, "LN, q_fc, out_fc in PyTorch around the view_attention kernel", repeats, fp32))

    flat_x = torch.randn(tokens, dim)
    ff_norm, dense_ff = nn.LayerNorm(dim, eps=1e-6).eval(), FeedForward(dim, ff_hidden).eval()
    ffn = ffn_weights(ff_norm, dense_ff)

    def dense_ffn_eager():
        return flat_x + dense_ff(ff_norm(flat_x))

    _checked("ffn_sublayer[dense]", lambda: ffn_sublayer(flat_x, ffn), reference_ffn_sublayer(flat_x, ffn), 1e-4)
    rows.append(_row("ffn_sublayer[dense]", f"[{tokens},{dim}] hidden {ff_hidden}", tokens * 2 * dim * ff_hidden,
                     lambda: ffn_sublayer(flat_x, ffn), dense_ffn_eager, "dense x + FFN(LN(x)) eager", repeats, fp32))

    if vnni_available():
        normed = F.layer_norm(flat_x, (dim,))
        ln_w, ln_b = torch.rand(dim) + 0.5, torch.randn(dim) * 0.1
        for act_scale in ("per_token", "per_tensor"):
            ff = integer_linears_(FeedForward(dim, ff_hidden).eval(), act_scale=act_scale)
            calibrate_int_shift_linears(ff, lambda: ff(normed))  # per tensor (k): the absmax these inputs reach
            layers = [prepare_int_shift(export_int_shift(layer)) for layer in (ff.fc1, ff.fc2)]
            suffix = "" if act_scale == "per_token" else f"[{act_scale}]"
            if act_scale == "per_token":
                _checked("int_ffn", lambda: int_ffn(normed, flat_x, *layers),
                         reference_int_ffn(normed, flat_x, *layers), 0.0)
                rows.append(_row("int_ffn", f"[{tokens},{dim}] hidden {ff_hidden}, 8-bit", tokens * 2 * dim * ff_hidden,
                                 lambda: int_ffn(normed, flat_x, *layers), dense_ffn_eager,
                                 "dense x + FFN(LN(x)) eager (LN included there, not in the kernel)", repeats, int8,
                                 arithmetic="int8"))
            _checked(f"int_ffn_sublayer{suffix}", lambda: int_ffn_sublayer(flat_x, ln_w, ln_b, 1e-6, *layers),
                     reference_int_ffn_sublayer(flat_x, ln_w, ln_b, 1e-6, *layers), 0.05)  # LN rounding: one step
            rows.append(_row(f"int_ffn_sublayer{suffix}", f"[{tokens},{dim}] hidden {ff_hidden}, 8-bit {act_scale}, "
                             "LN in the kernel", tokens * 2 * dim * ff_hidden,
                             lambda: int_ffn_sublayer(flat_x, ln_w, ln_b, 1e-6, *layers), dense_ffn_eager,
                             "dense x + FFN(LN(x)) eager", repeats, int8, arithmetic="int8"))
    if vnni_available():
        rows += int_view_attention_rows(cfg, repeats, int8)
        rows += int_view_attention_rows(cfg, repeats, int8, "per_tensor")
        rows.append(int_ray_attention_row(cfg, repeats, peaks))
        rows.append(int_ray_attention_row(cfg, repeats, peaks, "per_tensor"))
    rows.append(position_fusion_row(cfg, repeats, fp32))
    if vnni_available():
        rows.append(position_fusion_row(cfg, repeats, fp32, integer_peaks=peaks))
    rows += source_views_rows(cfg, repeats, peaks)
    return rows


@torch.no_grad()
def int_view_attention_rows(cfg, repeats: int, peak: float, act_scale: str = "per_token") -> list[dict]:
    """The view attention with 8-bit integer shift layers (g, j) in one VNNI kernel against the same layers as
    modules (each IntShiftLinear on its own reference, the softmax over views in PyTorch); then the whole pre-norm
    sublayer (LN, q_fc, out_fc, residual in the kernel too) against those around the attention kernel. act_scale
    per_tensor (k, its layers calibrated on these inputs): the rows get a "[per_tensor]" suffix."""
    dim, views, tokens = cfg.model.netwidth, cfg.data.num_source_views, cfg.render.chunk_rays * cfg.render.n_samples
    torch.manual_seed(2)
    attention = integer_linears_(ViewAttention(dim).eval(), act_scale=act_scale)
    qp, features = torch.randn(tokens, dim), torch.randn(tokens, views, dim)
    ray_diff, mask = torch.randn(tokens, views, 4) * 0.3, (torch.rand(tokens, views) > 0.2).float()
    norm = nn.LayerNorm(dim, eps=1e-6).eval()
    x = torch.randn(tokens, dim)
    calibrate_int_shift_linears(attention, lambda: attention(norm(x)[:, None], features[:, None], ray_diff[:, None],
                                                             mask[:, None, :, None]))
    weights = IntViewWeights.from_module(attention)
    suffix = "" if act_scale == "per_token" else f"[{act_scale}]"

    def modules():  # ViewAttention between q_fc and out_fc
        return attention.attend(qp, features, ray_diff, mask[..., None])

    _checked(f"int_view_attention{suffix}", lambda: int_view_attention(qp, features, ray_diff, mask, weights),
             modules(), 1e-5)
    small = weights.hidden
    macs = tokens * views * (2 * dim * dim + 4 * small + small * dim + dim * small + small * dim)
    rows = [_row(f"int_view_attention{suffix}", f"[{tokens},{views},{dim}], 8-bit {act_scale} layers", macs,
                 lambda: int_view_attention(qp, features, ray_diff, mask, weights), modules,
                 "the IntShiftLinear modules + softmax in PyTorch", repeats, peak, arithmetic="int8")]
    sub = IntViewSublayerWeights.from_modules(norm, attention)
    q_layer, out_layer = (prepare_int_shift(export_int_shift(layer)) for layer in (attention.q_fc, attention.out_fc))

    def around():  # what the block ran before: LN, q_fc and out_fc on their own kernels around the attention kernel
        query = int_shift(norm(x), q_layer)
        return x + int_shift(int_view_attention(query, features, ray_diff, mask, weights), out_layer)

    # the LN and the softmax round in the kernel's own order: an activation may quantize one step apart
    _checked(f"int_view_sublayer{suffix}", lambda: int_view_sublayer(x, features, ray_diff, mask, weights, sub),
             reference_int_view_sublayer(x, features, ray_diff, mask, weights, sub), 0.1)
    rows.append(_row(f"int_view_sublayer{suffix}", f"[{tokens},{views},{dim}] + LN, q_fc, out_fc, 8-bit {act_scale}",
                     macs + tokens * 2 * dim * dim, lambda: int_view_sublayer(x, features, ray_diff, mask, weights, sub),
                     around, "LN, q_fc, out_fc on their kernels around int_view_attention", repeats, peak,
                     arithmetic="int8"))
    return rows


@torch.no_grad()
def int_ray_attention_row(cfg, repeats: int, peaks: dict, act_scale: str = "per_token") -> dict:
    """A ray block's attention half with integer layers and the hashed core (j, g) in one kernel per ray, against
    what the block ran before it: PyTorch's LN, the four layers on the int_shift kernel and the hashed core on the
    hash_pack + popcount-softmax kernels (their leaves), glue in PyTorch. act_scale per_tensor (k, calibrated on
    these rays): the row gets a "[per_tensor]" suffix."""
    dim, heads, bits = cfg.model.netwidth, cfg.model.num_heads, cfg.shiftadd.hash_bits
    rays, samples, head_dim = cfg.render.chunk_rays, cfg.render.n_samples, cfg.model.netwidth // cfg.model.num_heads
    torch.manual_seed(3)
    block = RayTransformerBlock(dim, heads, cfg.model.ff_mult * dim).eval()
    block.attn.core = HashedQuadraticAttention(heads, head_dim, bits).eval()
    block.attn.core.calibrate(*(torch.randn(rays, heads, samples, head_dim) for _ in range(3)))
    integer_linears_(block.attn, act_scale=act_scale)
    x = torch.randn(rays, samples, dim)
    calibrate_int_shift_linears(block, lambda: block.attn(block.attn_norm(x)))
    weights = IntRayWeights.from_modules(block.attn_norm, block.attn)
    parts = copy.deepcopy(block)
    use_kernels_(parts, KernelConfig("tvm"), lambda module, _fqn: not isinstance(module, PreNormAttention))
    margin = quantization_margins(x, weights)
    suffix = "" if act_scale == "per_token" else f"[{act_scale}]"
    _checked(f"int_ray_attention{suffix}", lambda: int_ray_attention(x, weights),
             reference_int_ray_attention(x, weights), 1e-5, margin > 1e-4)  # LN and softmax round alike
    int8_macs = rays * samples * 4 * dim * dim
    fp32_macs = rays * (2 * samples * heads * head_dim * bits + heads * samples * samples * head_dim)
    row = _row(f"int_ray_attention{suffix}", f"[{rays},{samples},{dim}] {heads} heads, {bits}-bit codes, 8-bit "
               f"{act_scale} layers",
               int8_macs + fp32_macs, lambda: int_ray_attention(x, weights),
                lambda: parts.attn_sublayer(x, parts.attn_norm, parts.attn),
               "LN + the layers on int_shift + the hashed core on its kernels", repeats,
               mixed_peak({"int8": int8_macs, "fp32": fp32_macs}, peaks), arithmetic="int8+fp32")
    row["macs_by_arithmetic"] = {"int8": int8_macs, "fp32": fp32_macs}
    return row


@torch.no_grad()
def position_fusion_row(cfg, repeats: int, peak: float, integer_peaks: dict | None = None) -> dict:
    """The points' encoding + the fusion MLP on one chunk (points spread like fern's, |x| up to ~10) against the
    model's PositionFusion leaf in PyTorch (encoding, split first layer, ReLU, second layer). integer_peaks given:
    n's integer position fusion (the query, the code's sines and cosines and fc2 8-bit shift layers calibrated on
    this chunk, the 3 coordinates and the direction fp32) on its VNNI kernel, against the fp32 kernel."""
    dim, rays, samples = cfg.model.netwidth, cfg.render.chunk_rays, cfg.render.n_samples
    encoding, directions = PositionalEncoding(3, cfg.model.pos_freqs), PositionalEncoding(3, cfg.model.dir_freqs)
    mlp = nn.Sequential(nn.Linear(dim + encoding.out_dim + directions.out_dim, dim), nn.ReLU(),
                        nn.Linear(dim, dim)).eval()
    q, points = torch.randn(rays, samples, dim), torch.randn(rays, samples, 3) * 3
    dir_code = directions(F.normalize(torch.randn(rays, 3), dim=-1))
    weights = PositionFusionWeights.from_mlp(mlp, dim, cfg.model.pos_freqs)
    fusion = PositionFusion()
    tokens = rays * samples
    macs = tokens * (dim + encoding.out_dim) * dim + rays * directions.out_dim * dim + tokens * dim * dim
    shape = f"[{rays},{samples},{dim}] + {encoding.out_dim}-wide code"
    fp32_kernel = lambda: position_fusion(q, points, dir_code, weights)  # noqa: E731
    if integer_peaks is None:
        _checked("position_fusion", fp32_kernel, fusion(q, points, dir_code, mlp, encoding, {}), 1e-4)
        return _row("position_fusion", shape, macs, fp32_kernel, lambda: fusion(q, points, dir_code, mlp, encoding, {}),
                    "PositionFusion eager (encoding included)", repeats, peak)
    waves = encoding.out_dim - 3
    integer = integer_fusion_mlp(mlp, dim, dim + 3, waves)
    calibrate_int_shift_linears(integer, lambda: fusion(q, points, dir_code, integer, encoding, {}))
    int_weights = IntPositionFusionWeights.from_mlp(integer, dim, cfg.model.pos_freqs)
    expected = fusion(q, points, dir_code, integer, encoding, {})
    tolerance = 0.05 * expected.abs().max().item()  # a wave at a rounding tie may quantize one step apart
    _checked("position_fusion[integer]", lambda: int_position_fusion(q, points, dir_code, int_weights), expected,
             tolerance)
    int8_macs = tokens * (dim + waves + dim) * dim
    by_arithmetic = {"int8": int8_macs, "fp32": macs - int8_macs}
    row = _row("position_fusion[integer]", shape + ", 8-bit per_tensor query, waves, fc2", macs,
               lambda: int_position_fusion(q, points, dir_code, int_weights), fp32_kernel,
               "position_fusion (fp32 kernel)", repeats, mixed_peak(by_arithmetic, integer_peaks),
               arithmetic="int8+fp32")
    row["macs_by_arithmetic"] = by_arithmetic
    return row


@torch.no_grad()
def source_views_rows(cfg, repeats: int, peaks: dict, view: int = 8) -> list[dict]:
    """One chunk of held-out `view`'s rays (from the middle of the frame) against its nearest source views: the
    scene's real images and cameras, feature maps from the model's (untrained) feature CNN: their values do not
    change the work. The last row (l's front end) runs the second layer as an 8-bit integer shift layer, calibrated
    on this chunk."""
    peak = peaks["fp32"]["gmac_per_s"]
    tensors = SceneTensors(load_scene(cfg), torch.device("cpu"))
    scene = tensors.scene
    c2w = torch.as_tensor(scene.c2w[view], dtype=torch.float32)
    ids = tensors.nearest_sources(scene.c2w[view], cfg.data.num_source_views, exclude_view=view)
    views = build_model(cfg, torch.device("cpu")).eval().encode_sources(*tensors.source_inputs(ids))
    origins, dirs = camera_rays(torch.as_tensor(scene.intrinsics[view], dtype=torch.float32), c2w, scene.height,
                                scene.width, cfg.eval.stride)
    middle = origins.shape[0] * origins.shape[1] // 2
    origins, dirs = (t.reshape(-1, 3)[middle:middle + cfg.render.chunk_rays] for t in (origins, dirs))
    near, far = scene.depth_range(view)
    points = Renderer(RenderSettings.from_config(cfg), kind=scene.kind).sample(origins, dirs, near, far)
    prepared = prepare_source_views(views)
    expected = sample_source_views(points, origins[0], views)
    for index, name in enumerate(("rgb", "feat", "ray_diff", "mask")):
        _checked(f"source_views.{name}", lambda: source_views(points, origins[0], prepared)[index], expected[index],
                 5e-3)
    rays, samples = points.shape[:2]
    channels = 3 + views.features.shape[1]
    rows = [_row("source_views", f"[{rays},{samples}] x {len(ids)} views, {channels} channels",
                 rays * samples * len(ids) * channels * 4, lambda: source_views(points, origins[0], prepared),
                 lambda: sample_source_views(points, origins[0], views), "sample_source_views eager (grid_sample)",
                 repeats, peak)]
    # the same with GNT's front end fused in, against the two kernels one after the other
    dim = cfg.model.netwidth
    weights = ViewFeatureWeights.from_linears(nn.Linear(channels, dim), nn.Linear(dim, dim))
    expected = reference_source_front_end(points, origins[0], prepared, weights)
    for index, name in enumerate(("features", "q0", "colors", "ray_diff", "mask")):
        _checked(f"source_front_end.{name}", lambda: source_front_end(points, origins[0], prepared, weights)[index],
                 expected[index], 5e-3)

    def separate():
        rgb, feat, _, mask = source_views(points, origins[0], prepared)
        return view_features(rgb.reshape(len(ids), 3, -1), feat.reshape(len(ids), channels - 3, -1),
                             mask.reshape(-1, len(ids)), weights)

    macs = rays * samples * len(ids) * (channels * 4 + channels * dim + dim * dim)
    rows.append(_row("source_front_end", f"[{rays},{samples}] x {len(ids)} views, {channels} -> {dim} -> {dim}", macs,
                     lambda: source_front_end(points, origins[0], prepared, weights), separate,
                     "source_views + view_features kernels", repeats, peak))
    # what the renderer runs: the first layer's feature block applied to the maps once per frame (not timed here)
    folded_views, folded_weights = fold_feature_block(prepared, weights)
    for index, name in enumerate(("features", "q0", "colors", "ray_diff", "mask")):
        _checked(f"source_front_end[folded].{name}",
                 lambda: source_front_end(points, origins[0], folded_views, folded_weights)[index], expected[index],
                 5e-3)
    folded_macs = rays * samples * len(ids) * (dim * 4 + 3 * 4 + 3 * dim + dim * dim)
    rows.append(_row("source_front_end[folded]", f"[{rays},{samples}] x {len(ids)} views, (3 + {dim} folded) -> {dim}"
                     f" -> {dim}", folded_macs, lambda: source_front_end(points, origins[0], folded_views, folded_weights),
                     lambda: source_front_end(points, origins[0], prepared, weights),
                     "source_front_end unfolded (W1f on every gathered row)", repeats, peak))
    if vnni_available():
        rows.append(integer_front_end_row(points, origins[0], (folded_views, folded_weights), rows[-1]["macs"], peaks,
                                          repeats,
                                          f"[{rays},{samples}] x {len(ids)} views, (3 + {dim} folded) -> {dim} -> "
                                          f"{dim}, 8-bit per_tensor second layer"))
    return rows


@torch.no_grad()
def integer_front_end_row(points, origin, folded: tuple, folded_macs: float, peaks: dict, repeats: int,
                          shape: str) -> dict:
    """l's front end: the folded kernel with its second layer an 8-bit integer shift layer (per-tensor absmax
    calibrated on this chunk's hidden units), against the same kernel with the fp32 second layer (`folded`: the
    (views, weights) of fold_feature_block)."""
    folded_views, folded_weights = folded
    second = nn.Linear(*folded_weights.w2.shape)
    second.load_state_dict({"weight": folded_weights.w2.t(), "bias": folded_weights.b2})
    integer = IntShiftLinear.from_linear(second, ShiftSpec(exponent_min=-6), 8, "per_tensor")
    rgb, feat = (t.permute(2, 3, 0, 1) for t in reference_source_views(points, origin, folded_views)[:2])
    integer.activation_absmax.fill_(float(torch.relu(rgb @ folded_weights.w1_rgb + feat + folded_weights.b1).max()))
    int_weights = ViewFeatureWeights(  # the folded first layer, the integer second
        folded_weights.w1_rgb, folded_weights.w1_feat, folded_weights.b1, integer.effective_weight().detach().t(),
        integer.bias, prepare_int_shift(export_int_shift(integer)))
    int_expected = reference_source_front_end(points, origin, folded_views, int_weights)
    for index, name in enumerate(("features", "q0", "colors", "ray_diff", "mask")):  # fp32 first layer: a unit
        _checked(f"source_front_end[integer].{name}",  # at a rounding tie may land one step apart
                 lambda: source_front_end(points, origin, folded_views, int_weights)[index], int_expected[index], 0.05)
    int8_macs = points.shape[0] * points.shape[1] * folded_views.num_views * folded_weights.w2.numel()
    by_arithmetic = {"int8": int8_macs, "fp32": folded_macs - int8_macs}
    row = _row("source_front_end[integer]", shape, folded_macs,
               lambda: source_front_end(points, origin, folded_views, int_weights),
               lambda: source_front_end(points, origin, folded_views, folded_weights),
               "source_front_end[folded] (fp32 second layer)", repeats, mixed_peak(by_arithmetic, peaks),
               arithmetic="int8+fp32")
    row["macs_by_arithmetic"] = by_arithmetic
    return row


def integer_head_row(head, inputs: tuple, macs: float, int8_macs: float, fp32_head, peaks: dict, repeats: int,
                     shape: str) -> dict:
    """m's blend head: the blend-head kernel with the feature block an 8-bit integer shift layer (per-tensor absmax
    calibrated on this chunk's features), against the same kernel with the fp32 block (`fp32_head`)."""
    integer = copy.deepcopy(head)
    fc1 = BlockShiftLinear.from_linear(integer.view_fc1, head.norm.normalized_shape[0], ShiftSpec(exponent_min=-6))
    fc1.first = IntShiftLinear.from_shift_linear(fc1.first, 8, "per_tensor")
    integer.view_fc1 = fc1.eval()
    with torch.no_grad():
        calibrate_int_shift_linears(integer, lambda: integer(*inputs))
        expected = integer(*inputs)
    on_kernel = copy.deepcopy(integer)
    use_kernels_(on_kernel)
    with torch.no_grad():
        _checked("blend_head[integer]", lambda: on_kernel(*inputs), expected, 1e-4, leaf=on_kernel.ray_blend)
    by_arithmetic = {"int8": int8_macs, "fp32": macs - int8_macs}
    row = _row("blend_head[integer]", shape + ", 8-bit per_tensor feature block", macs, lambda: on_kernel(*inputs),
               lambda: fp32_head(*inputs), "blend_head (fp32 feature block)", repeats,
               mixed_peak(by_arithmetic, peaks), arithmetic="int8+fp32")
    row["macs_by_arithmetic"] = by_arithmetic
    return row


def merge_rounds(rounds: list[tuple[dict, list[dict]]]) -> tuple[dict, list[dict]]:
    """(peaks, rows) of several rounds -> one: every rate and time the median over the rounds (the peak fraction
    recomputed from the two medians), each round's kernel time and peak fraction kept in `rounds_kernel_ms` /
    `rounds_peak_fraction`."""
    import statistics

    peaks = {name: dict(entry, gmac_per_s=statistics.median(p[name]["gmac_per_s"] for p, _ in rounds)
                        if entry.get("gmac_per_s") is not None else None, rounds_gmac_per_s=[
                            p[name]["gmac_per_s"] for p, _ in rounds])
             for name, entry in rounds[0][0].items()}
    merged = []
    for index, first in enumerate(rounds[0][1]):
        same = [rows[index] for _, rows in rounds]
        row = dict(first, **{key: statistics.median(r[key] for r in same)
                             for key in ("kernel_ms", "eager_ms", "speedup_vs_eager", "kernel_gmac_per_s")})
        row["peak_gmac_per_s"] = peaks[row["arithmetic"]]["gmac_per_s"] if row["arithmetic"] in peaks else \
            mixed_peak(row["macs_by_arithmetic"], peaks)
        row["peak_fraction"] = row["kernel_gmac_per_s"] / row["peak_gmac_per_s"]
        row["rounds_kernel_ms"] = [r["kernel_ms"] for r in same]
        row["rounds_peak_fraction"] = [r["peak_fraction"] for r in same]
        merged.append(row)
    if len(rounds) > 1:
        for row in merged:
            print(f"median of {len(rounds)} rounds: {row['kernel']:24s} {row['kernel_ms']:7.2f} ms, "
                  f"{100 * row['peak_fraction']:3.0f}% of {row['arithmetic']} peak (rounds "
                  + ", ".join(f"{100 * f:.0f}%" for f in row["rounds_peak_fraction"]) + ")")
    return peaks, merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fern_blend.yaml", help="model shapes and chunk size")
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the peak-rate matrix products")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure peaks and every row this many times over; each figure is the median over "
                             "the rounds, with every round kept (this shared machine varies 10-30%% run to run)")
    parser.add_argument("--openmp-default", action="store_true",
                        help="keep libgomp's spinning idle workers (default: OMP_WAIT_POLICY=PASSIVE unless set)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    tune_cpu_allocator()
    match_tvm_threads_to_torch()
    from benchmarks.kernel_speed import measure_peaks  # noqa: PLC0415 (the same peak microbenchmark)

    rounds = [(peaks := measure_peaks(torch.device("cpu"), size=args.peak_size), run(cfg, args.repeats, peaks))
              for _ in range(args.rounds)]
    peaks, rows = merge_rounds(rounds)
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "environment": environment(),
              "threads": {"torch": torch.get_num_threads(), "tvm": tvm_thread_count()},
              "allocator": allocator_state(), "openmp": OPENMP_NOTE, "peaks": peaks, "rows": rows}
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
