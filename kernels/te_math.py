"""What the CPU TE kernels share: scalar math LLVM can vectorize (TVM lowers tirx.exp to one libm call per lane on
CPU), the vector width for a loop, and the register-blocked schedule of a small [rows, in] x [in, out] product;
`script_exp` is the same exp for kernels written in TVMScript, `script_pick` their lane shuffle."""
from __future__ import annotations

import math

__all__ = ["vector_exp", "script_exp", "script_pick", "vector_lanes", "register_blocked"]


def vector_lanes(extent: int) -> int:
    """The widest chunk (16 fp32 = one AVX-512 register, or less) that divides `extent` evenly."""
    return next(lanes for lanes in (16, 8, 4, 2, 1) if extent % lanes == 0)


def register_blocked(sch, name: str, out_extent: int) -> None:
    """Schedule block `name`, a product whose last three loops are (rows, out, reduction over in): for each vector
    chunk of `out`, run over `in` with all rows unrolled inside, so every row's accumulator stays in a register and
    each weight vector is loaded once (the rows: a token's views, or a ray's samples)."""
    block = sch.get_sblock(name)
    row, unit, red = sch.get_loops(block)[-3:]
    chunk, lane = sch.split(unit, factors=[None, vector_lanes(out_extent)])
    sch.reorder(chunk, red, row, lane)
    sch.unroll(row)
    sch.vectorize(lane)
    sch.decompose_reduction(block, red)


def vector_exp(x):
    """exp(x) for fp32 as plain arithmetic, so LLVM vectorizes it.

    exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-0.35, 0.35] (ln 2 split in two constants so
    n ln 2 is exact), exp(r) by its degree-7 Taylor polynomial (truncation < 6e-9, below fp32 rounding), 2^n
    built from the exponent bits. x < -87.3 (below the smallest normal float) gives 0; x is clamped at 88.
    """
    from tvm import te, tirx  # lazy: TVM is optional (the references run without it)

    clamped = te.min(te.max(x, tirx.const(-87.3, "float32")), tirx.const(88.0, "float32"))
    n = tirx.floor(clamped * tirx.const(1.4426950408889634, "float32") + tirx.const(0.5, "float32"))
    r = clamped - n * tirx.const(0.693359375, "float32") + n * tirx.const(2.12194440e-4, "float32")
    poly = tirx.const(1.0 / 5040.0, "float32")
    for order in range(6, -1, -1):
        poly = poly * r + tirx.const(1.0 / math.factorial(order), "float32")
    scale = tirx.reinterpret("float32", tirx.shift_left(n.astype("int32") + 127, 23))
    return tirx.if_then_else(x < tirx.const(-87.3, "float32"), tirx.const(0.0, "float32"), poly * scale)


_SCALEF = {16: ("llvm.x86.avx512.mask.scalef.ps.512", "int16"), 8: ("llvm.x86.avx512.mask.scalef.ps.256", "int8")}
_SCALEF_FLOOR = -104.0  # exp(-104) * 2^24 < the smallest subnormal: vscalefps gives 0 below, no clamp needed


def script_exp(T, x, lanes: int):
    """`vector_exp` for x <= 0 on a vector value of `lanes` fp32, emitted while a TVMScript kernel is parsed (T:
    tvm.script.tirx); the same reduction, polynomial and constants, without the upper clamp (softmax arguments are
    <= 0). On 16 or 8 lanes, 2^n p comes from one vscalefps (p times 2^n, rounded once, as the multiply by the
    exponent-bit power of two is): the same value for x >= -87.3, and below it the tiny value (< 1.3e-38: subnormal
    or 0 from -87.34 on) that 2^n p is instead of vector_exp's 0, in 4 fewer instructions (no int conversion, add,
    shift, compare or blend)."""
    spread = (lambda value: value) if lanes == 1 else (lambda value: T.Broadcast(value, lanes))  # noqa: E731
    f = lambda value: spread(T.float32(value))  # noqa: E731
    suffix = "" if lanes == 1 else f"x{lanes}"
    clamped = T.max(x, f(_SCALEF_FLOOR if lanes in _SCALEF else -87.3))
    n = T.floor(clamped * f(1.4426950408889634) + f(0.5))
    r = clamped - n * f(0.693359375) + n * f(2.12194440e-4)
    poly = f(1.0 / 5040.0)
    for order in range(6, -1, -1):
        poly = poly * r + f(1.0 / math.factorial(order))
    if lanes in _SCALEF:
        intrinsic, mask_type = _SCALEF[lanes]
        rounding = [T.int32(4)] if lanes == 16 else []  # _MM_FROUND_CUR_DIRECTION
        return T.call_llvm_pure_intrin(f"float32{suffix}", intrinsic, poly, n, f(0.0), T.Cast(mask_type, -1),
                                       *rounding)
    scale = T.reinterpret(f"float32{suffix}", T.shift_left(T.Cast(f"int32{suffix}", n) + spread(T.int32(127)),
                                                           spread(T.int32(23))))
    return T.Select(x < f(-87.3), f(0.0), poly * scale)


def script_pick(T, value, indices, width: int = 16):
    """Lanes `indices` of a vector value of `width` lanes (or of a list of such values side by side), emitted while
    a TVMScript kernel is parsed; a narrow input repeats to cover the indices (a TIR shuffle cannot have more lanes
    than its inputs). Pick lanes of loaded or simply bound values: on a long computed expression TVM's simplifier
    pushes the shuffle into it (kernels/blend_head.py)."""
    values = value if isinstance(value, list) else [value]
    return T.Shuffle(values * -(-len(indices) // (width * len(values))), [T.int32(k) for k in indices])
