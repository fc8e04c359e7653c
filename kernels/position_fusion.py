"""One fused TVM kernel (CPU) for GNT's position fusion: the points' NeRF encoding and the fusion MLP, per ray.

At every even layer GNT injects where each sample is into its query: q <- W2 relu(W1 [q, enc(p), enc(d)] + b1) + b2,
enc(x) = [x, sin(2^k x), cos(2^k x)] for k < F (models.encodings). In PyTorch that is the encoding's sin, cos,
stack and concatenation over [R, S, 3 + 6F], then three products over [R, S, *] and their sums: 10-12 ms of a
2048-ray chunk on the 2-core CPU, about a tenth of a kernel-backed frame. Here, per ray, nothing leaves L1:

    code    = [p, sin(2^k p), cos(2^k p)]   (k < F; kernel order: x, 3F sines, 3F cosines)    [S, P]
    hidden  = relu(q @ Wq^T + code @ Wp^T + dir_bias)                                       [S, H]
    out     = hidden @ W2^T + b2                                                            [S, C]

dir_bias = enc(d) @ Wd^T + b1 is once per ray (the direction is the same for all of a ray's samples), a [R, D] x
[D, H] product left to PyTorch. sin and cos are polynomials (the argument reduced by pi/2 in three exact parts,
Taylor terms to r^9 / r^10 on [-pi/4, pi/4]; within 2e-7 of torch.sin for the encoding's arguments), so LLVM
vectorizes them; TVM's sin/cos would be one libm call per lane. Weights are fp32, transposed [in, out], the
encoding's rows permuted to the kernel's order (PositionFusionWeights).

Layout: q, points [R, S, *] with the ray count symbolic (never split), parallel over rays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.models.encodings import PositionalEncoding
from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear
from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, linear_weight, needs_grad, note_kernel
from kernels.te_math import register_blocked

__all__ = ["PositionFusionWeights", "encoding_order", "reference_position_fusion", "make_position_fusion",
           "position_fusion"]

_POINT_DIM = 3
# pi/2 in three parts (Cody-Waite): the first two have few enough bits that n * part is exact for |n| < 2^12
_HALF_PI = (1.5703125, 4.837512969970703125e-4, 7.54978995489188216e-8)


def encoding_order(num_freqs: int) -> list[int]:
    """The kernel's code order as indices into models.encodings.PositionalEncoding's output: the 3 coordinates,
    then every sin(2^k x_d), then every cos(2^k x_d), (k, d) ascending. PositionalEncoding lays out
    [x (3), then per k: sin (3), cos (3)]."""
    sines = [_POINT_DIM + 6 * k + d for k in range(num_freqs) for d in range(_POINT_DIM)]
    return list(range(_POINT_DIM)) + sines + [index + _POINT_DIM for index in sines]


@dataclass(frozen=True, eq=False)
class PositionFusionWeights:
    """One fusion MLP (Linear(C + P + D -> H), ReLU, Linear(H -> C)) in the kernel's layout: q_t [C, H], code_t
    [P, H] (rows in encoding_order), dir_w [H, D] and b1 [H] (dir_bias in PyTorch), w2_t [H, C], b2 [C].
    Contiguous fp32 snapshots (build again after changing the layers)."""

    q_t: torch.Tensor
    code_t: torch.Tensor
    dir_w: torch.Tensor
    b1: torch.Tensor
    w2_t: torch.Tensor
    b2: torch.Tensor
    num_freqs: int

    @property
    def channels(self) -> int:
        return self.q_t.shape[0]

    @property
    def hidden(self) -> int:
        return self.q_t.shape[1]

    @classmethod
    def from_mlp(cls, mlp: nn.Sequential, channels: int, num_freqs: int) -> "PositionFusionWeights":
        """ValueError/TypeError for an MLP the kernel does not reproduce (not Linear-ReLU-Linear of fp32 weights:
        kernels.dispatch.linear_weight decides, so a ShiftLinear, or a BlockShiftLinear's shift blocks, run on their
        decoded weights; integer layers raise IntegerLayerError: kernels/int_position_fusion.py runs them)."""
        if len(mlp) != 3 or not isinstance(mlp[1], nn.ReLU):
            raise TypeError(f"position fusion kernel: the MLP must be Linear, ReLU, Linear, got {mlp}")
        fc1 = mlp[0]
        w1 = fc1.assembled_weight(linear_weight) if isinstance(fc1, BlockShiftLinear) else linear_weight(fc1)
        w1, w2 = w1.float(), linear_weight(mlp[2]).float()
        code_dim = _POINT_DIM * (1 + 2 * num_freqs)
        hidden, inputs = w1.shape
        if inputs <= channels + code_dim or tuple(w2.shape) != (channels, hidden):
            raise ValueError(f"position fusion kernel: layers {tuple(w1.shape)}, {tuple(w2.shape)} do not fuse "
                             f"{channels} channels with a {code_dim}-wide point code and a direction code")
        b1 = fc1.rest.bias if isinstance(fc1, BlockShiftLinear) else fc1.bias
        b1 = b1 if b1 is not None else w1.new_zeros(hidden)
        b2 = mlp[2].bias if mlp[2].bias is not None else w2.new_zeros(channels)
        snapshot = lambda t: kernel_ready(t.detach().float().clone(), torch.float32)  # noqa: E731
        order = torch.tensor(encoding_order(num_freqs), device=w1.device)
        return cls(q_t=snapshot(w1[:, :channels].t()), code_t=snapshot(w1[:, channels:channels + code_dim][:, order].t()),
                   dir_w=snapshot(w1[:, channels + code_dim:]), b1=snapshot(b1), w2_t=snapshot(w2.t()),
                   b2=snapshot(b2), num_freqs=num_freqs)

    def kernel_arguments(self) -> tuple[torch.Tensor, ...]:
        return self.q_t, self.code_t, self.w2_t, self.b2


def reference_position_fusion(q: torch.Tensor, points: torch.Tensor, dir_code: torch.Tensor,
                              w: PositionFusionWeights) -> torch.Tensor:
    """The ground truth and fallback: q [R, S, C], points [R, S, 3], dir_code [R, D] -> [R, S, C] fp32."""
    dir_bias = F.linear(dir_code.float(), w.dir_w, w.b1)  # [R, H]
    code = PositionalEncoding(_POINT_DIM, w.num_freqs).to(points.device)(points.float())[..., encoding_order(w.num_freqs)]
    hidden = torch.relu(q.float() @ w.q_t + code @ w.code_t + dir_bias[:, None, :])
    return hidden @ w.w2_t + w.b2


# ----------------------------------------------------------------------------------------------------------------
# TVM kernel
# ----------------------------------------------------------------------------------------------------------------

def reduced_sin_cos(x, const, floor, bind=lambda value: value):
    """(n, sin r, cos r) with n = round(x 2/pi) and r = x - n pi/2 in [-pi/4, pi/4] (pi/2 in three exact parts),
    sin r and cos r their Taylor polynomials to r^9 / r^10, as plain arithmetic on whatever expressions x is (TE
    here, TVMScript vectors in kernels/int_position_fusion.py): const(v) makes a constant of x's kind, floor rounds
    down, bind names a shared subexpression (TVMScript) or is the identity (TE). The quadrant then picks +-sin r or
    +-cos r: n for sin x, n + 1 for cos x."""
    n = bind(floor(x * const(2.0 / math.pi) + const(0.5)))
    r = bind(x - n * const(_HALF_PI[0]) - n * const(_HALF_PI[1]) - n * const(_HALF_PI[2]))
    r2 = bind(r * r)
    sine = r + r * r2 * (const(-1.0 / 6) + r2 * (const(1.0 / 120) + r2 * (const(-1.0 / 5040) + r2 * const(
        1.0 / 362880))))
    cosine = const(1.0) + r2 * (const(-0.5) + r2 * (const(1.0 / 24) + r2 * (const(-1.0 / 720) + r2 * (
        const(1.0 / 40320) + r2 * const(-1.0 / 3628800)))))
    return n, bind(sine), bind(cosine)


def _sin_or_cos(x, cosine):
    """sin(x) (cosine false) or cos(x) = sin(x + pi/2) (cosine true; a TIR bool) as plain arithmetic
    (reduced_sin_cos), the quadrant (n, +1 for the cosine) picking +-sin(r) or +-cos(r)."""
    from tvm import tirx  # lazy: TVM is optional

    n, sine, cosine_r = reduced_sin_cos(x, lambda v: tirx.const(v, "float32"), tirx.floor)
    quadrant = n.astype("int32") + tirx.Select(cosine, tirx.const(1, "int32"), tirx.const(0, "int32"))
    value = tirx.if_then_else(tirx.bitwise_and(quadrant, 1) == 1, cosine_r, sine)
    return tirx.if_then_else(tirx.bitwise_and(quadrant, 2) == 2, -value, value)


def _position_fusion_compute(samples: int, channels: int, hidden: int, num_freqs: int):
    """TE definition: the arguments in call order, output last (q, points, dir_bias, kernel_arguments(), out)."""
    from tvm import te, tirx  # lazy: TVM is optional (the references run without it)

    code_dim = _POINT_DIM * (1 + 2 * num_freqs)
    waves = _POINT_DIM * num_freqs
    rays = te.var("rays")
    q = te.placeholder((rays, samples, channels), name="q")
    points = te.placeholder((rays, samples, _POINT_DIM), name="points")
    dir_bias = te.placeholder((rays, hidden), name="dir_bias")
    q_t = te.placeholder((channels, hidden), name="q_t")
    code_t = te.placeholder((code_dim, hidden), name="code_t")
    w2_t = te.placeholder((hidden, channels), name="w2_t")
    b2 = te.placeholder((channels,), name="b2")

    # samples last ([P, S], [3, S]): the code is computed a row of samples at a time (vector lanes), each row's
    # coordinate, frequency and function constants; the products read it one broadcast scalar at a time
    coordinates = te.compute((rays, _POINT_DIM, samples), lambda r, d, s: points[r, s, d], name="coordinates")

    def code_value(r, e, s):  # e is a loop variable: every e-dependent value below is a scalar per row
        wave = tirx.floormod(e - _POINT_DIM, waves)  # (k, d) of a sine or cosine
        x = coordinates[r, tirx.Select(e < _POINT_DIM, e, tirx.floormod(wave, _POINT_DIM)), s]
        frequency = tirx.reinterpret("float32", tirx.shift_left(tirx.floordiv(wave, _POINT_DIM) + 127, 23))
        return tirx.Select(e < _POINT_DIM, x, _sin_or_cos(x * frequency, e >= _POINT_DIM + waves))

    code = te.compute((rays, code_dim, samples), code_value, name="code")
    c = te.reduce_axis((0, channels), name="c")
    from_q = te.compute((rays, samples, hidden), lambda r, s, h: te.sum(q[r, s, c] * q_t[c, h], axis=c),
                        name="from_q")
    e = te.reduce_axis((0, code_dim), name="e")
    from_code = te.compute((rays, samples, hidden), lambda r, s, h: te.sum(code[r, e, s] * code_t[e, h], axis=e),
                           name="from_code")
    activation = te.compute((rays, samples, hidden), lambda r, s, h: te.max(
        from_q[r, s, h] + from_code[r, s, h] + dir_bias[r, h], tirx.const(0.0, "float32")), name="activation")
    j = te.reduce_axis((0, hidden), name="j")
    projected = te.compute((rays, samples, channels), lambda r, s, o: te.sum(activation[r, s, j] * w2_t[j, o],
                                                                            axis=j), name="projected")
    out = te.compute((rays, samples, channels), lambda r, s, o: projected[r, s, o] + b2[o], name="out")
    return [q, points, dir_bias, q_t, code_t, w2_t, b2, out]


def make_position_fusion(target: dict, samples: int, channels: int, hidden: int, num_freqs: int):
    """The scheduled IRModule (CPU): parallel over rays, every stage per ray in small buffers; the three products
    register-blocked (a ray's samples' accumulators in registers, each weight vector loaded once per ray)."""
    import tvm  # lazy: TVM is optional
    from tvm import s_tir, te

    if target["kind"] != "llvm":
        raise ValueError(f"the position fusion kernel has a CPU (llvm) schedule only, not {target['kind']!r}")
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func(
        _position_fusion_compute(samples, channels, hidden, num_freqs))}))
    out = sch.get_sblock("out")
    ray, _, channel = sch.get_loops(out)
    sch.parallel(ray)
    sch.vectorize(channel)
    for name in ("projected", "activation", "from_code", "from_q", "code", "coordinates"):  # consumers first
        sch.compute_at(sch.get_sblock(name), ray, preserve_unit_loops=True)
    register_blocked(sch, "projected", channels)
    register_blocked(sch, "from_code", hidden)
    register_blocked(sch, "from_q", hidden)
    for name in ("activation", "code"):  # over hidden units; over samples (the rows' constants are scalars)
        sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])
    return sch.mod


def _kernel(device: torch.device, samples: int, w: PositionFusionWeights) -> Callable | None:
    key = {"samples": samples, "channels": w.channels, "hidden": w.hidden, "freqs": w.num_freqs}
    return get_kernel("position_fusion", key, device, lambda target: make_position_fusion(
        target, samples, w.channels, w.hidden, w.num_freqs))


def check_fusion_inputs(name: str, q: torch.Tensor, points: torch.Tensor, dir_code: torch.Tensor, channels: int,
                        dir_width: int, cpu_note: str = "") -> None:
    """ValueError naming what is wrong unless q is [R, S, channels], points [R, S, 3] and dir_code [R, dir_width],
    on the CPU (both position-fusion kernels' inputs)."""
    if q.dim() != 3 or q.shape[-1] != channels:
        raise ValueError(f"{name}: q must be [rays, samples, C={channels}], got {tuple(q.shape)}")
    if tuple(points.shape) != (*q.shape[:2], _POINT_DIM):
        raise ValueError(f"{name}: points must be [{q.shape[0]}, {q.shape[1]}, 3], got {tuple(points.shape)}")
    if dir_code.dim() != 2 or dir_code.shape != (q.shape[0], dir_width):
        raise ValueError(f"{name}: dir_code must be [{q.shape[0]}, {dir_width}], got {tuple(dir_code.shape)}")
    if q.device.type != "cpu":
        raise ValueError(f"{name}: the kernel runs on CPU{cpu_note}, got a tensor on {q.device}")


def position_fusion(q: torch.Tensor, points: torch.Tensor, dir_code: torch.Tensor,
                    w: PositionFusionWeights) -> torch.Tensor:
    """q [R, S, C], points [R, S, 3], dir_code [R, D] -> the fused query [R, S, C] fp32 (CPU kernel). The
    reference when gradients are needed or no kernel can be had (one warning)."""
    check_fusion_inputs("position_fusion", q, points, dir_code, w.channels, w.dir_w.shape[1])
    if needs_grad(q, points, dir_code):
        note_kernel("position_fusion", "reference")
        return reference_position_fusion(q, points, dir_code, w)
    kernel = _kernel(q.device, q.shape[1], w) if q.shape[0] else None
    if kernel is None:
        return reference_position_fusion(q, points, dir_code, w)
    dir_bias = kernel_ready(F.linear(dir_code.float(), w.dir_w, w.b1), torch.float32)
    out = torch.empty(q.shape, dtype=torch.float32)
    kernel(kernel_ready(q, torch.float32), kernel_ready(points, torch.float32), dir_bias, *w.kernel_arguments(), out)
    return out
