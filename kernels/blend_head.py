"""The blend colour head in one CPU kernel per ray: models.heads.BlendColorHead from the final tokens to the pixel.

Per 2048-ray chunk, BlendColorHead runs its LayerNorm, the per-sample block of the view MLP's first layer, the
fused per-(sample, view) blend (kernels/view_blend.py), the sample logits, a masked softmax over the ray's samples
and the weighted sum: a kernel and half a dozen PyTorch ops, each a pass over [R, S, *] in memory (about 40% of the
head's time in a frame: results/kernels_blend_cpu.json at 4be627e, "head" 284 ms against 164 ms of view-blend
kernel). Here, per ray, every intermediate stays in registers or L1:

    h        = LN(q_s)                                                   [C]     per sample s
    hq       = h @ Wq + b1                                               [H]
    hidden_v = relu(features_v @ Wf + ray_diff_v @ Wr + hq)              [V, H]
    w_v      = softmax_V(hidden_v . w2 + b2, finfo.min where v is not visible) * mask_v
    colour_s = sum_v w_v colors_v                                        [3]
    logit_s  = h . ws + bs, or -1e4 where no view sees the sample
    rgb      = sum_s softmax_S(logit)_s colour_s                         [3]

The [V, H] product keeps the views' accumulators in registers and takes each feature as an embedded broadcast;
the softmaxes are vector exps (te_math.script_exp) over the views and over the samples, padded to whole
registers with finfo.min logits. All fp32.

Layout: q [R, S, C], features [R, S, V, C], colors [R, S, V, 3], ray_diff [R, S, V, 4], mask [R, S, V] (1 =
visible), out [R, 3]; R symbolic, parallel over rays. C and H multiples of 16 (else the handler leaves the head to the
view-blend kernel), V <= 16 (more views: the kernel is not built and the reference runs, after one warning). CPU
only: on CUDA the head keeps the view-blend kernel with the rest in PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear
from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, needs_grad, note_kernel
from kernels.int_shift import IntShiftWeights, export_8bit, prepare_int_shift, reference_from_weights, vnni_available
from kernels.te_math import script_exp, script_pick
from kernels.view_blend import PreparedBlendWeights, reference_view_blend

__all__ = ["BlendHeadWeights", "reference_blend_head", "make_blend_head", "blend_head"]


class _ViewRows:
    """features [R, S, V, C] seen as the tile `_KernelParts.quantize` reads, src[t, v, lanes] = features[r, s, v,
    lanes] (sample s of ray r; t unused); used while the kernel is parsed."""

    def __init__(self, features, r, s):
        self.features, self.r, self.s = features, r, s

    def __getitem__(self, index):
        _, view, lanes = index
        return self.features[self.r, self.s, view, lanes]

_RAY_DIFF_DIM = 4
_RGB = 3
_UNSEEN_LOGIT = -1e4  # models.heads.BlendColorHead: a sample no view sees
LANES = 16
RAYS_PER_TASK = 16  # rays per parallel task: its scratch buffers are set up once per task


@dataclass(frozen=True, eq=False)
class BlendHeadWeights:
    """BlendColorHead's layers in the kernels' layout: the norm (ln_w, ln_b [C], eps), the view MLP as
    PreparedBlendWeights (features_t [C, H], ray_t [4, H], fc2_w [H], fc2_b [1], per_sample_w [H, C], fc1_b [H]),
    its per-sample block transposed (per_sample_t [C, H]) and sample_fc (sample_w [C], sample_b [1]). fp32
    snapshots (build again after changing the layers). features_int: the feature block as an 8-bit per-tensor
    integer shift layer (shiftadd.head: shift, a BlockShiftLinear view_fc1; features_t is then zeros), else None."""

    ln_w: torch.Tensor
    ln_b: torch.Tensor
    eps: float
    blend: PreparedBlendWeights
    per_sample_t: torch.Tensor
    sample_w: torch.Tensor
    sample_b: torch.Tensor
    features_int: IntShiftWeights | None = None

    @property
    def channels(self) -> int:
        return self.blend.channels

    @property
    def hidden(self) -> int:
        return self.blend.hidden

    @classmethod
    def from_modules(cls, norm: nn.Module, fc1: nn.Module, fc2: nn.Module, sample_fc: nn.Module) -> "BlendHeadWeights":
        """TypeError unless norm is an affine nn.LayerNorm and the layers plain nn.Linear; ValueError for shapes
        the kernel does not compute (C or H not a multiple of 16, sample_fc not Linear(C -> 1))."""
        if type(norm) is not nn.LayerNorm or norm.weight is None or norm.bias is None:
            raise TypeError(f"blend head kernel: the norm must be an affine nn.LayerNorm, got {type(norm).__name__}")
        if type(sample_fc) is not nn.Linear:
            raise TypeError(f"blend head kernel: sample_fc must be a plain nn.Linear, got {type(sample_fc).__name__}")
        features_int = None
        if isinstance(fc1, BlockShiftLinear):  # the feature block integer: the rest as a dense fc1 around zeros
            features_int = _integer_feature_block(fc1)
            fc1 = _dense_stand_in(fc1)
        blend = PreparedBlendWeights.from_linears(fc1, fc2)
        channels, hidden = blend.channels, blend.hidden
        if channels % LANES or hidden % LANES:
            raise ValueError(f"blend head kernel: channels and hidden units must be multiples of {LANES}, got "
                             f"{channels} and {hidden}")
        if (sample_fc.in_features, sample_fc.out_features) != (channels, 1) or tuple(norm.weight.shape) != (channels,):
            raise ValueError(f"blend head kernel: the norm and sample_fc must take the {channels} channels the view "
                             f"MLP does")
        snapshot = lambda t: kernel_ready(t.detach().float().reshape(-1).clone(), torch.float32)  # noqa: E731
        sample_b = sample_fc.bias if sample_fc.bias is not None else sample_fc.weight.new_zeros(1)
        return cls(ln_w=snapshot(norm.weight), ln_b=snapshot(norm.bias), eps=float(norm.eps), blend=blend,
                   per_sample_t=kernel_ready(blend.per_sample_w.t().clone(), torch.float32),
                   sample_w=snapshot(sample_fc.weight), sample_b=snapshot(sample_b), features_int=features_int)

    def kernel_arguments(self) -> tuple[torch.Tensor, ...]:
        b = self.blend
        features = self.features_int.tensors() if self.features_int is not None else (b.features_t,)
        return (self.ln_w, self.ln_b, self.per_sample_t, b.fc1_b, *features, b.ray_t, b.fc2_w, b.fc2_b,
                self.sample_w, self.sample_b)

    def op_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """What the custom op takes: the fp32 layout, then the integer feature block's packed, compensation,
        out_scale, bias, absmax (Nones for an fp32 head)."""
        b = self.blend
        integer = self.features_int.tensors() if self.features_int is not None else (None,) * 5
        return (self.ln_w, self.ln_b, self.per_sample_t, b.fc1_b, b.features_t, b.ray_t, b.fc2_w, b.fc2_b,
                self.sample_w, self.sample_b, *integer)


def _integer_feature_block(fc1: BlockShiftLinear) -> IntShiftWeights:
    """The kernel layout of a BlockShiftLinear's feature block; ValueError unless it is an 8-bit per-tensor
    IntShiftLinear with int8 weights (what the kernel computes)."""
    exported, per_token = export_8bit({"view_fc1.first": fc1.first}, "blend head kernel")
    if per_token:
        raise ValueError("blend head kernel: the integer feature block needs a calibrated per-tensor scale")
    return prepare_int_shift(exported["view_fc1.first"])


def _dense_stand_in(fc1: BlockShiftLinear) -> nn.Linear:
    """nn.Linear(2C + 4 -> H) with zeros in the feature block and the BlockShiftLinear's dense h | ray_diff block
    and bias: what PreparedBlendWeights lays out for the parts that stay fp32."""
    rest = fc1.rest
    stand_in = nn.Linear(fc1.in_features, fc1.out_features, bias=rest.bias is not None)
    with torch.no_grad():
        stand_in.weight.zero_()
        stand_in.weight[:, fc1.block:] = rest.weight.detach().float().cpu()
        if rest.bias is not None:
            stand_in.bias.copy_(rest.bias.detach().float().cpu())
    return stand_in


def reference_blend_head(q: torch.Tensor, features: torch.Tensor, colors: torch.Tensor, ray_diff: torch.Tensor,
                         mask: torch.Tensor, w: BlendHeadWeights) -> torch.Tensor:
    """BlendColorHead's forward from these weights (the ground truth and the fallback): q [R, S, C], features
    [R, S, V, C], colors [R, S, V, 3], ray_diff [R, S, V, 4], mask [R, S, V] -> rgb [R, 3] fp32."""
    h = F.layer_norm(q.float(), (w.channels,), w.ln_w, w.ln_b, w.eps)
    b = w.blend
    features_t = b.features_t
    if w.features_int is not None:  # the feature block's integer outputs through an identity "weight"
        features = reference_from_weights(features.float(), w.features_int)
        features_t = torch.eye(w.hidden, dtype=torch.float32)
    sample_colors = reference_view_blend(b.per_sample(h), features, colors, ray_diff, mask, features_t, b.ray_t,
                                         b.fc2_w, b.fc2_b)  # [R, S, 3]
    seen = (mask > 0).any(dim=-1)
    logits = (h @ w.sample_w + w.sample_b).masked_fill(~seen, _UNSEEN_LOGIT)  # [R, S]
    return (torch.softmax(logits, dim=1)[..., None] * sample_colors).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# TVM kernel
# ----------------------------------------------------------------------------------------------------------------

def make_blend_head(samples: int, views: int, channels: int, hidden: int, eps: float, integer: bool = False):
    """IRModule "main"(q [R, S, C], features [R, S, V, C], colors [R, S, V, 3], ray_diff [R, S, V, 4],
    mask [R, S, V], BlendHeadWeights.kernel_arguments(), out [R, 3]) for the CPU; R symbolic. integer: the feature
    block is an 8-bit per-tensor integer shift layer (its packed, compensation, out_scale, bias, absmax in place
    of features_t): per sample, the V views' features quantized with its calibrated scale and multiplied on VNNI
    (V rows x H/16 accumulators, `_KernelParts`), bit-exact as a layer; the rest of the head as in fp32."""
    import tvm  # lazy: TVM is optional (the reference runs without it)
    from tvm.script import tirx as T

    from kernels.int_shift import _KernelParts

    S, V, C, H = samples, views, channels, hidden
    if C % LANES or H % LANES or not 1 <= V <= LANES:
        raise ValueError(f"blend head kernel: needs C and H multiples of {LANES} and 1..{LANES} views, got C={C}, "
                         f"H={H}, V={V}")
    c_blocks, h_blocks, s_vectors = C // LANES, H // LANES, -(-S // LANES)
    horizontal = _KernelParts(8, 1).horizontal  # a 16-lane reduction on register shuffles
    view_rows = _KernelParts(8, V)  # integer: the views' features as the rows of one micro-tile
    lanes = lambda start: T.Ramp(start, 1, LANES)  # noqa: E731
    spread = lambda value: T.Broadcast(value, LANES)  # noqa: E731
    lowest = T.float32(float(torch.finfo(torch.float32).min))
    add = lambda a, b: a + b  # noqa: E731

    def gather_lanes(scalars, fill):
        """One register holding scalars[k] in lane k and `fill` past them: one broadcast and blend per scalar."""
        vector = T.bind(spread(fill))
        for k, value in enumerate(scalars):
            vector = T.bind(T.Shuffle([spread(value), vector],
                                      [T.int32(k if lane == k else LANES + lane) for lane in range(LANES)]))
        return vector

    def softmax_weights(logits_vector):
        """exp(logits - max) over a register of logits (finfo.min in the padding) and their sum."""
        peak = horizontal(logits_vector, T.max)
        exps = T.bind(script_exp(T, logits_vector - spread(peak), LANES))
        return exps, horizontal(exps, add)

    def integer_features(r, s, features, int_w, int_c, int_s, int_b, int_absmax, xq, qscale, hq):
        """hq + the integer feature block of every view of sample s (bound register values, {(v, j): value})."""
        view_rows.quantize(_ViewRows(features, r, s), 0, C, xq, qscale, False, int_absmax)
        acc = {}

        def keep(v, j, value):
            acc[v, j] = T.bind(value + hq[j])

        view_rows.dot_products(xq, int_w, int_c, int_s, int_b, qscale, 0, C, h_blocks, keep)
        return acc

    def sample(r, s, q, features, colors, ray_diff, mask, ln_w, ln_b, wq, b1, wf, wr, w2, b2, ws, bs, normed,
               view_logits, sample_colour, sample_logit, int_w, int_c, int_s, int_b, int_absmax, xq, qscale):
        """Sample s of ray r: its blended colour into sample_colour[s, :3] and its logit into sample_logit[s]
        (emitted while the kernel is parsed; every value a register except the small L1 rows)."""
        rows = [T.bind(q[r, s, lanes(b * LANES)]) for b in range(c_blocks)]
        total = rows[0]
        for row in rows[1:]:
            total = total + row
        mean = T.bind(horizontal(T.bind(total), add) / T.float32(C))
        centred = [T.bind(row - spread(mean)) for row in rows]
        squares = centred[0] * centred[0]
        for row in centred[1:]:
            squares = squares + row * row
        rstd = T.bind(T.float32(1) / T.sqrt(horizontal(T.bind(squares), add) / T.float32(C) + T.float32(eps)))
        h = [T.bind(row * spread(rstd) * ln_w[lanes(b * LANES)] + ln_b[lanes(b * LANES)])
             for b, row in enumerate(centred)]
        dot = h[0] * ws[lanes(0)]
        for b in range(1, c_blocks):
            dot = dot + h[b] * ws[lanes(b * LANES)]
        own_logit = T.bind(horizontal(T.bind(dot), add) + bs[0])
        # hq = W_q h + b1, then every view's hidden units on top of it (the reductions unrolled, every accumulator a
        # register). h goes through L1 (one vector store, scalar reloads): shuffles of its lanes let TVM's
        # simplifier push them into h's expression, which took the build minutes
        for b, value in enumerate(h):
            T.buffer_store(normed, value, [lanes(b * LANES)])
        hq = [T.bind(b1[lanes(j * LANES)]) for j in range(h_blocks)]
        for c in range(C):
            x = T.bind(spread(normed[c]))
            for j in range(h_blocks):
                hq[j] = T.bind(hq[j] + x * wq[c, lanes(j * LANES)])
        if integer:
            acc = integer_features(r, s, features, int_w, int_c, int_s, int_b, int_absmax, xq, qscale, hq)
        else:
            acc = {(v, j): hq[j] for v in range(V) for j in range(h_blocks)}
        for c in range(C if integer else 0, C + _RAY_DIFF_DIM):
            weights = [T.bind(wf[c, lanes(j * LANES)] if c < C else wr[c - C, lanes(j * LANES)])
                       for j in range(h_blocks)]
            for v in range(V):
                x = T.bind(spread(features[r, s, v, c] if c < C else ray_diff[r, s, v, c - C]))
                for j in range(h_blocks):
                    acc[v, j] = T.bind(acc[v, j] + x * weights[j])
        visible = gather_lanes([mask[r, s, v] for v in range(V)], T.float32(0))
        scores = []
        for v in range(V):
            score = T.max(acc[v, 0], spread(T.float32(0))) * w2[lanes(0)]
            for j in range(1, h_blocks):
                score = score + T.max(acc[v, j], spread(T.float32(0))) * w2[lanes(j * LANES)]
            scores.append(T.bind(horizontal(T.bind(score), add) + b2[0]))
        T.buffer_store(view_logits, T.Select(visible > spread(T.float32(0)), gather_lanes(scores, lowest),
                                             spread(lowest)), [lanes(0)])  # (through L1, as h)
        exps, total_exp = softmax_weights(T.bind(view_logits[lanes(0)]))
        view_weights = T.bind(exps / spread(total_exp) * visible)
        for channel in range(_RGB):
            colour = script_pick(T, view_weights, [0]) * colors[r, s, 0, channel]
            for v in range(1, V):
                colour = colour + script_pick(T, view_weights, [v]) * colors[r, s, v, channel]
            T.buffer_store(sample_colour, colour, [s, channel])
        T.buffer_store(sample_logit, T.Select(horizontal(visible, T.max) > T.float32(0), own_logit,
                                              T.float32(_UNSEEN_LOGIT)), [s])

    def ray_colour(r, sample_colour, sample_logit, sample_weights, out):
        """out[r] = the samples' colours blended by the softmax of their logits (finfo.min past S: weight 0)."""
        vectors = [T.bind(sample_logit[lanes(k * LANES)]) for k in range(s_vectors)]
        peak = vectors[0]
        for vector in vectors[1:]:
            peak = T.max(peak, vector)
        peak = T.bind(horizontal(T.bind(peak), T.max))
        exps = [T.bind(script_exp(T, vector - spread(peak), LANES)) for vector in vectors]
        total = exps[0]
        for value in exps[1:]:
            total = total + value
        total = T.bind(horizontal(T.bind(total), add))
        for k, value in enumerate(exps):
            T.buffer_store(sample_weights, value, [lanes(k * LANES)])
        for channel in range(_RGB):
            colour = sample_weights[0] * sample_colour[0, channel]
            for s in range(1, S):
                colour = colour + sample_weights[s] * sample_colour[s, channel]
            T.buffer_store(out, colour / total, [r, channel])

    @T.macro
    def ray_loop(q_h, features_h, colors_h, diff_h, mask_h, ln_w, ln_b, wq, b1, wf, int_w, int_c, int_s, int_b,
                 int_absmax, wr, w2, b2, ws, bs, out_h):
        """The inputs matched to their shapes (R symbolic), then every ray, RAYS_PER_TASK per parallel task."""
        rays = T.int32()
        q = T.match_buffer(q_h, (rays, S, C), "float32")
        features = T.match_buffer(features_h, (rays, S, V, C), "float32")
        colors = T.match_buffer(colors_h, (rays, S, V, _RGB), "float32")
        ray_diff = T.match_buffer(diff_h, (rays, S, V, _RAY_DIFF_DIM), "float32")
        mask = T.match_buffer(mask_h, (rays, S, V), "float32")
        out = T.match_buffer(out_h, (rays, _RGB), "float32")
        for task in T.parallel((rays + RAYS_PER_TASK - 1) // RAYS_PER_TASK):
            normed = T.alloc_buffer((C,), "float32", scope="local")
            view_logits = T.alloc_buffer((LANES,), "float32", scope="local")
            sample_colour = T.alloc_buffer((S, _RGB), "float32", scope="local")
            sample_logit = T.alloc_buffer((s_vectors * LANES,), "float32", scope="local")  # past S: finfo.min
            sample_weights = T.alloc_buffer((s_vectors * LANES,), "float32", scope="local")
            xq = T.alloc_buffer((V, C), "uint8", scope="local")  # integer: the views' quantized features
            qscale = T.alloc_buffer((V,), "float32", scope="local")
            for k in T.serial(s_vectors * LANES):
                sample_logit[k] = lowest
            for within in T.serial(RAYS_PER_TASK):
                if task * RAYS_PER_TASK + within < rays:
                    for s in T.serial(S):
                        sample(task * RAYS_PER_TASK + within, s, q, features, colors, ray_diff, mask, ln_w, ln_b, wq,
                               b1, wf, wr, w2, b2, ws, bs, normed, view_logits, sample_colour, sample_logit, int_w,
                               int_c, int_s, int_b, int_absmax, xq, qscale)
                    ray_colour(task * RAYS_PER_TASK + within, sample_colour, sample_logit, sample_weights, out)

    if integer:
        @T.prim_func
        def main(q_h: T.handle, features_h: T.handle, colors_h: T.handle, diff_h: T.handle, mask_h: T.handle,
                 ln_w: T.Buffer((C,), "float32"), ln_b: T.Buffer((C,), "float32"), wq: T.Buffer((C, H), "float32"),
                 b1: T.Buffer((H,), "float32"), int_w: T.Buffer((h_blocks, C // 4, 4 * LANES), "int8"),
                 int_c: T.Buffer((H,), "int32"), int_s: T.Buffer((H,), "float32"), int_b: T.Buffer((H,), "float32"),
                 int_absmax: T.Buffer((1,), "float32"), wr: T.Buffer((_RAY_DIFF_DIM, H), "float32"),
                 w2: T.Buffer((H,), "float32"), b2: T.Buffer((1,), "float32"), ws: T.Buffer((C,), "float32"),
                 bs: T.Buffer((1,), "float32"), out_h: T.handle):
            T.func_attr({"global_symbol": "main", "tir.noalias": True})
            ray_loop(q_h, features_h, colors_h, diff_h, mask_h, ln_w, ln_b, wq, b1, None, int_w, int_c, int_s, int_b,
                     int_absmax, wr, w2, b2, ws, bs, out_h)

        return tvm.IRModule({"main": main})

    @T.prim_func
    def main(q_h: T.handle, features_h: T.handle, colors_h: T.handle, diff_h: T.handle, mask_h: T.handle,
             ln_w: T.Buffer((C,), "float32"), ln_b: T.Buffer((C,), "float32"), wq: T.Buffer((C, H), "float32"),
             b1: T.Buffer((H,), "float32"), wf: T.Buffer((C, H), "float32"),
             wr: T.Buffer((_RAY_DIFF_DIM, H), "float32"), w2: T.Buffer((H,), "float32"),
             b2: T.Buffer((1,), "float32"), ws: T.Buffer((C,), "float32"), bs: T.Buffer((1,), "float32"),
             out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        ray_loop(q_h, features_h, colors_h, diff_h, mask_h, ln_w, ln_b, wq, b1, wf, None, None, None, None, None, wr, w2,
                 b2, ws, bs, out_h)

    return tvm.IRModule({"main": main})


def blend_head(q: torch.Tensor, features: torch.Tensor, colors: torch.Tensor, ray_diff: torch.Tensor,
               mask: torch.Tensor, w: BlendHeadWeights) -> torch.Tensor:
    """q [R, S, C], features [R, S, V, C], colors [R, S, V, 3], ray_diff [R, S, V, 4], mask [R, S, V] (CPU) ->
    rgb [R, 3] fp32 on the kernel; the reference when gradients are needed or no kernel can be had (one warning)."""
    if q.dim() != 3 or q.shape[-1] != w.channels:
        raise ValueError(f"blend_head: q must be [rays, samples, C={w.channels}], got {tuple(q.shape)}")
    rays, samples, channels = q.shape
    views = features.shape[2] if features.dim() == 4 else -1
    expected = {"features": (rays, samples, views, channels), "colors": (rays, samples, views, _RGB),
                "ray_diff": (rays, samples, views, _RAY_DIFF_DIM), "mask": (rays, samples, views)}
    for name, tensor in (("features", features), ("colors", colors), ("ray_diff", ray_diff), ("mask", mask)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"blend_head: {name} must be {list(expected[name])} to match q {list(q.shape)}, got "
                             f"{list(tensor.shape)}")
        if tensor.device.type != "cpu":
            raise ValueError(f"blend_head: the kernel runs on CPU, got {name} on {tensor.device}")
    if needs_grad(q, features, colors, ray_diff, mask):
        note_kernel("blend_head", "reference")
        return reference_blend_head(q, features, colors, ray_diff, mask, w)
    kernel = None
    if rays:
        integer = w.features_int is not None
        key = {"samples": samples, "views": views, "channels": channels, "hidden": w.hidden, "eps": w.eps}
        if integer and not vnni_available():
            note_kernel("blend_head", "reference")
        else:
            kernel = get_kernel("blend_head", key | ({"integer": True} if integer else {}), q.device,
                                lambda _: make_blend_head(samples, views, channels, w.hidden, w.eps, integer))
    if kernel is None:
        return reference_blend_head(q, features, colors, ray_diff, mask, w)
    ready = lambda t: kernel_ready(t, torch.float32)  # noqa: E731
    out = torch.empty(rays, _RGB, dtype=torch.float32)
    kernel(ready(q), ready(features), ready(colors), ready(ray_diff), ready(mask), *w.kernel_arguments(), out)
    return out
