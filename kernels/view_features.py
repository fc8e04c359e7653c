"""Fused per-view feature MLP and masked max-pool: the front of GNT's transformer, straight from grid_sample.

After the samples are projected into the source views, PyTorch concatenates the bilinear RGB and CNN samples
into rgb_feat [T, V, 3 + F] (a permuted copy), runs `rgbfeat_fc2(relu(rgbfeat_fc1(.)))` on every (token, view)
and max-pools the visible views into the first query. This kernel reads the grid_sample outputs where they
lie ([V, 3, N] and [V, F, N], token index last) and writes only what the transformer needs next:

    hidden   = relu(rgb @ W1[:, :3]^T + feat @ W1[:, 3:]^T + b1)     (per token and view, never stored)
    features = hidden @ W2^T + b2                                      [T, V, C]  (read by every view block)
    q0       = max over visible views of features, 0 if none         [T, C]

Layout: rgb [V, 3, N], feat [V, F, N] with N >= NT * tile tokens (N symbolic); the kernel covers the first
NT * tile tokens (NT symbolic, never split); the last partial tile follows the facade's tail rule
(kernels.dispatch.run_tiled: one more zero-padded tile, whose tokens no view sees).
mask [N, V] (1 = visible); outputs features [NT, tile, V, C] and q0 [NT, tile, C], all fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear
from kernels.build import kernel_ready
from kernels.int_shift import IntShiftWeights, export_8bit, prepare_int_shift, reference_from_weights
from kernels.dispatch import get_kernel, needs_grad, note_kernel, run_tiled
from kernels.te_math import vector_lanes

__all__ = ["TILE", "ViewFeatureWeights", "reference_view_features", "make_view_features", "view_features"]

TILE = 16  # tokens per tile (CPU parallel unit / CUDA thread block)
_NEG = -3.0e38  # below any finite feature, above -inf (so "no visible view" is a plain comparison)


class ViewFeatureWeights:
    """rgbfeat_fc1 / rgbfeat_fc2 in the kernel layout: w1_rgb [3, H], w1_feat [F, H], b1 [H], w2 [H, C], b2 [C];
    second: rgbfeat_fc2 as an 8-bit integer shift layer with a calibrated per-tensor scale (IntShiftWeights; then
    w2, b2 are its decoded fp32 weights, for shapes only), or None (fp32)."""

    def __init__(self, w1_rgb, w1_feat, b1, w2, b2, second: IntShiftWeights | None = None):
        self.w1_rgb, self.w1_feat, self.b1, self.w2, self.b2 = (
            kernel_ready(t.detach(), torch.float32) for t in (w1_rgb, w1_feat, b1, w2, b2))
        self.second = second
        feat_channels, hidden = self.w1_feat.shape
        if self.w1_rgb.shape != (3, hidden) or self.b1.shape != (hidden,) or self.w2.shape[0] != hidden \
                or self.b2.shape != (self.w2.shape[1],):
            raise ValueError(f"view feature weights do not fit together: w1_rgb {tuple(self.w1_rgb.shape)}, w1_feat "
                             f"{tuple(self.w1_feat.shape)}, b1 {tuple(self.b1.shape)}, w2 {tuple(self.w2.shape)}, "
                             f"b2 {tuple(self.b2.shape)}")
        if second is not None and ((second.in_features, second.out_features) != tuple(self.w2.shape)
                                   or second.bits != 8 or second.per_token):
            raise ValueError(f"view feature weights: the integer second layer must be 8-bit, per tensor and "
                             f"{tuple(self.w2.shape)[0]} -> {tuple(self.w2.shape)[1]}, got {second.in_features} -> "
                             f"{second.out_features}, {second.bits}-bit, per token {second.per_token}")

    @classmethod
    def from_linears(cls, fc1: torch.nn.Module, fc2: torch.nn.Module, rgb_channels: int = 3) -> "ViewFeatureWeights":
        """fc1 an nn.Linear; fc2 an nn.Linear or an 8-bit IntShiftLinear with a calibrated per-tensor activation
        scale (shiftadd.front_end: shift with act_scale: per_tensor). TypeError/ValueError otherwise."""
        if not isinstance(fc1, torch.nn.Linear):
            raise TypeError(f"the view feature MLP's first layer must be an nn.Linear, got {type(fc1).__name__}")
        second = None
        if isinstance(fc2, IntShiftLinear):
            exported, per_token = export_8bit({"rgbfeat_fc2": fc2}, "integer front end")
            if per_token:
                raise ValueError("integer front end: the kernel rounds the hidden units with a calibrated per-tensor "
                                 "scale (shiftadd.act_scale: per_tensor); rgbfeat_fc2 is per token")
            second = prepare_int_shift(exported["rgbfeat_fc2"])
        elif not isinstance(fc2, torch.nn.Linear):
            raise TypeError(f"the view feature MLP's second layer must be an nn.Linear or an integer shift layer, got "
                            f"{type(fc2).__name__}")
        w1 = fc1.weight.detach().float()
        w2 = fc2.effective_weight() if isinstance(fc2, IntShiftLinear) else fc2.weight
        b2 = fc2.bias if fc2.bias is not None else w2.new_zeros(w2.shape[0])
        return cls(w1[:, :rgb_channels].t(), w1[:, rgb_channels:].t(), fc1.bias, w2.detach().float().t(), b2, second)

    @property
    def folded(self) -> bool:
        """True for weights whose first layer's feature block has been applied to the source feature maps already
        (kernels.source_views.fold_feature_block): no w1_feat rows, the gathered rows are that block's outputs."""
        return self.w1_feat.shape[0] == 0

    @property
    def shapes(self) -> tuple[int, int, int]:
        """(feature channels F, hidden H, out channels C)."""
        return self.w1_feat.shape[0], self.w1_feat.shape[1], self.w2.shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.w1_rgb, self.w1_feat, self.b1, self.w2, self.b2

    def second_tensors(self) -> tuple[torch.Tensor, ...] | tuple[None, ...]:
        """The integer second layer's packed, compensation, out_scale, bias, absmax (Nones when fp32)."""
        return self.second.tensors() if self.second is not None else (None,) * 5

    def second_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        """The reference second layer on the ReLU outputs [..., H] -> [..., C]."""
        if self.second is not None:
            return reference_from_weights(hidden, self.second)
        return hidden @ self.w2 + self.b2


def reference_view_features(rgb: torch.Tensor, feat: torch.Tensor, mask: torch.Tensor,
                            w: ViewFeatureWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """rgb [V, 3, N], feat [V, F, N], mask [N, V] -> (features [N, V, C], q0 [N, C]); GNTTransformer's math."""
    if w.folded:  # feat [V, H, N] holds W1f feat already
        pre = rgb.permute(2, 0, 1) @ w.w1_rgb + feat.permute(2, 0, 1)
    else:
        rgb_feat = torch.cat([rgb, feat], dim=1).permute(2, 0, 1)  # [N, V, 3 + F]
        pre = rgb_feat @ torch.cat([w.w1_rgb, w.w1_feat], dim=0)  # [3 + F, H]
    features = w.second_layer(F.relu(pre + w.b1))
    visible = mask[..., None] > 0
    pooled = features.masked_fill(~visible, torch.finfo(features.dtype).min).max(dim=1).values
    q0 = torch.where(visible.any(dim=1), pooled, torch.zeros_like(pooled))
    return features, q0


def make_view_features(target: dict, views: int, feat_channels: int, hidden: int, channels: int):
    """IRModule "main"(rgb [V, 3, N], feat [V, F, N], mask [N, V], w1_rgb, w1_feat, b1, w2, b2,
    features [NT, TILE, V, C], q0 [NT, TILE, C])."""
    import tvm  # lazy: TVM is optional (the references run without it)
    from tvm import s_tir, te, tirx  # lazy: TVM is optional (the references run without it)

    n, tiles = te.var("n"), te.var("tiles")
    rgb = te.placeholder((views, 3, n), "float32", name="rgb")
    feat = te.placeholder((views, feat_channels, n), "float32", name="feat")
    mask = te.placeholder((n, views), "float32", name="mask")
    w1_rgb = te.placeholder((3, hidden), "float32", name="w1_rgb")
    w1_feat = te.placeholder((feat_channels, hidden), "float32", name="w1_feat")
    b1 = te.placeholder((hidden,), "float32", name="b1")
    w2 = te.placeholder((hidden, channels), "float32", name="w2")
    b2 = te.placeholder((channels,), "float32", name="b2")

    def token(t, i):
        return t * TILE + i

    # intermediates keep the TILE tokens of a tile last, so CPU vectors run over tokens: the inputs' token
    # index is contiguous, and every weight becomes a broadcast scalar
    f = te.reduce_axis((0, feat_channels), "f")
    pre = te.compute((tiles, views, hidden, TILE),
                     lambda t, v, h, i: te.sum(feat[v, f, token(t, i)] * w1_feat[f, h], axis=f), name="pre")
    act = te.compute((tiles, views, hidden, TILE), lambda t, v, h, i: te.max(
        pre[t, v, h, i] + b1[h] + rgb[v, 0, token(t, i)] * w1_rgb[0, h] + rgb[v, 1, token(t, i)] * w1_rgb[1, h]
        + rgb[v, 2, token(t, i)] * w1_rgb[2, h], tirx.const(0.0, "float32")), name="act")
    r = te.reduce_axis((0, hidden), "r")
    proj = te.compute((tiles, TILE, views, channels),
                      lambda t, i, v, c: te.sum(act[t, v, r, i] * w2[r, c], axis=r), name="proj")
    features = te.compute((tiles, TILE, views, channels), lambda t, i, v, c: proj[t, i, v, c] + b2[c],
                          name="features")
    vv = te.reduce_axis((0, views), "vv")
    peak = te.compute((tiles, TILE, channels), lambda t, i, c: te.max(tirx.if_then_else(
        mask[token(t, i), vv] > tirx.const(0.0, "float32"), features[t, i, vv, c], tirx.const(_NEG, "float32")),
        axis=vv), name="peak")
    q0 = te.compute((tiles, TILE, channels), lambda t, i, c: tirx.if_then_else(
        peak[t, i, c] > tirx.const(_NEG, "float32"), peak[t, i, c], tirx.const(0.0, "float32")), name="q0")
    func = te.create_prim_func([rgb, feat, mask, w1_rgb, w1_feat, b1, w2, b2, features, q0])
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    if target["kind"] == "cuda":
        _schedule_cuda(sch)
    else:
        _schedule_cpu(sch, hidden, channels)
    return sch.mod




def _accumulate_in_registers(sch, block, order, outer, k, unrolled, lane) -> None:
    """Reorder a product's loops to `order`, unroll/vectorize the innermost two, and keep its accumulators in a
    local buffer per `outer` iteration (registers) that is stored once after the k loop."""
    sch.reorder(*order)
    sch.unroll(unrolled)
    sch.vectorize(lane)
    copy = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(copy, outer, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(copy)[-1])
    sch.decompose_reduction(block, k)


def _schedule_cpu(sch, hidden: int, channels: int) -> None:
    """Parallel over tiles; a tile's [V, H, TILE] hidden activations stay in L1. The first product runs with the
    TILE tokens as vector lanes (its input's token index is contiguous), the second with the output channels as
    lanes (so it writes features in their final layout); both accumulate in registers."""
    features = sch.get_sblock("features")
    tile = sch.get_loops(features)[0]
    sch.parallel(tile)
    for name in ("proj", "act", "pre"):
        sch.compute_at(sch.get_sblock(name), tile, preserve_unit_loops=True)
    for name in ("peak", "q0"):
        sch.reverse_compute_at(sch.get_sblock(name), tile, preserve_unit_loops=True)
    pre = sch.get_sblock("pre")  # [V, H, TILE]: tokens are the vector lanes, 8 hidden units accumulate at once
    _, out, lane, k = sch.get_loops(pre)[-4:]
    outer, inner = sch.split(out, [None, next(u for u in (8, 4, 2, 1) if hidden % u == 0)])
    _accumulate_in_registers(sch, pre, [outer, k, inner, lane], outer, k, unrolled=inner, lane=lane)
    proj = sch.get_sblock("proj")  # [TILE, V, C]: channels are the vector lanes, the V views accumulate at once
    _, token, view, out, k = sch.get_loops(proj)[-5:]
    outer, lane = sch.split(out, [None, vector_lanes(channels)])
    _accumulate_in_registers(sch, proj, [token, outer, k, view, lane], outer, k, unrolled=view, lane=lane)
    sch.reverse_compute_inline(features)  # + b2 on the way out of the registers
    sch.reverse_compute_inline(sch.get_sblock("act"))  # relu(pre + rgb terms) written straight from registers
    peak = sch.get_sblock("peak")
    lane, view = sch.get_loops(peak)[-2:]
    sch.reorder(view, lane)
    sch.vectorize(lane)
    sch.decompose_reduction(peak, view)
    sch.unroll(sch.get_loops(peak)[-2])
    sch.vectorize(sch.get_loops(sch.get_sblock("q0"))[-1])


def _schedule_cuda(sch, threads: int = 128) -> None:
    """One block per tile; only the hidden activations [V, H, TILE] live in shared memory (fern_gpu: 10 views x
    64 x 16 x 4 B = 40 KiB, under the 48 KiB of static shared memory a block may have): each thread accumulates
    its own first-layer (pre) and second-layer (proj) sums in registers. Staging pre and proj in shared memory
    as well needed 80 KiB at those shapes, which ptxas refuses (found by the sm_90 AOT export)."""
    features = sch.get_sblock("features")
    tile = sch.get_loops(features)[0]
    sch.bind(tile, "blockIdx.x")
    _, lane = sch.split(sch.fuse(*sch.get_loops(features)[1:]), [None, threads])
    sch.bind(lane, "threadIdx.x")
    proj = sch.get_sblock("proj")
    sch.compute_at(proj, lane)
    sch.set_scope(proj, 0, "local")
    act = sch.get_sblock("act")
    sch.compute_at(act, tile)
    sch.set_scope(act, 0, "shared")
    _, act_lane = sch.split(sch.fuse(*sch.get_loops(act)[1:]), [None, threads])
    sch.bind(act_lane, "threadIdx.x")
    pre = sch.get_sblock("pre")
    sch.compute_at(pre, act_lane)
    sch.set_scope(pre, 0, "local")
    q0 = sch.get_sblock("q0")
    tile = sch.get_loops(q0)[0]
    sch.bind(tile, "blockIdx.x")
    _, lane = sch.split(sch.fuse(*sch.get_loops(q0)[1:]), [None, threads])
    sch.bind(lane, "threadIdx.x")
    sch.compute_at(sch.get_sblock("peak"), lane)
    sch.set_scope(sch.get_sblock("peak"), 0, "local")


def view_features(rgb: torch.Tensor, feat: torch.Tensor, mask: torch.Tensor,
                  w: ViewFeatureWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """rgb [V, 3, N], feat [V, F, N], mask [N, V] -> (features [N, V, C], q0 [N, C]) fp32 on the kernel (the
    reference when gradients are needed or no kernel can be had, see kernels.dispatch.get_kernel)."""
    views, rgb_channels, tokens = rgb.shape
    feat_channels, hidden, channels = w.shapes
    if rgb_channels != 3 or tuple(feat.shape) != (views, feat_channels, tokens) or tuple(mask.shape) != (tokens, views):
        raise ValueError(f"view_features: expected rgb [V, 3, N], feat [V, {feat_channels}, N], mask [N, V]; got "
                         f"{tuple(rgb.shape)}, {tuple(feat.shape)}, {tuple(mask.shape)}")
    if w.second is not None:
        raise ValueError("view_features: the view-features kernel computes fp32 layers; an integer second layer runs "
                         "in the fused front end (source_front_end)")
    if needs_grad(rgb, feat, mask):
        note_kernel("view_features", "reference")
        return reference_view_features(rgb, feat, mask, w)
    key = {"views": views, "feat": feat_channels, "hidden": hidden, "channels": channels, "tile": TILE}
    kernel = get_kernel("view_features", key, rgb.device,
                        lambda target: make_view_features(target, views, feat_channels, hidden, channels))
    if kernel is None:
        return reference_view_features(rgb, feat, mask, w)
    rgb, feat, mask = (kernel_ready(t, torch.float32) for t in (rgb, feat, mask))
    features = torch.empty(tokens, views, channels, device=rgb.device)
    q0 = torch.empty(tokens, channels, device=rgb.device)

    def launch(inputs, outputs):
        kernel(*inputs, *w.tensors(), outputs[0].view(-1, TILE, views, channels),
               outputs[1].view(-1, TILE, channels))

    run_tiled(launch, TILE, tokens, [rgb, feat, mask], [features, q0], token_dims=[2, 2, 0], inputs_longer_ok=True)
    return features, q0
