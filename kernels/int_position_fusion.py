"""GNT's position fusion with integer shift layers in one VNNI kernel (CPU): for ShiftAdd variants with
shiftadd.position_fusion: shift and 8-bit per-tensor activations (n). Per sample, nothing leaves registers and L1:

    waves  = sin, cos of (2^k x_d)       (k < F, d < 3), one argument reduction for both        [2 x 32]
    hidden = relu((query(q) + (dir_bias + coords @ Wc)) + waves_layer(waves))                   [H]
    out    = fc2(hidden)                                                                        [C]

query (C -> H), waves_layer (6F -> H) and fc2 (H -> C) are 8-bit integer shift layers with their own calibrated
scales: q, the waves and the ReLU outputs are rounded into fixed point in registers and multiplied on vpdpbusd.
The three raw coordinates (another range) are a dense 3 -> H block and dir_bias = enc(d) @ Wd^T + b once per ray
(PyTorch, [R, D] x [D, H]), as in the fp32 kernel (kernels/position_fusion.py). sin and cos are that kernel's
polynomials (within 2e-7 of torch's), so a wave within rounding of a .5 step may quantize one step apart from the
reference; given the same waves every integer layer is bit-exact (`reference_int_position_fusion`).

Layout: q [N, C], points [N, 3] with N = R x S (the wrapper pads to whole tiles of 8 samples), dir_bias
[R', H] (R' >= R: zero rows for the rays the padding rows fall in); the waves in the kernel's order: 32 sines of (k, d) = (j // 3, j % 3)
for j < 3F (zeros after), then their 32 cosines; the waves layer's weight columns permuted to match.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear
from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, note_kernel
from kernels.int_shift import LANES, TILES_PER_TASK, IntShiftWeights, _blocks_per_pass, _KernelParts, export_8bit, \
    prepare_int_shift, reference_from_weights, vnni_available
from kernels.position_fusion import check_fusion_inputs, reduced_sin_cos

__all__ = ["IntPositionFusionWeights", "wave_order", "reference_int_position_fusion", "make_int_position_fusion",
           "int_position_fusion"]

_POINT_DIM = 3
_TILE = 8  # samples per micro-tile (8 x 2 accumulators of 16 outputs, as int_shift.micro_tile for 32 outputs)
_WAVE_SLOTS = 2 * LANES  # sines (or cosines) per sample in the kernel: 3F <= 32


def wave_order(num_freqs: int) -> list[int]:
    """For each of the kernel's 2 x 32 wave slots, the index into the layer's waves block (PositionalEncoding's
    code without the 3 coordinates: per k, sin of the 3 coordinates, then their cos), or -1 for a zero slot."""
    waves = _POINT_DIM * num_freqs
    sines = [6 * (j // 3) + j % 3 if j < waves else -1 for j in range(_WAVE_SLOTS)]
    return sines + [index + 3 if index >= 0 else -1 for index in sines]


@lru_cache(maxsize=8)
def _wave_frequencies(num_freqs: int) -> torch.Tensor:
    """[3, 32] fp32: slot j's argument is sum_d x_d * freq[d, j] = 2^k x_d (one nonzero term: exact)."""
    freqs = torch.zeros(_POINT_DIM, _WAVE_SLOTS)
    for j in range(_POINT_DIM * num_freqs):
        freqs[j % 3, j] = float(2 ** (j // 3))
    return kernel_ready(freqs, torch.float32)


@dataclass(frozen=True, eq=False)
class IntPositionFusionWeights:
    """One fusion MLP of variant n in the kernel layout: query (C -> H), waves (64 slots -> H, wave_order), fc2
    (H -> C) as 8-bit per-tensor IntShiftWeights; coords_t [3, H] (the dense coordinate block), dir_w [H, D] and
    b1 [H] (dir_bias, in PyTorch). Contiguous snapshots (build again after changing the layers)."""

    query: IntShiftWeights
    waves: IntShiftWeights
    fc2: IntShiftWeights
    coords_t: torch.Tensor
    dir_w: torch.Tensor
    b1: torch.Tensor
    num_freqs: int

    @property
    def channels(self) -> int:
        return self.query.in_features

    @property
    def hidden(self) -> int:
        return self.query.out_features

    @classmethod
    def from_mlp(cls, mlp: nn.Sequential, channels: int, num_freqs: int) -> "IntPositionFusionWeights":
        """ValueError/TypeError unless mlp is BlockShiftLinear (query block + the code's sines and cosines as 8-bit
        per-tensor IntShiftLinear, the 3 coordinates and the direction code dense), ReLU, 8-bit per-tensor
        IntShiftLinear, with widths that are multiples of 16 and 3F <= 32."""
        if len(mlp) != 3 or not isinstance(mlp[1], nn.ReLU) or not isinstance(mlp[0], BlockShiftLinear):
            raise TypeError("integer position fusion kernel: the MLP must be BlockShiftLinear, ReLU, IntShiftLinear")
        fc1, waves = mlp[0], _POINT_DIM * 2 * num_freqs
        if fc1.block != channels or not fc1.has_second or fc1.second_start != channels + _POINT_DIM \
                or fc1.second.in_features != waves:
            raise ValueError(f"integer position fusion kernel: fc1's shift blocks must be the {channels}-wide query "
                             f"and the {waves} sines and cosines after the 3 coordinates")
        if channels % LANES or fc1.out_features % LANES or _POINT_DIM * num_freqs > _WAVE_SLOTS:
            raise ValueError(f"integer position fusion kernel: needs C and H multiples of {LANES} and at most "
                             f"{_WAVE_SLOTS // 3} frequencies, got C={channels}, H={fc1.out_features}, F={num_freqs}")
        exported, per_token = export_8bit({"fc1.first": fc1.first, "fc1.second": fc1.second, "fc2": mlp[2]},
                                          "integer position fusion kernel")
        if per_token:
            raise ValueError("integer position fusion kernel: the integer layers need calibrated per-tensor scales")
        slots = torch.tensor(wave_order(num_freqs))
        waves_weight = exported["fc1.second"]["weight_int"][:, slots.clamp(min=0)].masked_fill(slots < 0, 0)
        spread = dict(exported["fc1.second"], weight_int=waves_weight)
        snapshot = lambda t: kernel_ready(t.detach().float().clone(), torch.float32)  # noqa: E731
        rest = fc1.rest.weight.detach().float()
        bias = fc1.rest.bias if fc1.rest.bias is not None else rest.new_zeros(fc1.out_features)
        return cls(query=prepare_int_shift(exported["fc1.first"]), waves=prepare_int_shift(spread),
                   fc2=prepare_int_shift(exported["fc2"]), coords_t=snapshot(rest[:, :_POINT_DIM].t()),
                   dir_w=snapshot(rest[:, _POINT_DIM:]), b1=snapshot(bias), num_freqs=num_freqs)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the custom op takes: each integer layer's packed, compensation, out_scale, bias, absmax, then
        coords_t, dir_w, b1."""
        return (*self.query.tensors(), *self.waves.tensors(), *self.fc2.tensors(), self.coords_t, self.dir_w, self.b1)

    @classmethod
    def from_tensors(cls, tensors, num_freqs: int) -> "IntPositionFusionWeights":
        """Inverse of `tensors()` (no copies)."""
        hidden, channels = tensors[17].shape[0], tensors[0].shape[1] * 4
        sizes = ((channels, hidden), (2 * _WAVE_SLOTS, hidden), (hidden, channels))
        query, waves, fc2 = (IntShiftWeights.eight_bit(tensors[5 * k:5 * k + 4], *sizes[k], tensors[5 * k + 4])
                             for k in range(3))
        return cls(query, waves, fc2, *tensors[15:18], num_freqs=num_freqs)


def _waves(points: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """The waves in the kernel's slots: points [..., 3] -> [..., 64] fp32 (zeros in the unused slots)."""
    slots = (points.float()[..., :, None] * _wave_frequencies(num_freqs)).sum(dim=-2)  # one nonzero term: exact
    used = torch.tensor([index >= 0 for index in wave_order(num_freqs)[:_WAVE_SLOTS]])
    return torch.cat([torch.sin(slots) * used, torch.cos(slots) * used], dim=-1)


def reference_int_position_fusion(q: torch.Tensor, points: torch.Tensor, dir_code: torch.Tensor,
                                  w: IntPositionFusionWeights, waves: torch.Tensor | None = None) -> torch.Tensor:
    """The ground truth and fallback, in the kernel's order of fp32 sums: q [R, S, C], points [R, S, 3], dir_code
    [R, D] -> [R, S, C] fp32. waves [R, S, 64] (default: torch's sin and cos of the points) lets a test give both
    sides the same waves."""
    dir_bias = F.linear(dir_code.float(), w.dir_w, w.b1)[:, None, :]
    points = points.float()
    dense = dir_bias + points[..., 0:1] * w.coords_t[0] + points[..., 1:2] * w.coords_t[1] \
        + points[..., 2:3] * w.coords_t[2]
    waves = _waves(points, w.num_freqs) if waves is None else waves
    hidden = torch.relu((reference_from_weights(q.float(), w.query) + dense) + reference_from_weights(waves, w.waves))
    return reference_from_weights(hidden, w.fc2)


def _script_sin_cos(T, x):
    """(sin x, cos x) of 16 fp32 lanes, emitted while the kernel is parsed: kernels/position_fusion.py's reduction
    and polynomials (reduced_sin_cos), shared by both; the quadrant (n, n + 1 for the cosine) picks +-sin(r) or
    +-cos(r)."""
    n, sine, cosine = reduced_sin_cos(x, lambda value: T.Broadcast(T.float32(value), LANES), T.floor, T.bind)
    quadrant = T.bind(T.Cast(f"int32x{LANES}", n))
    one, two = T.Broadcast(T.int32(1), LANES), T.Broadcast(T.int32(2), LANES)

    def signed(turn):
        value = T.Select(T.bitwise_and(turn, one) == one, cosine, sine)
        return T.Select(T.bitwise_and(turn, two) == two, -value, value)

    return signed(quadrant), signed(quadrant + one)


def make_int_position_fusion(channels: int, hidden: int, samples: int):
    """IRModule "main"(q fp32 [tiles, 8, C], points fp32 [tiles, 8, 3], dir_bias fp32 [R', H], freqs fp32
    [3, 32], the query, waves and fc2 layers' packed, compensation, out_scale, bias, absmax [1], coords_t [3, H],
    y fp32 [tiles, 8, C]) for the VNNI CPU; samples (per ray) gives each row's ray: row n reads dir_bias[n // S]."""
    import tvm  # lazy: TVM is optional
    from tvm.script import tirx as T

    parts = _KernelParts(8, _TILE)
    hidden_blocks, channel_blocks = hidden // LANES, channels // LANES
    jb1, jb2 = _blocks_per_pass(hidden_blocks, 2), _blocks_per_pass(channel_blocks, 2)
    slots = 2 * _WAVE_SLOTS
    lanes = lambda block: T.Ramp(block * LANES, 1, LANES)  # noqa: E731

    def shapes(width_in: int, width_out: int):
        return (width_out // LANES, width_in // 4, 4 * LANES), (width_out,)

    query_p, query_o = shapes(channels, hidden)
    waves_p, waves_o = shapes(slots, hidden)
    fc2_p, fc2_o = shapes(hidden, channels)

    def code_rows(t, points, dir_bias, freqs, coords_t, inv, xw, dense):
        """For the tile's samples: xw[i] = the waves in fixed point (the waves layer's scale), dense[i] = dir_bias of
        its ray + its coordinates' dense block, in the reference's order of sums."""
        for i in range(_TILE):
            coordinate = [T.bind(points[t, i, d]) for d in range(_POINT_DIM)]
            ray = (t * _TILE + i) // samples
            for b in range(hidden_blocks):
                value = dir_bias[ray, lanes(b)]
                for d in range(_POINT_DIM):
                    value = value + T.Broadcast(coordinate[d], LANES) * coords_t[d, lanes(b)]
                T.buffer_store(dense, value, [i, lanes(b)])
            for half in range(_WAVE_SLOTS // LANES):
                argument = T.Broadcast(coordinate[0], LANES) * freqs[0, lanes(half)]
                for d in range(1, _POINT_DIM):
                    argument = argument + T.Broadcast(coordinate[d], LANES) * freqs[d, lanes(half)]
                sine, cosine = _script_sin_cos(T, T.bind(argument))
                T.buffer_store(xw, parts.fixed_point(sine, inv), [i, lanes(half)])
                T.buffer_store(xw, parts.fixed_point(cosine, inv), [i, lanes(half + _WAVE_SLOTS // LANES)])

    @T.macro
    def tile_body(t, q, points, dir_bias, freqs, coords_t, y, xq, xw, hq, dense, scale, steps, qp, qc, qs, qb,
                  wp, wc, ws, wb, fp, fc, fs, fb):
        parts.quantize(q, t, channels, xq, scale, False, None, calibrated=(steps[0, 0], steps[1, 0]))
        code_rows(t, points, dir_bias, freqs, coords_t, steps[0, 1], xw, dense)
        for p in T.serial(hidden_blocks // jb1):
            parts.dot_products(xq, qp, qc, qs, qb, scale, p, channels, jb1, lambda i, block, value: T.buffer_store(
                dense, value + dense[i, lanes(block)], [i, lanes(block)]))
        for i in T.serial(_TILE):
            scale[i] = steps[1, 1]
        for p in T.serial(hidden_blocks // jb1):
            parts.dot_products(xw, wp, wc, ws, wb, scale, p, slots, jb1, lambda i, block, value: T.buffer_store(
                hq, parts.fixed_point(parts.relu(dense[i, lanes(block)] + value), steps[0, 2], True),
                [i, lanes(block)]))
        for i in T.serial(_TILE):
            scale[i] = steps[1, 2]
        for p in T.serial(channel_blocks // jb2):
            parts.dot_products(hq, fp, fc, fs, fb, scale, p, hidden, jb2,
                               lambda i, block, value: T.buffer_store(y, value, [t, i, lanes(block)]))

    @T.prim_func
    def main(q_h: T.handle, points_h: T.handle, bias_h: T.handle, freqs: T.Buffer((_POINT_DIM, _WAVE_SLOTS), "float32"),
             qp: T.Buffer(query_p, "int8"), qc: T.Buffer(query_o, "int32"), qs: T.Buffer(query_o, "float32"),
             qb: T.Buffer(query_o, "float32"), qa: T.Buffer((1,), "float32"),
             wp: T.Buffer(waves_p, "int8"), wc: T.Buffer(waves_o, "int32"), ws: T.Buffer(waves_o, "float32"),
             wb: T.Buffer(waves_o, "float32"), wa: T.Buffer((1,), "float32"),
             fp: T.Buffer(fc2_p, "int8"), fc: T.Buffer(fc2_o, "int32"), fs: T.Buffer(fc2_o, "float32"),
             fb: T.Buffer(fc2_o, "float32"), fa: T.Buffer((1,), "float32"),
             coords_t: T.Buffer((_POINT_DIM, hidden), "float32"), y_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        tiles, rays = T.int32(), T.int32()
        q = T.match_buffer(q_h, (tiles, _TILE, channels), "float32")
        points = T.match_buffer(points_h, (tiles, _TILE, _POINT_DIM), "float32")
        dir_bias = T.match_buffer(bias_h, (rays, hidden), "float32")
        y = T.match_buffer(y_h, (tiles, _TILE, channels), "float32")
        for chunk in T.parallel((tiles + TILES_PER_TASK - 1) // TILES_PER_TASK):
            xq = T.alloc_buffer((_TILE, channels), "uint8", scope="local")
            xw = T.alloc_buffer((_TILE, slots), "uint8", scope="local")
            hq = T.alloc_buffer((_TILE, hidden), "uint8", scope="local")
            dense = T.alloc_buffer((_TILE, hidden), "float32", scope="local")
            scale = T.alloc_buffer((_TILE,), "float32", scope="local")
            steps = T.alloc_buffer((2, 3), "float32", scope="local")  # (127 / absmax, absmax / 127) per layer
            steps[0, 0] = parts.calibration(qa[0])[0]
            steps[1, 0] = parts.calibration(qa[0])[1]
            steps[0, 1] = parts.calibration(wa[0])[0]
            steps[1, 1] = parts.calibration(wa[0])[1]
            steps[0, 2] = parts.calibration(fa[0])[0]
            steps[1, 2] = parts.calibration(fa[0])[1]
            for within in T.serial(TILES_PER_TASK):
                if chunk * TILES_PER_TASK + within < tiles:
                    tile_body(chunk * TILES_PER_TASK + within, q, points, dir_bias, freqs, coords_t, y, xq, xw, hq,
                              dense, scale, steps, qp, qc, qs, qb, wp, wc, ws, wb, fp, fc, fs, fb)

    return tvm.IRModule({"main": main})


def int_position_fusion(q: torch.Tensor, points: torch.Tensor, dir_code: torch.Tensor,
                        w: IntPositionFusionWeights) -> torch.Tensor:
    """q [R, S, C], points [R, S, 3], dir_code [R, D] (CPU) -> the fused query [R, S, C] fp32 on the VNNI kernel;
    the reference (one note) where this CPU has no AVX-512 VNNI or no kernel builds."""
    check_fusion_inputs("int_position_fusion", q, points, dir_code, w.channels, w.dir_w.shape[1], " (AVX-512 VNNI)")
    rays, samples = q.shape[:2]
    kernel = None
    if vnni_available() and rays:
        kernel = get_kernel("int_position_fusion", {"channels": w.channels, "hidden": w.hidden, "samples": samples},
                            q.device, lambda _: make_int_position_fusion(w.channels, w.hidden, samples))
    elif not vnni_available():
        note_kernel("int_position_fusion", "reference")
    if kernel is None:
        return reference_int_position_fusion(q, points, dir_code, w)
    rows = rays * samples
    padded = -(-rows // _TILE) * _TILE

    def tiles(t: torch.Tensor, width: int) -> torch.Tensor:
        t = kernel_ready(t.reshape(rows, width), torch.float32)
        if padded != rows:
            t = torch.cat([t, t.new_zeros(padded - rows, width)])
        return t.view(-1, _TILE, width)

    dir_bias = F.linear(dir_code.float(), w.dir_w, w.b1)
    spare = (padded - 1) // samples + 1 - rays  # rays the padding rows point at (row n reads dir_bias[n // S])
    dir_bias = kernel_ready(torch.cat([dir_bias, dir_bias.new_zeros(spare, w.hidden)]) if spare else dir_bias,
                            torch.float32)
    out = torch.empty(padded // _TILE, _TILE, w.channels, dtype=torch.float32)
    kernel(tiles(q, w.channels), tiles(points, _POINT_DIM), dir_bias, _wave_frequencies(w.num_freqs),
           *w.query.tensors(), *w.waves.tensors(), *w.fc2.tensors(), w.coords_t, out)
    return out.view(padded, w.channels)[:rows].view(rays, samples, w.channels)
