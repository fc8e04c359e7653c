"""One fused TVM kernel for GNT's view attention (the per-(token, view) part of a view-transformer layer).

GNT spends most of its time on work done once per token and source view: tokens = rays x samples (tens of
thousands per chunk), V = 6..10 views, C = netwidth channels. `ViewAttention.forward` in PyTorch materializes
about ten [tokens, V, C] tensors; this kernel computes everything from the projected query to the attention
output without any of them reaching main memory (CPU: token by token in L1-sized buffers; CUDA: per tile in
shared memory):

    k, v   = features @ Wk^T, features @ Wv^T                            [T, V, C]
    pos    = relu(ray_diff @ Wp1^T + bp1) @ Wp2^T + bp2                   [T, V, C]
    logits = relu((k - qp + pos) @ Wa1^T + ba1) @ Wa2^T + ba2              [T, V, C]
    w      = softmax_V(logits with invisible views at finfo.min) * mask   [T, V, C]
    out    = sum_V w * (v + pos)                                         [T, C] (0 for a token no view sees)

qp = q_fc(LayerNorm(q)) comes in precomputed; out_fc and the residual are applied by the caller. ShiftAdd
variants pass their decoded shift weights (exact +-2^k in fp32), so the kernel is the same for both.

Kernel layout: tokens are grouped in tiles (`kernel_tile`: 16 on CPU); the number of tiles NT is a symbolic
leading dimension, so one build serves every chunk size (qp [NT, tile, C], features [NT, tile, V, C], ...; NT is
never split, which TVM 0.27 cannot compile for symbolic extents). The wrapper `view_attention` follows the
facade's tail rule (kernels.dispatch.run_tiled): the tile-aligned prefix runs in place, the last partial tile
padded with tokens no view sees.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, linear_weight, needs_grad, note_kernel, run_tiled
from kernels.te_math import register_blocked, vector_exp, vector_lanes

__all__ = ["WEIGHT_KEYS", "TILE", "SublayerWeights", "reference_view_attention_sublayer",
           "make_view_attention_sublayer", "view_attention_sublayer", "reference_view_attention", "view_attention_weights", "PreparedViewWeights",
           "kernel_tile", "make_view_attention", "view_attention_kernel", "view_attention"]

WEIGHT_KEYS = ("k", "v", "pos1_w", "pos1_b", "pos2_w", "pos2_b", "attn1_w", "attn1_b", "attn2_w", "attn2_b")
TILE = 16  # tokens per tile: the parallel (CPU) / thread-block (CUDA) unit; padding wastes < TILE tokens per call
_RAY_DIFF_DIM = 4


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------------

def reference_view_attention(qp: torch.Tensor, features: torch.Tensor, ray_diff: torch.Tensor, mask: torch.Tensor,
                             weights: dict) -> torch.Tensor:
    """ViewAttention.forward (eval mode) after q_fc and before out_fc: the ground truth and fallback.

    qp [..., C], features [..., V, C], ray_diff [..., V, 4], mask [..., V] (or [..., V, 1]; 1 = visible)
    -> [..., C]. `weights` holds the keys of WEIGHT_KEYS (nn.Linear layout: weight [out, in], bias [out]).
    """
    if mask.dim() == features.dim():
        mask = mask.squeeze(-1)
    mask = mask.to(features.dtype)[..., None]  # [..., V, 1]
    k = F.linear(features, weights["k"])
    v = F.linear(features, weights["v"])
    pos = F.linear(F.relu(F.linear(ray_diff, weights["pos1_w"], weights["pos1_b"])),
                   weights["pos2_w"], weights["pos2_b"])
    hidden = F.relu(F.linear(k - qp[..., None, :] + pos, weights["attn1_w"], weights["attn1_b"]))
    logits = F.linear(hidden, weights["attn2_w"], weights["attn2_b"])
    logits = logits.masked_fill(mask == 0, torch.finfo(logits.dtype).min)
    attention = torch.softmax(logits, dim=-2) * mask
    return ((v + pos) * attention).sum(dim=-2)


def view_attention_weights(module: nn.Module) -> dict:
    """The weights of a ViewAttention (nn.Linear or ShiftLinear layers) as the dict the kernels take (detached,
    sharing storage with the module). ValueError for a ShiftLinear with fixed-point activations."""
    def bias(layer: nn.Module) -> torch.Tensor:
        if layer.bias is None:
            return torch.zeros(layer.out_features, device=linear_weight(layer).device)
        return layer.bias.detach()

    return {
        "k": linear_weight(module.k_fc), "v": linear_weight(module.v_fc),
        "pos1_w": linear_weight(module.pos_fc1), "pos1_b": bias(module.pos_fc1),
        "pos2_w": linear_weight(module.pos_fc2), "pos2_b": bias(module.pos_fc2),
        "attn1_w": linear_weight(module.attn_fc1), "attn1_b": bias(module.attn_fc1),
        "attn2_w": linear_weight(module.attn_fc2), "attn2_b": bias(module.attn_fc2),
    }


# ----------------------------------------------------------------------------------------------------------------
# Kernel weights
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PreparedViewWeights:
    """The weights in the kernel's layout, built once per module and device (contiguous fp32, transposed [in, out]).

    kv_t [C, 2C] = [Wk; Wv]^T (one product serves k and v), pos1_t [4, h], pos2_t [h, C], attn1_t [C, h],
    attn2_t [h, C]; biases pos1_b [h], pos2_b [C], attn1_b [h], attn2_b [C]. `source` keeps the dict (nn.Linear
    layout) for the reference path. Build it again after changing the module's weights.
    """

    kv_t: torch.Tensor
    pos1_t: torch.Tensor
    pos1_b: torch.Tensor
    pos2_t: torch.Tensor
    pos2_b: torch.Tensor
    attn1_t: torch.Tensor
    attn1_b: torch.Tensor
    attn2_t: torch.Tensor
    attn2_b: torch.Tensor
    source: dict

    @property
    def channels(self) -> int:
        return self.kv_t.shape[0]

    @property
    def hidden(self) -> int:
        return self.attn1_t.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_t.device

    @classmethod
    def from_dict(cls, weights: dict, device: torch.device | str | None = None) -> "PreparedViewWeights":
        missing = [key for key in WEIGHT_KEYS if key not in weights]
        if missing:
            raise ValueError(f"view attention weights are missing {missing} (expected keys {WEIGHT_KEYS})")
        device = torch.device(device) if device is not None else weights["k"].device
        # a snapshot: later updates of the module's parameters do not leak into half of the prepared weights
        source = {key: weights[key].detach().to(device=device, dtype=torch.float32).clone() for key in WEIGHT_KEYS}
        _check_weight_shapes(source)
        layout = _kernel_ready
        return cls(kv_t=layout(torch.cat([source["k"], source["v"]], dim=0).t()),
                   pos1_t=layout(source["pos1_w"].t()), pos1_b=layout(source["pos1_b"]),
                   pos2_t=layout(source["pos2_w"].t()), pos2_b=layout(source["pos2_b"]),
                   attn1_t=layout(source["attn1_w"].t()), attn1_b=layout(source["attn1_b"]),
                   attn2_t=layout(source["attn2_w"].t()), attn2_b=layout(source["attn2_b"]),
                   source=source)

    @classmethod
    def from_kernel_arguments(cls, kv_t, pos1_t, pos1_b, pos2_t, pos2_b, attn1_t, attn1_b, attn2_t,
                              attn2_b) -> "PreparedViewWeights":
        """Inverse of `kernel_arguments` (what the custom op receives): no copies; `source` holds views."""
        channels = kv_t.shape[0]
        if kv_t.dim() != 2 or kv_t.shape[1] != 2 * channels:
            raise ValueError(f"kv_t must be [C, 2C], got {tuple(kv_t.shape)}")
        source = {"k": kv_t[:, :channels].t(), "v": kv_t[:, channels:].t(), "pos1_w": pos1_t.t(), "pos1_b": pos1_b,
                  "pos2_w": pos2_t.t(), "pos2_b": pos2_b, "attn1_w": attn1_t.t(), "attn1_b": attn1_b,
                  "attn2_w": attn2_t.t(), "attn2_b": attn2_b}
        _check_weight_shapes(source)
        layout = _kernel_ready
        return cls(kv_t=layout(kv_t), pos1_t=layout(pos1_t), pos1_b=layout(pos1_b), pos2_t=layout(pos2_t),
                   pos2_b=layout(pos2_b), attn1_t=layout(attn1_t), attn1_b=layout(attn1_b), attn2_t=layout(attn2_t),
                   attn2_b=layout(attn2_b), source=source)

    def to(self, device: torch.device | str) -> "PreparedViewWeights":
        return self if torch.device(device) == self.device else PreparedViewWeights.from_dict(self.source, device)

    def kernel_arguments(self) -> tuple[torch.Tensor, ...]:
        return (self.kv_t, self.pos1_t, self.pos1_b, self.pos2_t, self.pos2_b,
                self.attn1_t, self.attn1_b, self.attn2_t, self.attn2_b)


def _check_weight_shapes(weights: dict) -> None:
    channels = weights["k"].shape[0]
    hidden = weights["pos1_w"].shape[0]
    expected = {"k": (channels, channels), "v": (channels, channels),
                "pos1_w": (hidden, _RAY_DIFF_DIM), "pos1_b": (hidden,), "pos2_w": (channels, hidden),
                "pos2_b": (channels,), "attn1_w": (hidden, channels), "attn1_b": (hidden,),
                "attn2_w": (channels, hidden), "attn2_b": (channels,)}
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise ValueError(f"view attention weight {key!r} has shape {tuple(weights[key].shape)}, expected {shape} "
                             f"(channels={channels}, hidden={hidden})")


# ----------------------------------------------------------------------------------------------------------------
# TVM kernel
# ----------------------------------------------------------------------------------------------------------------

def _view_attention_compute(views: int, channels: int, hidden: int, tile: int, fast_exp: bool, kv_input: bool = False,
                            sublayer_eps: float | None = None, split_kv: bool = True):
    """TE definition; returns the arguments in call order (output last). Shapes in the module docstring.
    kv_input: k|v [NT, tile, V, 2C] comes in precomputed in place of kv_t (a profiling build: what the kernel costs
    without its k|v product, `benchmarks/int_shift_options.py --sections view_attention`).
    sublayer_eps: the whole pre-norm sublayer x + out_fc(attention(q_fc(LN(x)))): x [NT, tile, C] comes in place of
    qp and ln_w, ln_b [C], q_t, out_t [C, C], out_b [C] follow the other weights (SUBLAYER_KEYS).
    split_kv: k and v as two products (CPU); else one k|v product whose halves the schedule inlines (CUDA)."""
    from tvm import te, tirx  # lazy: TVM is optional (the references run without it)

    exp = vector_exp if fast_exp else tirx.exp
    num_tiles = te.var("num_tiles")
    if sublayer_eps is None:
        qp = te.placeholder((num_tiles, tile, channels), name="qp")
    else:
        x = te.placeholder((num_tiles, tile, channels), name="x")
        ln_w, ln_b = te.placeholder((channels,), name="ln_w"), te.placeholder((channels,), name="ln_b")
        q_t = te.placeholder((channels, channels), name="q_t")
        c_mean, c_var, c_q = (te.reduce_axis((0, channels), name=n) for n in ("c_mean", "c_var", "c_q"))
        # the sums are scaled once by 1/C (a power of two at the model's widths: the same values as summing x / C)
        inv_channels = tirx.const(1.0 / channels, "float32")
        total = te.compute((num_tiles, tile), lambda n, t: te.sum(x[n, t, c_mean], axis=c_mean), name="mean")
        squares = te.compute((num_tiles, tile), lambda n, t: te.sum(
            (x[n, t, c_var] - total[n, t] * inv_channels) * (x[n, t, c_var] - total[n, t] * inv_channels),
            axis=c_var), name="var")
        rstd = te.compute((num_tiles, tile), lambda n, t: tirx.rsqrt(
            squares[n, t] * inv_channels + tirx.const(sublayer_eps, "float32")), name="rstd")
        xn = te.compute((num_tiles, tile, channels), lambda n, t, c: (x[n, t, c] - total[n, t] * inv_channels)
                        * rstd[n, t] * ln_w[c] + ln_b[c], name="xn")
        qp = te.compute((num_tiles, tile, channels), lambda n, t, o: te.sum(xn[n, t, c_q] * q_t[c_q, o], axis=c_q),
                        name="qp")
    features = te.placeholder((num_tiles, tile, views, channels), name="features")
    ray_diff = te.placeholder((num_tiles, tile, views, _RAY_DIFF_DIM), name="ray_diff")
    mask = te.placeholder((num_tiles, tile, views), name="mask")
    kv_t = te.placeholder((channels, 2 * channels), name="kv_t")
    pos1_t = te.placeholder((_RAY_DIFF_DIM, hidden), name="pos1_t")
    pos1_b = te.placeholder((hidden,), name="pos1_b")
    pos2_t = te.placeholder((hidden, channels), name="pos2_t")
    pos2_b = te.placeholder((channels,), name="pos2_b")
    attn1_t = te.placeholder((channels, hidden), name="attn1_t")
    attn1_b = te.placeholder((hidden,), name="attn1_b")
    attn2_t = te.placeholder((hidden, channels), name="attn2_t")
    attn2_b = te.placeholder((channels,), name="attn2_b")
    zero = tirx.const(0.0, "float32")
    lowest = tirx.const(float(torch.finfo(torch.float32).min), "float32")

    if kv_input:
        kv = te.placeholder((num_tiles, tile, views, 2 * channels), name="kv")
    elif not split_kv:
        j = te.reduce_axis((0, channels), name="j")
        kv = te.compute((num_tiles, tile, views, 2 * channels),
                        lambda n, t, v, o: te.sum(features[n, t, v, j] * kv_t[j, o], axis=j), name="kv")
    if kv_input or not split_kv:  # views of one k|v tensor (the schedules inline them)
        keys = te.compute((num_tiles, tile, views, channels), lambda n, t, v, c: kv[n, t, v, c], name="k")
        values = te.compute((num_tiles, tile, views, channels), lambda n, t, v, c: kv[n, t, v, channels + c], name="v")
    else:
        # CPU: k and v as two products; per token each is a [V, C] buffer small enough (< 1 KB) to live on the
        # stack, where LLVM keeps it in registers; one [V, 2C] buffer went to TVM's workspace
        j_k, j_v = te.reduce_axis((0, channels), name="j_k"), te.reduce_axis((0, channels), name="j_v")
        keys = te.compute((num_tiles, tile, views, channels),
                          lambda n, t, v, o: te.sum(features[n, t, v, j_k] * kv_t[j_k, o], axis=j_k), name="k")
        values = te.compute((num_tiles, tile, views, channels), lambda n, t, v, o: te.sum(
            features[n, t, v, j_v] * kv_t[j_v, channels + o], axis=j_v), name="v")
    pos_hidden = te.compute(
        (num_tiles, tile, views, hidden),
        lambda n, t, v, h: te.max(pos1_b[h] + sum(ray_diff[n, t, v, i] * pos1_t[i, h] for i in range(_RAY_DIFF_DIM)),
                                  zero), name="pos_hidden")
    pos = te.compute((num_tiles, tile, views, channels),
                     lambda n, t, v, c: pos2_b[c] + sum(pos_hidden[n, t, v, h] * pos2_t[h, c] for h in range(hidden)),
                     name="pos")
    attn_in = te.compute((num_tiles, tile, views, channels),
                         lambda n, t, v, c: keys[n, t, v, c] - qp[n, t, c] + pos[n, t, v, c], name="attn_in")
    c_in = te.reduce_axis((0, channels), name="c_in")
    attn_pre = te.compute(
        (num_tiles, tile, views, hidden),
        lambda n, t, v, h: te.sum(attn_in[n, t, v, c_in] * attn1_t[c_in, h], axis=c_in), name="attn_pre")
    attn_hidden = te.compute((num_tiles, tile, views, hidden),
                             lambda n, t, v, h: te.max(attn_pre[n, t, v, h] + attn1_b[h], zero), name="attn_hidden")
    logits = te.compute(
        (num_tiles, tile, views, channels),
        lambda n, t, v, c: tirx.if_then_else(
            mask[n, t, v] == zero, lowest,
            attn2_b[c] + sum(attn_hidden[n, t, v, h] * attn2_t[h, c] for h in range(hidden))), name="logits")

    def over_views(combine, term):
        value = term(0)
        for view in range(1, views):
            value = combine(value, term(view))
        return value

    peak = te.compute((num_tiles, tile, channels),
                      lambda n, t, c: over_views(te.max, lambda view: logits[n, t, view, c]), name="peak")
    exps = te.compute((num_tiles, tile, views, channels),
                      lambda n, t, v, c: exp(logits[n, t, v, c] - peak[n, t, c]), name="exps")
    # denominator >= 1 (the peak view contributes exp(0)), so a token no view sees gets 0 * mask = 0, never NaN
    denominator = te.compute((num_tiles, tile, channels),
                             lambda n, t, c: over_views(lambda a, b: a + b, lambda view: exps[n, t, view, c]),
                             name="denominator")
    out = te.compute(
        (num_tiles, tile, channels),
        lambda n, t, c: over_views(
            lambda a, b: a + b,
            lambda view: exps[n, t, view, c] / denominator[n, t, c] * mask[n, t, view]
            * (values[n, t, view, c] + pos[n, t, view, c])), name="out")
    if sublayer_eps is not None:
        out_t, out_b = te.placeholder((channels, channels), name="out_t"), te.placeholder((channels,), name="out_b")
        c_out = te.reduce_axis((0, channels), name="c_out")
        projected = te.compute((num_tiles, tile, channels), lambda n, t, o: te.sum(out[n, t, c_out] * out_t[c_out, o],
                                                                                   axis=c_out), name="projected")
        result = te.compute((num_tiles, tile, channels), lambda n, t, c: x[n, t, c] + out_b[c] + projected[n, t, c],
                            name="result")
        return [x, features, ray_diff, mask, kv_t, pos1_t, pos1_b, pos2_t, pos2_b, attn1_t, attn1_b, attn2_t, attn2_b,
                ln_w, ln_b, q_t, out_t, out_b, result]
    arguments = [qp, features, ray_diff, mask, kv if kv_input else kv_t, pos1_t, pos1_b, pos2_t, pos2_b, attn1_t,
                 attn1_b, attn2_t, attn2_b, out]
    return arguments




# Stages that depend on the whole [V, C] slab of one token, consumers first (the order compute_at needs).
_PER_TOKEN_STAGES = ("denominator", "exps", "peak", "logits", "attn_hidden", "attn_pre", "attn_in", "pos",
                     "pos_hidden", "k", "v")


def _schedule_cpu(sch, channels: int, kv_input: bool = False, sublayer: bool = False) -> None:
    """Parallel over tiles, then token by token: each token's [V, C] stages live in small L1-resident buffers.

    The k|v product keeps one 16-channel output chunk of all V views in registers while it runs over the input
    channels (features broadcast from memory); channel loops are vectorized, the small hidden-size loops unrolled.
    sublayer: LN and q_fc per token before the attention, out_fc (register-blocked over the tile) and the residual
    after it.
    """
    if sublayer:
        n, token = _schedule_sublayer_cpu(sch, channels)
    else:
        n, token, channel = sch.get_loops(sch.get_sblock("out"))
        sch.parallel(n)
        sch.vectorize(channel)
    for name in _PER_TOKEN_STAGES:
        block = sch.get_sblock(name)
        if kv_input and name in ("k", "v"):  # views of the k|v input: read in place
            sch.compute_inline(block)
            continue
        sch.compute_at(block, token, preserve_unit_loops=True)
    if sublayer:
        _schedule_sublayer_inputs_cpu(sch, token, channels)
    for name in ("denominator", "peak", "exps", "logits", "attn_in", "pos"):
        sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])  # over channels
    for name in ("pos_hidden", "attn_hidden"):
        sch.unroll(sch.get_loops(sch.get_sblock(name))[-1])  # over hidden

    if not kv_input:
        register_blocked(sch, "k", channels)
        register_blocked(sch, "v", channels)

    attn_pre = sch.get_sblock("attn_pre")
    view, unit, c_in = sch.get_loops(attn_pre)[-3:]
    sch.reorder(c_in, view, unit)
    sch.unroll(view)
    sch.vectorize(unit)
    sch.decompose_reduction(attn_pre, c_in)


def _schedule_sublayer_cpu(sch, channels: int):
    """The sublayer's output side (out_fc and the residual) over the whole tile of tokens: the [tile, C] x [C, C]
    product register-blocked (every token's accumulator in a register, each weight vector loaded once per tile).
    Returns the tile loop and the token loop of the attention itself ("out"), under which the per-token stages go."""
    result = sch.get_sblock("result")
    n, _, channel = sch.get_loops(result)
    sch.parallel(n)
    sch.vectorize(channel)
    for name in ("projected", "out"):  # consumers first
        sch.compute_at(sch.get_sblock(name), n, preserve_unit_loops=True)
    register_blocked(sch, "projected", channels)
    token, channel = sch.get_loops(sch.get_sblock("out"))[-2:]
    sch.vectorize(channel)
    return n, token


def _schedule_sublayer_inputs_cpu(sch, token, channels: int) -> None:
    """The sublayer's input side (LN, q_fc) token by token under the attention's token loop, so its buffers are
    small enough for the stack: q_fc as 32 broadcast-and-FMA steps over vector outputs, the LN's sums as vector
    partial sums (rfactor over 16-channel lanes) and 16 scalar adds."""
    lanes = vector_lanes(channels)
    for name in ("mean", "var"):  # (before they move) the sum over channels as per-lane partial sums
        _, c_lane = sch.split(sch.get_loops(sch.get_sblock(name))[-1], factors=[None, lanes])
        sch.rfactor(c_lane, factor_axis=2)
    for name in ("qp", "xn", "rstd", "var", "var_rf", "mean", "mean_rf"):  # consumers first
        sch.compute_at(sch.get_sblock(name), token, preserve_unit_loops=True)
    qp = sch.get_sblock("qp")
    unit, red = sch.get_loops(qp)[-2:]
    sch.reorder(red, unit)
    sch.vectorize(unit)
    sch.decompose_reduction(qp, red)
    sch.vectorize(sch.get_loops(sch.get_sblock("xn"))[-1])
    for name in ("mean_rf", "var_rf"):
        partial = sch.get_sblock(name)
        *_, lane, chunk = sch.get_loops(partial)
        sch.reorder(chunk, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(partial, chunk)


def _schedule_cuda(sch, threads: int) -> None:
    """One thread block per tile; each stage spreads its (token, view, channel) outputs over the block's threads.

    [tile, V, C] intermediates live in shared memory (TVM inserts the barriers between stages; reductions
    accumulate in a register and store once); each output thread computes its (token, channel) softmax max and
    denominator in registers.
    """
    out = sch.get_sblock("out")
    n, token, channel = sch.get_loops(out)
    sch.bind(n, "blockIdx.x")
    _, lane = sch.split(sch.fuse(token, channel), factors=[None, threads])
    sch.bind(lane, "threadIdx.x")
    sch.compute_inline(sch.get_sblock("exps"))
    sch.compute_inline(sch.get_sblock("attn_in"))
    for name in ("k", "v"):  # views of the one k|v product
        sch.compute_inline(sch.get_sblock(name))
    for name in ("denominator", "peak"):
        sch.compute_at(sch.get_sblock(name), lane)
        sch.set_scope(sch.get_sblock(name), 0, "local")
    for name, reduces in (("logits", False), ("attn_hidden", False), ("attn_pre", True), ("pos", False),
                          ("pos_hidden", False), ("kv", True)):
        block = sch.get_sblock(name)
        stage = sch.cache_write(block, 0, "local") if reduces else block
        sch.compute_at(stage, n)
        sch.set_scope(stage, 0, "shared")
        _, lane = sch.split(sch.fuse(*sch.get_loops(stage)[1:]), factors=[None, threads])
        sch.bind(lane, "threadIdx.x")
        if reduces:
            sch.compute_at(block, lane)


CUDA_THREADS = 128
_CUDA_SHARED_BYTES = 40 * 1024  # under the 48 KiB of static shared memory per block


def kernel_tile(target_kind: str, views: int, channels: int) -> int:
    """Tokens per tile: TILE on CPU; on CUDA the largest power of two <= 16 whose shared intermediates fit."""
    if target_kind != "cuda":
        return TILE
    per_token_bytes = 4 * views * 4 * channels  # kv [V, 2C], pos [V, C], logits [V, C] in fp32
    tile = 16
    while tile > 1 and tile * per_token_bytes > _CUDA_SHARED_BYTES:
        tile //= 2
    return tile


def make_view_attention(target: dict, views: int, channels: int, hidden: int, kv_input: bool = False):
    """The scheduled IRModule for one (views, channels, hidden) configuration on `target` (a TVM target dict).

    Arguments of `main`, in order: qp [NT, tile, C], features [NT, tile, V, C], ray_diff [NT, tile, V, 4],
    mask [NT, tile, V], then PreparedViewWeights.kernel_arguments(), then out [NT, tile, C]; NT is symbolic and
    tile = kernel_tile(target["kind"], views, channels). All fp32, contiguous, 64-byte aligned.
    """
    import tvm  # lazy: TVM is optional (the references run without it)
    from tvm import s_tir, te  # lazy: TVM is optional (the references run without it)

    on_cuda = target["kind"] == "cuda"
    tile = kernel_tile(target["kind"], views, channels)
    if kv_input and on_cuda:
        raise ValueError("make_view_attention: kv_input (a CPU profiling build) has no CUDA schedule")
    arguments = _view_attention_compute(views, channels, hidden, tile, fast_exp=not on_cuda, kv_input=kv_input,
                                        split_kv=not on_cuda)
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func(arguments)}))
    if on_cuda:
        _schedule_cuda(sch, CUDA_THREADS)
    else:
        _schedule_cpu(sch, channels, kv_input)
    return sch.mod


def view_attention_kernel(device: torch.device | str, views: int, channels: int, hidden: int) -> Callable | None:
    """The compiled kernel for `device`, or None (one warning) when none can be had (kernels.dispatch.get_kernel)."""
    device = torch.device(device)
    key = {"views": views, "channels": channels, "hidden": hidden, "tile": kernel_tile(device.type, views, channels)}
    return get_kernel("view_attention", key, device,
                      lambda target: make_view_attention(target, views, channels, hidden))


# ----------------------------------------------------------------------------------------------------------------
# Public wrapper
# ----------------------------------------------------------------------------------------------------------------

def _kernel_ready(tensor: torch.Tensor) -> torch.Tensor:
    return kernel_ready(tensor, torch.float32)


def _validate(qp, features, ray_diff, mask, channels: int) -> tuple[int, torch.Size]:
    """Checks shapes and devices; returns (views, leading shape)."""
    for name, tensor in (("qp", qp), ("features", features), ("ray_diff", ray_diff), ("mask", mask)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"view_attention: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != features.device:
            raise ValueError(f"view_attention: {name} is on {tensor.device} but features is on {features.device}")
    if features.dim() < 3 or features.shape[-1] != channels:
        raise ValueError(f"view_attention: features must be [..., V, C={channels}], got {tuple(features.shape)}")
    lead, views = features.shape[:-2], features.shape[-2]
    if tuple(qp.shape) != (*lead, channels):
        raise ValueError(f"view_attention: qp must be {(*lead, channels)} to match features "
                         f"{tuple(features.shape)}, got {tuple(qp.shape)}")
    if tuple(ray_diff.shape) != (*lead, views, _RAY_DIFF_DIM):
        raise ValueError(f"view_attention: ray_diff must be {(*lead, views, _RAY_DIFF_DIM)}, "
                         f"got {tuple(ray_diff.shape)}")
    if tuple(mask.shape) not in ((*lead, views), (*lead, views, 1)):
        raise ValueError(f"view_attention: mask must be {(*lead, views)} (or with a trailing 1), "
                         f"got {tuple(mask.shape)}")
    for name, tensor in (("qp", qp), ("features", features), ("ray_diff", ray_diff)):
        if not tensor.is_floating_point():
            raise ValueError(f"view_attention: {name} must be a floating-point tensor, got {tensor.dtype}")
    return views, lead


def view_attention(qp: torch.Tensor, features: torch.Tensor, ray_diff: torch.Tensor, mask: torch.Tensor,
                   weights: dict | PreparedViewWeights) -> torch.Tensor:
    """The fused kernel on torch tensors: same result as reference_view_attention (fp32 rounding aside).

    qp [..., C], features [..., V, C], ray_diff [..., V, 4], mask [..., V] or [..., V, 1] -> [..., C] in
    features' dtype (computed in fp32). Pass PreparedViewWeights (built once per module) to skip re-laying out
    the weights on every call. Inference only: when autograd needs gradients of an input, or no kernel can be
    built (no TVM, an unsupported device, a failed build: one warning), the PyTorch reference runs instead.
    """
    if not isinstance(weights, PreparedViewWeights):
        weights = PreparedViewWeights.from_dict(weights, device=features.device)
    elif weights.device != features.device:
        raise ValueError(f"view_attention: weights are on {weights.device} but features is on {features.device}; "
                         f"use weights.to(device) once")
    views, lead = _validate(qp, features, ray_diff, mask, weights.channels)
    channels = weights.channels
    if needs_grad(qp, features, ray_diff, mask):
        note_kernel("view_attention", "reference")
        return reference_view_attention(qp, features, ray_diff, mask, weights.source)
    kernel = view_attention_kernel(features.device, views, channels, weights.hidden)
    if kernel is None:
        return reference_view_attention(qp, features, ray_diff, mask, weights.source)

    out = _run_tiles(kernel, kernel_tile(features.device.type, views, channels), qp, features, ray_diff, mask,
                     weights.kernel_arguments())
    return out.view(*lead, channels).to(features.dtype)


def _run_tiles(kernel, tile: int, first: torch.Tensor, features: torch.Tensor, ray_diff: torch.Tensor,
               mask: torch.Tensor, weight_arguments: tuple) -> torch.Tensor:
    """Call a token-tiled view-attention kernel (kernel(first [NT, tile, C], features, ray_diff, mask, weights...,
    out)) on every token: the tile-aligned prefix in place, the last partial tile padded with tokens no view sees
    (their output is 0). first = qp or x [..., C] -> out fp32 [tokens, C]."""
    views, channels = features.shape[-2:]
    tokens = first.numel() // channels
    rows = [_kernel_ready(first.reshape(tokens, channels)), _kernel_ready(features.reshape(tokens, views, channels)),
            _kernel_ready(ray_diff.reshape(tokens, views, _RAY_DIFF_DIM)), _kernel_ready(mask.reshape(tokens, views))]
    out = torch.empty(tokens, channels, dtype=torch.float32, device=features.device)

    def launch(inputs, outputs) -> None:
        first_part, feature_part, ray_part, mask_part = inputs
        kernel(first_part.view(-1, tile, channels), feature_part.view(-1, tile, views, channels),
               ray_part.view(-1, tile, views, _RAY_DIFF_DIM), mask_part.view(-1, tile, views), *weight_arguments,
               outputs[0].view(-1, tile, channels))

    run_tiled(launch, tile, tokens, rows, [out])
    return out


# ----------------------------------------------------------------------------------------------------------------
# The whole pre-norm sublayer (CPU): x + out_fc(attention(q_fc(LN(x))))
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SublayerWeights:
    """The block's LayerNorm and the attention's q_fc / out_fc in the kernel layout (contiguous fp32 snapshots):
    ln_w, ln_b [C], q_t = Wq^T [C, C], out_t = Wo^T [C, C], out_b [C]; eps of the LayerNorm."""

    ln_w: torch.Tensor
    ln_b: torch.Tensor
    q_t: torch.Tensor
    out_t: torch.Tensor
    out_b: torch.Tensor
    eps: float

    @classmethod
    def from_modules(cls, norm: nn.Module, attention: nn.Module) -> "SublayerWeights":
        """ValueError/TypeError (via linear_weight) for layers no kernel reproduces; q_fc must have no bias."""
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
            raise TypeError(f"view attention sublayer: the norm must be an affine nn.LayerNorm, got {type(norm).__name__}")
        if getattr(attention.q_fc, "bias", None) is not None:
            raise ValueError("view attention sublayer: q_fc must have no bias (as ViewAttention's)")
        out_w = linear_weight(attention.out_fc)
        out_b = attention.out_fc.bias.detach() if attention.out_fc.bias is not None else out_w.new_zeros(out_w.shape[0])
        layout = lambda t: _kernel_ready(t.detach().float().clone())  # noqa: E731 (snapshots)
        return cls(ln_w=layout(norm.weight), ln_b=layout(norm.bias), q_t=layout(linear_weight(attention.q_fc).t()),
                   out_t=layout(out_w.t()), out_b=layout(out_b), eps=float(norm.eps))

    def kernel_arguments(self) -> tuple[torch.Tensor, ...]:
        return self.ln_w, self.ln_b, self.q_t, self.out_t, self.out_b


def reference_view_attention_sublayer(x, features, ray_diff, mask, weights: PreparedViewWeights,
                                      sub: SublayerWeights) -> torch.Tensor:
    """x [..., C] -> x + out_fc(attention(q_fc(LN(x)))) fp32: the ground truth and fallback."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), sub.ln_w, sub.ln_b, sub.eps)
    mixed = reference_view_attention(normed @ sub.q_t, features.float(), ray_diff.float(), mask, weights.source)
    return x.float() + mixed @ sub.out_t + sub.out_b


def make_view_attention_sublayer(target: dict, views: int, channels: int, hidden: int, eps: float):
    """The scheduled IRModule (CPU only): x [NT, TILE, C], features, ray_diff, mask as make_view_attention's,
    PreparedViewWeights.kernel_arguments(), SublayerWeights.kernel_arguments(), out [NT, TILE, C]."""
    import tvm  # lazy: TVM is optional
    from tvm import s_tir, te

    if target["kind"] != "llvm":
        raise ValueError(f"the fused view-attention sublayer has a CPU (llvm) schedule only, not {target['kind']!r}")
    arguments = _view_attention_compute(views, channels, hidden, TILE, fast_exp=True, sublayer_eps=eps)
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func(arguments)}))
    _schedule_cpu(sch, channels, sublayer=True)
    return sch.mod


def view_attention_sublayer(x: torch.Tensor, features: torch.Tensor, ray_diff: torch.Tensor, mask: torch.Tensor,
                            weights: PreparedViewWeights, sub: SublayerWeights) -> torch.Tensor:
    """x [..., C] -> x + out_fc(attention(q_fc(LN(x)))) fp32 [..., C] in one kernel (CPU); the reference when
    gradients are needed or no kernel can be had (one warning)."""
    if weights.device != features.device:
        raise ValueError(f"view_attention_sublayer: weights are on {weights.device} but features on {features.device}")
    views, lead = _validate(x, features, ray_diff, mask, weights.channels)
    channels = weights.channels
    if needs_grad(x, features, ray_diff, mask):
        note_kernel("view_attention_sublayer", "reference")
        return reference_view_attention_sublayer(x, features, ray_diff, mask, weights, sub)
    key = {"views": views, "channels": channels, "hidden": weights.hidden, "tile": TILE, "eps": sub.eps}
    kernel = get_kernel("view_attention_sublayer", key, features.device,
                        lambda target: make_view_attention_sublayer(target, views, channels, weights.hidden, sub.eps))
    if kernel is None:
        return reference_view_attention_sublayer(x, features, ray_diff, mask, weights, sub)
    out = _run_tiles(kernel, TILE, x, features, ray_diff, mask, (*weights.kernel_arguments(), *sub.kernel_arguments()))
    return out.view(*lead, channels)
