"""GNT's view attention with integer shift layers in one VNNI kernel (CPU): for ShiftAdd variants whose view
attention linears are all IntShiftLinear (8-bit activations, exact power-of-two int8 weights), with per-token
scales (g, j) or calibrated per-tensor ones (k: each quantization a multiply, no per-row absmax or division).

Per token, its V source-view rows go through every integer layer of the attention without leaving registers and
L1 (kernels/int_shift.py's quantize and dot products, the views as the rows of a micro-tile):

    k | v  = int(features) @ [Wk; Wv]^T                         [V, 2C]  (one quantization per row, as each layer)
    pos    = int(relu(int(ray_diff) @ Wp1^T + bp1)) @ Wp2^T + bp2 [V, C]
    logits = int(relu(int(k - qp + pos) @ Wa1^T + ba1)) @ Wa2^T + ba2, finfo.min where the view is invisible
    out    = sum_V softmax_V(logits) * mask * (v + pos)           [C]

The 4-wide rows (ray_diff and the hidden units of pos and attention, h = C / 8 <= 4) of four views share one
register: their quantization, the 4 -> h layer (one vpdpbusd) and C -> h (one permute + one vpdpbusd per input
group) run for four views at once (fewer instructions than one view per register: the compiled loop's mix is in
results/kernel_anatomy_cpu.json).
Every integer layer is bit-exact against its module (`int_shift_reference`): the fp32 values it quantizes are
computed in the module's order. qp = q_fc(LN(q)) comes in and out_fc follows (each an integer layer on its own
kernel), or, in `int_view_sublayer` (what g and j run), the LN, q_fc, out_fc and the residual are in the same kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.shiftadd.int_shift import ABSMAX_FLOOR
from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, note_kernel
from kernels.int_shift import LANES, IntShiftWeights, _KernelParts, absmax_vector, export_8bit, prepare_int_shift, \
    reference_from_weights, stack_outputs, vnni_available
from kernels.te_math import script_exp, script_pick

__all__ = ["IntViewWeights", "IntViewSublayerWeights", "check_one_mode", "reference_int_view_attention", "reference_int_view_sublayer",
           "make_int_view_attention", "int_view_attention", "int_view_sublayer"]

_RAY_DIFF_DIM = 4
_LAYERS = ("kv", "pos1", "pos2", "attn1", "attn2")
_SLOT = {name: i for i, name in enumerate(_LAYERS)}  # each layer's entry in act_absmax
_SUB_SLOT = {"q": 0, "out": 1}  # in the sublayer's act_absmax
PARTS = ("positions", "keys_values", "logits", "softmax", "q_fc", "out_fc")  # what leave_out can name
_TASK = 64  # tokens per parallel task
_GROUP = 4  # tokens whose q_fc / out_fc run as one tile (independent chains: the LN's reductions overlap)


class _TokenRows:
    """buffer seen as the tile _KernelParts reads, src[t, i, lanes] = token t + i + shift of buffer: buffer[token, 0,
    lanes] (axis 0, an [N, 1, C] buffer) or buffer[0, token, lanes] (axis 1, a [1, group, C] one); used while the
    kernel is parsed."""

    def __init__(self, buffer, axis: int = 0, shift=0):
        self.buffer, self.axis, self.shift = buffer, axis, shift

    def __getitem__(self, index):
        t, i, lanes = index
        token = t + i + self.shift
        return self.buffer[token, 0, lanes] if self.axis == 0 else self.buffer[0, token, lanes]


@dataclass(frozen=True, eq=False)
class IntViewWeights:
    """The attention's integer layers in the kernel layout (IntShiftWeights): kv (k_fc and v_fc stacked, C -> 2C),
    pos1 (4 -> h), pos2 (h -> C), attn1 (C -> h), attn2 (h -> C); every one 8-bit, all per token or all per tensor
    (act_absmax fp32 [5]: their calibrated absmax in that order, zeros per token)."""

    kv: IntShiftWeights
    pos1: IntShiftWeights
    pos2: IntShiftWeights
    attn1: IntShiftWeights
    attn2: IntShiftWeights
    act_absmax: torch.Tensor
    per_token: bool

    @property
    def channels(self) -> int:
        return self.kv.in_features

    @classmethod
    def from_module(cls, attention: nn.Module) -> "IntViewWeights":
        """ValueError unless k, v, pos and attention layers are all 8-bit IntShiftLinear with int8 weights, all per
        token or all per tensor (k_fc and v_fc calibrated alike: they share the features' quantization), and the
        widths fit the kernel (C a multiple of 16, h <= 4)."""
        names = ("k_fc", "v_fc", "pos_fc1", "pos_fc2", "attn_fc1", "attn_fc2")
        layers = [getattr(attention, name) for name in names]
        exported, per_token = export_8bit(dict(zip(names, layers)), "integer view attention")
        channels, hidden = layers[0].in_features, max(layers[2].out_features, layers[4].out_features)
        if channels % LANES or hidden > 4 or layers[2].in_features != _RAY_DIFF_DIM:
            raise ValueError(f"integer view attention: needs C % 16 == 0 and a hidden width <= 4, got C={channels}, "
                             f"h={hidden}")
        try:
            kv = stack_outputs([exported["k_fc"], exported["v_fc"]])
        except ValueError as error:
            raise ValueError(f"integer view attention: k_fc and v_fc: {error}") from error
        ordered = [kv] + [exported[layer] for layer in ("pos_fc1", "pos_fc2", "attn_fc1", "attn_fc2")]
        prepared = {name: prepare_int_shift(e) for name, e in zip(_LAYERS, ordered)}
        return cls(**prepared, act_absmax=absmax_vector(list(prepared.values())), per_token=per_token)

    @property
    def hidden(self) -> int:
        return self.pos1.out_features

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Each layer's (packed, compensation, out_scale, bias), then act_absmax: what the custom op and the kernel
        take."""
        return (*(t for name in _LAYERS for t in getattr(self, name).tensors()[:4]), self.act_absmax)

    @classmethod
    def from_tensors(cls, kv, pos1, pos2, attn1, attn2, act_absmax, channels: int, hidden: int,
                     per_token: bool) -> "IntViewWeights":
        """Inverse of `tensors()` (what the custom op receives): each layer's (packed, compensation, out_scale,
        bias), act_absmax [5], no copies."""
        sizes = {"kv": (channels, 2 * channels), "pos1": (_RAY_DIFF_DIM, hidden), "pos2": (hidden, channels),
                 "attn1": (channels, hidden), "attn2": (hidden, channels)}
        layers = {name: IntShiftWeights.eight_bit(parts, *sizes[name], None if per_token else act_absmax[i:i + 1])
                  for i, (name, parts) in enumerate(zip(_LAYERS, (kv, pos1, pos2, attn1, attn2)))}
        return cls(**layers, act_absmax=act_absmax, per_token=bool(per_token))


@dataclass(frozen=True, eq=False)
class IntViewSublayerWeights:
    """What the pre-norm sublayer adds around the attention (q + out_fc(attention(q_fc(LN(q)))): the block's
    LayerNorm (ln_w, ln_b [C], eps) and q_fc, out_fc as IntShiftWeights (8-bit, per token or per tensor with
    act_absmax fp32 [2] their calibrated absmax, zeros per token)."""

    ln_w: torch.Tensor
    ln_b: torch.Tensor
    eps: float
    q: IntShiftWeights
    out: IntShiftWeights
    act_absmax: torch.Tensor
    per_token: bool

    @classmethod
    def from_modules(cls, norm: nn.Module, attention: nn.Module) -> "IntViewSublayerWeights":
        """ValueError unless norm is an affine nn.LayerNorm and q_fc, out_fc are 8-bit IntShiftLinear with int8
        weights and one activation-scale mode."""
        if type(norm) is not nn.LayerNorm or norm.weight is None or norm.bias is None:
            raise ValueError("integer view attention sublayer: the block's norm must be an affine nn.LayerNorm")
        snapshot = lambda t: kernel_ready(t.detach().float().cpu().clone(), torch.float32)  # noqa: E731
        exported, per_token = export_8bit({"q_fc": attention.q_fc, "out_fc": attention.out_fc},
                                          "integer view attention sublayer")
        q, out = prepare_int_shift(exported["q_fc"]), prepare_int_shift(exported["out_fc"])
        return cls(ln_w=snapshot(norm.weight), ln_b=snapshot(norm.bias), eps=float(norm.eps), q=q, out=out,
                   act_absmax=absmax_vector([q, out]), per_token=per_token)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.ln_w, self.ln_b, *self.q.tensors()[:4], *self.out.tensors()[:4], self.act_absmax)

    @classmethod
    def from_tensors(cls, ln_w, ln_b, q, out, act_absmax, eps: float, per_token: bool) -> "IntViewSublayerWeights":
        """Inverse of `tensors()`: q and out as each layer's (packed, compensation, out_scale, bias), act_absmax [2]."""
        channels = ln_w.shape[0]
        calibrated = lambda name: None if per_token else act_absmax[_SUB_SLOT[name]:_SUB_SLOT[name] + 1]  # noqa: E731
        return cls(ln_w=ln_w, ln_b=ln_b, eps=float(eps), q=IntShiftWeights.eight_bit(q, channels, channels,
                                                                                      calibrated("q")),
                   out=IntShiftWeights.eight_bit(out, channels, channels, calibrated("out")), act_absmax=act_absmax,
                   per_token=bool(per_token))


def check_one_mode(w: IntViewWeights, sub: IntViewSublayerWeights) -> None:
    """ValueError unless the sublayer's q_fc/out_fc and the attention's layers share one activation-scale mode (one
    kernel computes one)."""
    if sub.per_token != w.per_token:
        raise ValueError("int_view_sublayer: q_fc/out_fc and the attention's layers use different activation scales "
                         f"(per token: {sub.per_token} vs {w.per_token}); the kernel needs one mode")


def reference_int_view_sublayer(x: torch.Tensor, features: torch.Tensor, ray_diff: torch.Tensor, mask: torch.Tensor,
                                w: IntViewWeights, sub: IntViewSublayerWeights) -> torch.Tensor:
    """The pre-norm sublayer with its integer layers (the ground truth and fallback): x [N, C] -> x + out_fc(
    attention(q_fc(LN(x)), features [N, V, C], ray_diff [N, V, 4], mask [N, V])) fp32 [N, C]."""
    x = x.float()
    qp = reference_from_weights(F.layer_norm(x, (x.shape[-1],), sub.ln_w, sub.ln_b, sub.eps), sub.q)
    return x + reference_from_weights(reference_int_view_attention(qp, features, ray_diff, mask, w), sub.out)


def reference_int_view_attention(qp: torch.Tensor, features: torch.Tensor, ray_diff: torch.Tensor,
                                 mask: torch.Tensor, w: IntViewWeights) -> torch.Tensor:
    """ViewAttention's forward between q_fc and out_fc with its integer layers (the ground truth and fallback):
    qp [N, C], features [N, V, C], ray_diff [N, V, 4], mask [N, V] -> [N, C]."""
    channels = w.channels
    mask = mask.float()[..., None]
    kv = reference_from_weights(features.float(), w.kv)
    k, v = kv[..., :channels], kv[..., channels:]
    pos = reference_from_weights(reference_from_weights(ray_diff.float(), w.pos1, "relu"), w.pos2)
    logits = reference_from_weights(reference_from_weights(k - qp.float()[:, None, :] + pos, w.attn1, "relu"),
                                    w.attn2)
    logits = logits.masked_fill(mask == 0, torch.finfo(logits.dtype).min)
    return ((v + pos) * (torch.softmax(logits, dim=-2) * mask)).sum(dim=-2)


def make_int_view_attention(views: int, channels: int, sublayer: bool = False, eps: float | None = None,
                            per_token: bool = True, leave_out: frozenset = frozenset()):
    """IRModule "main" for the VNNI CPU; N symbolic, the attention one token per step (with `sublayer`, the LN,
    q_fc and out_fc of four tokens at a time).

    sublayer False: (qp [N, C], features [N, V, C], ray_diff [N, V, 4], mask [N, V], the five layers' packed,
    compensation, out_scale, bias, act_absmax [5], out [N, C]): everything between q_fc and out_fc.
    sublayer True (the whole pre-norm sublayer, x + out_fc(attention(q_fc(LN(x))))): (normed [N, 1, C], x [N, 1, C],
    ln_w, ln_b, features, ray_diff, mask, the five layers' four tensors, act_absmax [5], q_fc's and out_fc's four,
    their act_absmax [2], out [N, 1, C]); eps given: the LN is computed in the kernel (normed is not read: pass x
    twice); eps None: normed = the block's LN of x from the caller.
    per_token False: every layer quantizes with its calibrated absmax (act_absmax), a multiply per value instead of
    a per-row absmax and division (ShiftAdd variants with shiftadd.act_scale: per_tensor).
    leave_out (profiling only: benchmarks/kernel_anatomy.py's time per part; the output is then wrong): parts of
    PARTS not emitted, e.g. {"softmax"} (the attention's output is then the first view's logits)."""
    import tvm  # lazy: TVM is optional
    from tvm.script import tirx as T

    if not set(leave_out) <= set(PARTS):
        raise ValueError(f"make_int_view_attention: leave_out {sorted(leave_out)} names parts outside {PARTS}")

    parts = _KernelParts(8, views)
    quad = _KernelParts(8, _GROUP)  # q_fc and out_fc (and the LN) of a group of tokens, one register row each
    row = _KernelParts(8, 1)  # the same for a last group of fewer tokens
    blocks = channels // LANES
    layer_count = len(_LAYERS)
    lowest = float(torch.finfo(torch.float32).min)
    lanes = lambda start, width=LANES: T.Ramp(start, 1, width)  # noqa: E731

    def shapes(w_in: int, w_out: int):
        in_p, out_p = -(-w_in // LANES) * LANES, -(-w_out // LANES) * LANES
        return (out_p // LANES, in_p // 4, LANES * 4), (out_p,)

    kv_p, kv_o = shapes(channels, 2 * channels)
    p1_p, p1_o = shapes(4, 4)
    p2_p, p2_o = shapes(4, channels)
    a1_p, a1_o = shapes(channels, 4)
    a2_p, a2_o = shapes(4, channels)
    c_p, c_o = shapes(channels, channels)

    def softmax_and_sum(t, b, logits, vp, mask, store):
        """Channels b*16.. of token t: the views' softmax per channel and the weighted sum of vp = v + pos,
        normalised once at the end (emitted while the kernel is parsed, the views unrolled, every value a register)."""
        peak = T.bind(logits[0, 0, lanes(b * LANES)])
        for i in range(1, views):
            peak = T.bind(T.max(peak, logits[0, i, lanes(b * LANES)]))
        weights = [T.bind(script_exp(T, logits[0, i, lanes(b * LANES)] - peak, LANES)) for i in range(views)]
        total = weights[0]
        for i in range(1, views):
            total = total + weights[i]
        value = T.Broadcast(T.float32(0), LANES)
        for i in range(views):
            value = value + weights[i] * T.Broadcast(mask[t, i], LANES) \
                * vp[i, lanes(b * LANES)]
        store(b, value / total)

    groups = -(-views // 4)  # the 4-wide rows (ray_diff, the hidden units) of four views share one register
    level, floor = T.float32(127.0), T.float32(float(ABSMAX_FLOOR))
    vnni = lambda acc, act, weight: T.call_llvm_pure_intrin(  # noqa: E731
        f"int32x{LANES}", "llvm.x86.avx512.vpdpbusd.512", acc, T.reinterpret("int8x64", act), weight)
    pick = lambda value, indices, width=LANES: script_pick(T, value, indices, width)  # noqa: E731

    relu = parts.relu
    per_row = lambda value: pick(value, [k % 4 for k in range(LANES)])  # lane k <- lane k % 4 (row r, entry o)

    def view_rows(t, ray_diff, k):
        """ray_diff of views 4k..4k+3 of token t, row r in lanes 4r..4r+3 (missing views zero)."""
        width = 4 * min(4, views - 4 * k)
        load = ray_diff[t, T.Ramp(16 * k, 1, width)]
        if width == LANES:
            return T.bind(load)
        return T.bind(pick([load, T.Broadcast(T.float32(0), width)],
                           list(range(width)) + [width] * (LANES - width), width))

    def quantize_rows_of_4(values, nonnegative, calibrated):
        """Four 4-wide rows (lanes 4r..4r+3) quantized exactly as _KernelParts.quantize does each row (the row's
        absmax as an integer max of |x| bit patterns, or the layer's calibrated absmax when per tensor, the floor,
        one IEEE division each for 127 / absmax and absmax / 127, clamps, round to nearest even, +128), all four in
        the same instructions (per tensor: calibrated = the layer's hoisted (127 / absmax, absmax / 127)): -> (words
        int32x4: row r's four bytes as word r, scale float32x16: row r's dequantization scale in its lanes)."""
        if per_token:
            bits = T.bind(T.reinterpret(f"int32x{LANES}", values if nonnegative else T.abs(values)))
            bits = T.bind(T.max(bits, pick(bits, [k ^ 1 for k in range(LANES)])))
            bits = T.max(bits, pick(bits, [k ^ 2 for k in range(LANES)]))
            peak = T.bind(T.max(T.reinterpret(f"float32x{LANES}", bits), T.Broadcast(floor, LANES)))
            inv, step = T.Broadcast(level, LANES) / peak, peak / T.Broadcast(level, LANES)
        else:
            inv, step = T.Broadcast(calibrated[0], LANES), T.Broadcast(calibrated[1], LANES)
        scaled = values * inv
        if not nonnegative:
            scaled = T.max(scaled, T.Broadcast(T.float32(-127.0), LANES))
        rounded = T.call_llvm_pure_intrin(f"int32x{LANES}", "llvm.x86.avx512.mask.cvtps2dq.512",
                                          T.min(scaled, T.Broadcast(level, LANES)), T.Broadcast(T.int32(0), LANES),
                                          T.int16(-1), T.int32(4))
        words = T.bind(T.reinterpret("int32x4", T.Cast(f"uint8x{LANES}", rounded + T.Broadcast(T.int32(128), LANES))))
        return words, T.bind(step)

    def rescale(acc, row_scale, out_scale, bias, block=0):
        """The integer layers' epilogue, (fp32(acc) * s_t) * 2^(c_o + p_min) + b_o, with lanes of 4 outputs per row
        (block None) or one output block of 16."""
        lanes_of = (lambda v: per_row(v[T.Ramp(0, 1, LANES)])) if block is None else (
            lambda v: v[T.Ramp(block * LANES, 1, LANES)])
        return (T.Cast(f"float32x{LANES}", acc) * row_scale) * lanes_of(out_scale) + lanes_of(bias)

    def rows_of_4_layer(words, row_scale, w, c, s, b):
        """A 4 -> (<= 4) integer layer on four rows at once: lane (r, o) sums row r's word times output o's four
        weights (one vpdpbusd), rescaled per row."""
        acc = vnni(per_row(c[T.Ramp(0, 1, LANES)]), pick(words, [k // 4 for k in range(LANES)], 4),
                   T.reinterpret("int8x64", per_row(T.reinterpret(f"int32x{LANES}", w[0, 0, T.Ramp(0, 1, 64)]))))
        return rescale(acc, row_scale, s, b, None)

    def channels_to_rows_of_4(xq, scale, k, w, c, s, b):
        """A C -> (<= 4) integer layer on the quantized rows 4k..4k+3 of xq [views padded to 4, C] at once: per input
        group g, lane (r, o) takes row r's word g (one permute of the four rows' words) times output o's weights."""
        words_per_row = channels // 4
        rows = [T.bind(T.reinterpret(f"int32x{LANES}", xq[4 * k + (LANES * j) // words_per_row,
                                                            T.Ramp(4 * ((LANES * j) % words_per_row), 1, 64)]))
                for j in range(words_per_row * 4 // LANES)]
        acc = per_row(c[T.Ramp(0, 1, LANES)])
        for g in range(words_per_row):
            act = pick(rows, [(k_ // 4) * words_per_row + g for k_ in range(LANES)])
            weight = T.reinterpret("int8x64", per_row(T.reinterpret(f"int32x{LANES}", w[0, g, T.Ramp(0, 1, 64)])))
            acc = T.bind(vnni(acc, act, weight))
        row_scale = pick(scale[T.Ramp(4 * k, 1, 4)], [k_ // 4 for k_ in range(LANES)], 4)
        return rescale(acc, row_scale, s, b, None)

    def row_to_channels(words, row_scale, r, w, c, s, b, store):
        """A (<= 4) -> C integer layer on row r of a rows-of-4 register: its word against each block of 16 outputs;
        store(block, value)."""
        act = pick(words, [r] * LANES, 4)
        scale_r = pick(row_scale, [4 * r] * LANES)
        for block in range(blocks):
            acc = vnni(c[T.Ramp(block * LANES, 1, LANES)], act, w[block, 0, T.Ramp(0, 1, 64)])
            store(block, rescale(acc, scale_r, s, b, block))

    def hoisted(steps, slot):
        """A per-tensor layer's (127 / absmax, absmax / 127) from the task's `steps` [2, layers] (None per token)."""
        return None if per_token else (steps[0, slot], steps[1, slot])

    def positions(t, ray_diff, pos, p1_w, p1_c, p1_s, p1_b, p2_w, p2_c, p2_s, p2_b, steps):
        """pos [V, C] = pos_fc2(relu(pos_fc1(ray_diff[t]))), four views per register up to the hidden units."""
        for k in range(groups):
            words, row_scale = quantize_rows_of_4(view_rows(t, ray_diff, k), False, hoisted(steps, _SLOT["pos1"]))
            hidden = T.bind(relu(rows_of_4_layer(words, row_scale, p1_w, p1_c, p1_s, p1_b)))
            words, row_scale = quantize_rows_of_4(hidden, True, hoisted(steps, _SLOT["pos2"]))
            for i in range(4 * k, min(4 * k + 4, views)):
                row_to_channels(words, row_scale, i - 4 * k, p2_w, p2_c, p2_s, p2_b,
                                lambda block, value, i=i: T.buffer_store(pos, value, [i, lanes(block * LANES)]))

    def attention_logits(t, xq, scale, mask, mixed, a1_w, a1_c, a1_s, a1_b, a2_w, a2_c, a2_s, a2_b, steps):
        """mixed[0, i] = attn_fc2(relu(attn_fc1(.))) of the quantized rows xq / scale, finfo.min where view i is
        invisible; four views per register up to the hidden units."""
        for k in range(groups):
            hidden = T.bind(relu(channels_to_rows_of_4(xq, scale, k, a1_w, a1_c, a1_s, a1_b)))
            words, row_scale = quantize_rows_of_4(hidden, True, hoisted(steps, _SLOT["attn2"]))
            for i in range(4 * k, min(4 * k + 4, views)):
                row_to_channels(words, row_scale, i - 4 * k, a2_w, a2_c, a2_s, a2_b,
                                lambda block, value, i=i: T.buffer_store(
                                    mixed, T.Select(T.Broadcast(mask[t, i], LANES) == T.Broadcast(
                                        T.float32(0), LANES), T.Broadcast(T.float32(lowest), LANES),
                                        value), [0, i, lanes(block * LANES)]))

    def keys_values(query, xq, scale, pos, mixed, vp, kv_w, kv_c, kv_s, kv_b):
        """k | v of the quantized views xq, 2 blocks of 16 outputs per pass over the 2C, each block consumed as it
        leaves the accumulators: mixed[0, i] = k_i - qp + pos_i, vp[i] = v_i + pos_i."""
        def store(i, block, value):
            if block < blocks:
                T.buffer_store(mixed, value - query(block) + pos[i, lanes(block * LANES)], [0, i, lanes(block * LANES)])
            else:
                T.buffer_store(vp, value + pos[i, lanes((block - blocks) * LANES)], [i, lanes((block - blocks) * LANES)])

        for p in range(blocks):
            parts.dot_products(xq, kv_w, kv_c, kv_s, kv_b, scale, p, channels, 2, store)

    @T.macro
    def attend(t, query, features, ray_diff, mask, xq, scale, vp, pos, mixed, kv_w, kv_c, kv_s, kv_b,
               p1_w, p1_c, p1_s, p1_b, p2_w, p2_c, p2_s, p2_b, a1_w, a1_c, a1_s, a1_b, a2_w, a2_c, a2_s, a2_b,
               steps, store):
        """Token t's attention between q_fc and out_fc; query(b): channels b*16.. of its projected query; the result
        goes to store(b, value)."""
        # pos = pos_fc2(relu(pos_fc1(ray_diff))), four views' 4-wide rows per register
        if "positions" not in leave_out:
            positions(t, ray_diff, pos, p1_w, p1_c, p1_s, p1_b, p2_w, p2_c, p2_s, p2_b, steps)
        # k | v, each block consumed as it leaves the accumulators: k - qp + pos into mixed, v + pos into vp
        if "keys_values" not in leave_out:
            parts.quantize(features, t, channels, xq, scale, per_token, None, calibrated=hoisted(steps, _SLOT["kv"]))
            keys_values(query, xq, scale, pos, mixed, vp, kv_w, kv_c, kv_s, kv_b)
        # logits = attn_fc2(relu(attn_fc1(k - qp + pos)))
        if "logits" not in leave_out:
            parts.quantize(mixed, 0, channels, xq, scale, per_token, None, calibrated=hoisted(steps, _SLOT["attn1"]))
            attention_logits(t, xq, scale, mask, mixed, a1_w, a1_c, a1_s, a1_b, a2_w, a2_c, a2_s, a2_b, steps)
        # softmax over the views per channel, weighted sum of v + pos
        for b in T.serial(blocks):
            if "softmax" in leave_out:
                store(b, mixed[0, 0, lanes(b * LANES)])
            else:
                softmax_and_sum(t, b, mixed, vp, mask, store)

    def query_layer(rows, first, x, normed, normed_rows, xq_rows, scale_rows, ln_w, ln_b, q_w, q_c, q_s, q_b, steps,
                    qp_store):
        """q_fc(LN(x)) of tokens first.. (rows: the _KernelParts of one or a group of tokens, each a register row;
        the LN in the kernel, or the caller's normed rows); qp_store(i, block, value)."""
        if eps is None:
            rows.quantize(_TokenRows(normed), first, channels, xq_rows, scale_rows, per_token, None,
                          calibrated=hoisted(steps, layer_count + _SUB_SLOT["q"]))
        else:
            rows.layer_norm(_TokenRows(x), first, normed_rows, ln_w, ln_b, eps)
            rows.quantize(normed_rows, 0, channels, xq_rows, scale_rows, per_token, None,
                          calibrated=hoisted(steps, layer_count + _SUB_SLOT["q"]))
        rows.dot_products(xq_rows, q_w, q_c, q_s, q_b, scale_rows, 0, channels, blocks, qp_store)

    def out_layer(rows, first, x, attended, xq_rows, scale_rows, o_w, o_c, o_s, o_b, steps, out):
        """out[first + i] = x[first + i] + out_fc(attended row i) for the group's tokens (attended: a _TokenRows)."""
        rows.quantize(attended, 0, channels, xq_rows, scale_rows, per_token, None,
                      calibrated=hoisted(steps, layer_count + _SUB_SLOT["out"]))
        rows.dot_products(xq_rows, o_w, o_c, o_s, o_b, scale_rows, 0, channels, blocks,
                          lambda i, block, value: T.buffer_store(
                              out, x[first + i, 0, lanes(block * LANES)] + value, [first + i, 0, lanes(block * LANES)]))

    def fill_steps(steps, act_absmax, sub_absmax):
        """Per tensor: steps[:, k] = (127 / absmax, absmax / 127) of the attention's layers, then q_fc's and out_fc's."""
        if not per_token:
            calibrated = [act_absmax[k] for k in range(layer_count)]
            calibrated += [sub_absmax[k] for k in range(2)] if sublayer else []
            for k, absmax in enumerate(calibrated):
                inv, step = parts.calibration(absmax)
                T.buffer_store(steps, inv, [0, k])
                T.buffer_store(steps, step, [1, k])

    @T.macro
    def token_loop(tokens, qp_in, x, normed, ln_w, ln_b, features, ray_diff, mask, kv_w, kv_c, kv_s, kv_b, p1_w,
                   p1_c, p1_s, p1_b, p2_w, p2_c, p2_s, p2_b, a1_w, a1_c, a1_s, a1_b, a2_w, a2_c, a2_s, a2_b, act_absmax,
                   q_w, q_c, q_s, q_b, o_w, o_c, o_s, o_b, sub_absmax, out):
        """Every token, 64 per parallel task, in groups of four; with `sublayer`, q_fc(LN(x)) of the group's tokens
        before their attention (in qp: four rows in one register-blocked product) and x + out_fc(attended) after (the
        same), else each token's projected query read from qp_in and its attention written to out. Per tensor, the
        layers' two divisions are done once per task (in steps)."""
        for task in T.parallel((tokens + _TASK - 1) // _TASK):
            xq = T.alloc_buffer((4 * groups, channels), "uint8", scope="local")  # rows padded to whole groups of 4
            scale = T.alloc_buffer((4 * groups,), "float32", scope="local")
            for i in T.serial(4 * groups - views):  # the padding rows stay zero
                scale[views + i] = T.float32(0)
                for j in T.serial(channels):
                    xq[views + i, j] = T.uint8(128)
            steps = T.alloc_buffer((2, layer_count + 2), "float32", scope="local")
            fill_steps(steps, act_absmax, sub_absmax)
            pos = T.alloc_buffer((views, channels), "float32", scope="local")
            vp = T.alloc_buffer((views, channels), "float32", scope="local")  # v + pos
            mixed = T.alloc_buffer((1, views, channels), "float32", scope="local")  # k - qp + pos, then logits
            normed_rows = T.alloc_buffer((1, _GROUP, channels), "float32", scope="local")
            xq_rows = T.alloc_buffer((_GROUP, channels), "uint8", scope="local")
            scale_rows = T.alloc_buffer((_GROUP,), "float32", scope="local")
            qp = T.alloc_buffer((_GROUP, channels), "float32", scope="local")
            attended = T.alloc_buffer((1, _GROUP, channels), "float32", scope="local")
            for group in T.serial(_TASK // _GROUP):
                first = task * _TASK + group * _GROUP
                if first < tokens:
                    if sublayer and "q_fc" not in leave_out:
                        if first + _GROUP <= tokens:
                            query_layer(quad, first, x, normed, normed_rows, xq_rows, scale_rows, ln_w, ln_b, q_w,
                                        q_c, q_s, q_b, steps, lambda i, block, value: T.buffer_store(
                                            qp, value, [i, lanes(block * LANES)]))
                        else:
                            for j in T.serial(tokens - first):
                                query_layer(row, first + j, x, normed, normed_rows, xq_rows, scale_rows, ln_w, ln_b,
                                            q_w, q_c, q_s, q_b, steps, lambda i, block, value: T.buffer_store(
                                                qp, value, [j, lanes(block * LANES)]))
                    for j in T.serial(T.min(_GROUP, tokens - first)):
                        attend(first + j, (lambda b: qp[j, lanes(b * LANES)]) if sublayer else (
                            lambda b: qp_in[first + j, lanes(b * LANES)]), features, ray_diff, mask, xq, scale,
                               vp, pos, mixed, kv_w, kv_c, kv_s, kv_b, p1_w, p1_c, p1_s, p1_b, p2_w, p2_c,
                               p2_s, p2_b, a1_w, a1_c, a1_s, a1_b, a2_w, a2_c, a2_s, a2_b, steps,
                               (lambda b, value: T.buffer_store(attended, value, [0, j, lanes(b * LANES)])) if sublayer
                               else (lambda b, value: T.buffer_store(out, value, [first + j, lanes(b * LANES)])))
                    if sublayer and "out_fc" not in leave_out:
                        if first + _GROUP <= tokens:
                            out_layer(quad, first, x, attended, xq_rows, scale_rows, o_w, o_c, o_s, o_b, steps, out)
                        else:
                            for j in T.serial(tokens - first):
                                out_layer(row, first + j, x, _TokenRows(attended, 1, j), xq_rows, scale_rows,
                                          o_w, o_c, o_s, o_b, steps, out)

    if not sublayer:
        @T.prim_func
        def main(qp_h: T.handle, feat_h: T.handle, diff_h: T.handle, mask_h: T.handle,
                 kv_w: T.Buffer(kv_p, "int8"), kv_c: T.Buffer(kv_o, "int32"), kv_s: T.Buffer(kv_o, "float32"),
                 kv_b: T.Buffer(kv_o, "float32"),
                 p1_w: T.Buffer(p1_p, "int8"), p1_c: T.Buffer(p1_o, "int32"), p1_s: T.Buffer(p1_o, "float32"),
                 p1_b: T.Buffer(p1_o, "float32"),
                 p2_w: T.Buffer(p2_p, "int8"), p2_c: T.Buffer(p2_o, "int32"), p2_s: T.Buffer(p2_o, "float32"),
                 p2_b: T.Buffer(p2_o, "float32"),
                 a1_w: T.Buffer(a1_p, "int8"), a1_c: T.Buffer(a1_o, "int32"), a1_s: T.Buffer(a1_o, "float32"),
                 a1_b: T.Buffer(a1_o, "float32"),
                 a2_w: T.Buffer(a2_p, "int8"), a2_c: T.Buffer(a2_o, "int32"), a2_s: T.Buffer(a2_o, "float32"),
                 a2_b: T.Buffer(a2_o, "float32"), act_absmax: T.Buffer((layer_count,), "float32"), out_h: T.handle):
            T.func_attr({"global_symbol": "main", "tir.noalias": True})
            tokens = T.int32()
            qp = T.match_buffer(qp_h, (tokens, channels), "float32")
            features = T.match_buffer(feat_h, (tokens, views, channels), "float32")
            ray_diff = T.match_buffer(diff_h, (tokens, views * _RAY_DIFF_DIM), "float32")
            mask = T.match_buffer(mask_h, (tokens, views), "float32")
            out = T.match_buffer(out_h, (tokens, channels), "float32")
            token_loop(tokens, qp, None, None, None, None, features, ray_diff, mask, kv_w, kv_c, kv_s, kv_b, p1_w,
                       p1_c, p1_s, p1_b, p2_w, p2_c, p2_s, p2_b, a1_w, a1_c, a1_s, a1_b, a2_w, a2_c, a2_s, a2_b,
                       act_absmax, None, None, None, None, None, None, None, None, None, out)
        return tvm.IRModule({"main": main})

    @T.prim_func
    def main(first_h: T.handle, second_h: T.handle, ln_w: T.Buffer((channels,), "float32"),
             ln_b: T.Buffer((channels,), "float32"), feat_h: T.handle, diff_h: T.handle, mask_h: T.handle,
             kv_w: T.Buffer(kv_p, "int8"), kv_c: T.Buffer(kv_o, "int32"), kv_s: T.Buffer(kv_o, "float32"),
             kv_b: T.Buffer(kv_o, "float32"),
             p1_w: T.Buffer(p1_p, "int8"), p1_c: T.Buffer(p1_o, "int32"), p1_s: T.Buffer(p1_o, "float32"),
             p1_b: T.Buffer(p1_o, "float32"),
             p2_w: T.Buffer(p2_p, "int8"), p2_c: T.Buffer(p2_o, "int32"), p2_s: T.Buffer(p2_o, "float32"),
             p2_b: T.Buffer(p2_o, "float32"),
             a1_w: T.Buffer(a1_p, "int8"), a1_c: T.Buffer(a1_o, "int32"), a1_s: T.Buffer(a1_o, "float32"),
             a1_b: T.Buffer(a1_o, "float32"),
             a2_w: T.Buffer(a2_p, "int8"), a2_c: T.Buffer(a2_o, "int32"), a2_s: T.Buffer(a2_o, "float32"),
             a2_b: T.Buffer(a2_o, "float32"), act_absmax: T.Buffer((layer_count,), "float32"),
             q_w: T.Buffer(c_p, "int8"), q_c: T.Buffer(c_o, "int32"), q_s: T.Buffer(c_o, "float32"),
             q_b: T.Buffer(c_o, "float32"),
             o_w: T.Buffer(c_p, "int8"), o_c: T.Buffer(c_o, "int32"), o_s: T.Buffer(c_o, "float32"),
             o_b: T.Buffer(c_o, "float32"), sub_absmax: T.Buffer((2,), "float32"), out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        tokens = T.int32()
        normed = T.match_buffer(first_h, (tokens, 1, channels), "float32")  # = x when the LN is in the kernel
        x = T.match_buffer(second_h, (tokens, 1, channels), "float32")
        features = T.match_buffer(feat_h, (tokens, views, channels), "float32")
        ray_diff = T.match_buffer(diff_h, (tokens, views * _RAY_DIFF_DIM), "float32")
        mask = T.match_buffer(mask_h, (tokens, views), "float32")
        out = T.match_buffer(out_h, (tokens, 1, channels), "float32")
        token_loop(tokens, None, x, normed, ln_w, ln_b, features, ray_diff, mask, kv_w, kv_c, kv_s, kv_b, p1_w, p1_c,
                   p1_s, p1_b, p2_w, p2_c, p2_s, p2_b, a1_w, a1_c, a1_s, a1_b, a2_w, a2_c, a2_s, a2_b, act_absmax, q_w,
                   q_c, q_s, q_b, o_w, o_c, o_s, o_b, sub_absmax, out)

    return tvm.IRModule({"main": main})


def int_view_attention(qp: torch.Tensor, features: torch.Tensor, ray_diff: torch.Tensor, mask: torch.Tensor,
                       w: IntViewWeights) -> torch.Tensor:
    """qp [N, C], features [N, V, C], ray_diff [N, V, 4], mask [N, V] (CPU) -> [N, C] fp32 on the VNNI kernel; the
    reference (one warning) where this CPU has no AVX-512 VNNI or no kernel builds."""
    tokens, views, channels = features.shape
    if tuple(qp.shape) != (tokens, channels) or tuple(ray_diff.shape) != (tokens, views, 4) \
            or tuple(mask.shape) != (tokens, views) or channels != w.channels:
        raise ValueError(f"int_view_attention: expected qp [{tokens}, {w.channels}], features [N, V, {w.channels}], "
                         f"ray_diff [N, V, 4], mask [N, V]; got {tuple(qp.shape)}, {tuple(features.shape)}, "
                         f"{tuple(ray_diff.shape)}, {tuple(mask.shape)}")
    kernel = None
    if vnni_available():
        kernel = get_kernel("int_view_attention", {"views": views, "channels": channels, "per_token": w.per_token},
                            features.device, lambda _: make_int_view_attention(views, channels,
                                                                               per_token=w.per_token))
    else:
        note_kernel("int_view_attention", "reference")
    if kernel is None:
        return reference_int_view_attention(qp, features, ray_diff, mask, w)
    out = torch.empty(tokens, channels, dtype=torch.float32)
    if tokens:
        ready = lambda t: kernel_ready(t, torch.float32)  # noqa: E731
        kernel(ready(qp), ready(features), ready(ray_diff).view(tokens, -1), ready(mask), *w.tensors(), out)
    return out


def int_view_sublayer(x: torch.Tensor, features: torch.Tensor, ray_diff: torch.Tensor, mask: torch.Tensor,
                      w: IntViewWeights, sub: IntViewSublayerWeights, norm_in_kernel: bool = True) -> torch.Tensor:
    """x [N, C], features [N, V, C], ray_diff [N, V, 4], mask [N, V] (CPU) -> x + out_fc(attention(q_fc(LN(x))))
    fp32 [N, C] on one VNNI kernel; norm_in_kernel=False takes the LN from PyTorch. The reference (one note) where
    this CPU has no AVX-512 VNNI or no kernel builds. q_fc is bit-exact given the same normed input; out_fc's input
    comes from the kernel's softmax, so a value within rounding of a .5 step may quantize one step apart."""
    tokens, views, channels = features.shape
    check_one_mode(w, sub)
    if tuple(x.shape) != (tokens, channels) or tuple(ray_diff.shape) != (tokens, views, 4) \
            or tuple(mask.shape) != (tokens, views) or channels != w.channels:
        raise ValueError(f"int_view_sublayer: expected x [{tokens}, {w.channels}], features [N, V, {w.channels}], "
                         f"ray_diff [N, V, 4], mask [N, V]; got {tuple(x.shape)}, {tuple(features.shape)}, "
                         f"{tuple(ray_diff.shape)}, {tuple(mask.shape)}")
    kernel = None
    eps = sub.eps if norm_in_kernel else None
    if vnni_available():
        kernel = get_kernel("int_view_sublayer", {"views": views, "channels": channels, "eps": eps,
                                                  "per_token": w.per_token}, features.device,
                            lambda _: make_int_view_attention(views, channels, sublayer=True, eps=eps,
                                                              per_token=w.per_token))
    else:
        note_kernel("int_view_sublayer", "reference")
    if kernel is None:
        return reference_int_view_sublayer(x, features, ray_diff, mask, w, sub)
    out = torch.empty(tokens, 1, channels, dtype=torch.float32)
    if tokens:
        ready = lambda t: kernel_ready(t, torch.float32)  # noqa: E731
        rows = ready(x).view(tokens, 1, channels)
        first = rows if norm_in_kernel else ready(F.layer_norm(x.float(), (channels,), sub.ln_w, sub.ln_b,
                                                               sub.eps)).view(tokens, 1, channels)
        kernel(first, rows, sub.ln_w, sub.ln_b, ready(features), ready(ray_diff).view(tokens, -1), ready(mask), *w.tensors(),
               *sub.tensors()[2:], out)
    return out.view(tokens, channels)
