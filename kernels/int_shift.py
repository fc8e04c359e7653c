"""Integer shift layer on AVX-512 VNNI: y = act((int32(q(x) . w_int) * s_t) * 2^(c_o + p_min) + b).

The semantics (and the ground truth, `int_shift_reference`) are in `gnt_shiftadd/shiftadd/int_shift.py`. One
kernel per token tile does everything: per-token absmax (or the calibrated per-tensor absmax), rounding to
fixed point, the integer dot products, and the fp32 rescale + bias + ReLU epilogue, so only x and y touch memory.

Arithmetic (the option that won in benchmarks/int_shift_options.py):
  * 8-bit activations: `vpdpbusd` (u8 x s8 -> s32, 4 products per lane). The signed activation q in [-127, 127]
    goes in as u8 = q + 128; the accumulator starts at -128 * sum_i w_int[o, i] (per-output compensation), so the
    result is exactly sum_i q w_int. Weights must be int8 (exponent span <= 6).
  * 16-bit activations: `vpdpwssd` (s16 x s16 -> s32, 2 products per lane), weights as int16.
Weights are packed [out/16, in/G, 16 * G] (G = 4 bytes or 2 words: the products one 32-bit lane sums), so one
512-bit load feeds 16 output channels; a token's G activations are one broadcast 32-bit word, reused across the
JB output blocks of a micro-tile, and TILE x JB accumulators stay in registers: the reduction over the inputs is
unrolled at parse time with every accumulator a bound value (`dot_products_and_epilogue`), since an accumulator
buffer was written back to memory after every dot product (2.6x slower at 128 -> 32, results/int_shift_options_cpu.json).

Layout: x [tiles, TILE, in_padded] fp32 (tile count symbolic: one build serves every token count; the wrapper
pads tokens to a whole tile and inputs to a multiple of 16 with zeros, which change neither absmax nor sums).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from gnt_shiftadd.shiftadd.int_shift import ABSMAX_FLOOR, IntShiftLinear, export_int_shift, int_shift_reference
from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, note_kernel, run_tiled, warn_once

__all__ = ["IntShiftWeights", "export_8bit", "absmax_vector", "stack_outputs", "prepare_int_shift", "make_int_shift", "int_shift", "reference_from_weights", "vnni_available",
           "make_int_ffn", "int_ffn", "reference_int_ffn", "int_ffn_sublayer", "reference_int_ffn_sublayer", "FFN_TILE", "FFN_BLOCKS",
           "micro_tile", "DEFAULT_TILE", "ACTIVATIONS"]

ACTIVATIONS = ("none", "relu")
DEFAULT_TILE = 4  # tokens per micro-tile (x JB output blocks of 16 int32 accumulators, all in zmm registers)


def micro_tile(out_padded: int) -> tuple[int, int]:
    """(tokens, output blocks) per micro-tile: 4 x 2 for wide layers, 8 x 2 for 32 outputs (the fastest in
    results/int_shift_options_cpu.json; 4 x 4 needs 16 accumulators + operands, more than 32 zmm registers)."""
    return (4, 2) if out_padded >= 64 else (8, 2)
LANES = 16  # int32 lanes of a 512-bit register
TILES_PER_TASK = 16  # token tiles per parallel task: the tile's scratch buffers are allocated once per task


@lru_cache(maxsize=1)
def vnni_available() -> bool:
    """True when this CPU has AVX-512 VNNI (read from /proc/cpuinfo; False where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "avx512_vnni" in line.split() for line in text.splitlines())


def _group(bits: int) -> int:
    """Products summed per 32-bit lane: 4 bytes (vpdpbusd) or 2 words (vpdpwssd)."""
    return 4 if bits == 8 else 2


@dataclass
class IntShiftWeights:
    """An IntShiftLinear in the kernel layout (CPU tensors, 64-byte aligned).

    packed int8/int16 [out_p / 16, in_p / G, 16 G]; compensation int32 [out_p] (the accumulator's start value);
    out_scale, bias fp32 [out_p]; absmax fp32 [1] (per-tensor, or 0 for per-token). in_p, out_p: the multiples of
    16 the kernel runs on; in_features, out_features: the layer's own sizes.
    """

    packed: torch.Tensor
    compensation: torch.Tensor
    out_scale: torch.Tensor
    bias: torch.Tensor
    absmax: torch.Tensor
    bits: int
    per_token: bool
    in_features: int
    out_features: int

    @property
    def in_padded(self) -> int:
        return self.packed.shape[1] * _group(self.bits)

    @property
    def out_padded(self) -> int:
        return self.packed.shape[0] * LANES

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.compensation, self.out_scale, self.bias, self.absmax

    @classmethod
    def eight_bit(cls, parts, in_features: int, out_features: int, absmax: torch.Tensor | None = None
                  ) -> "IntShiftWeights":
        """An 8-bit layer from its (packed, compensation, out_scale, bias), as the fused kernels' custom ops receive
        it: per token when absmax is None, else per tensor with that calibrated absmax (a 1-element view); no
        copies."""
        per_token = absmax is None
        return cls(*parts, absmax=parts[0].new_zeros(1, dtype=torch.float32) if per_token else absmax, bits=8,
                   per_token=per_token, in_features=in_features, out_features=out_features)


def export_8bit(layers: dict, where: str) -> tuple[dict, bool]:
    """export_int_shift of every layer for a fused integer kernel, which computes 8-bit layers with int8 weights that
    all share one activation-scale mode (per token, or per tensor with calibrated absmax): ({name: exported},
    per_token); ValueError naming the kernel and the layer otherwise."""
    exported, modes = {}, set()
    for name, layer in layers.items():
        if not isinstance(layer, IntShiftLinear) or layer.activation_bits != 8:
            raise ValueError(f"{where}: {name} is not an 8-bit IntShiftLinear")
        exported[name] = export_int_shift(layer)
        if exported[name]["weight_int"].dtype != torch.int8:
            raise ValueError(f"{where}: {name} needs int8 weights (exponent span <= 6)")
        modes.add(layer.act_scale)
    if len(modes) > 1:
        raise ValueError(f"{where}: the layers mix activation scales {sorted(modes)}; the kernel needs one mode")
    return exported, modes == {"per_token"}


def absmax_vector(layers: list[IntShiftWeights]) -> torch.Tensor:
    """The layers' calibrated activation absmax side by side, fp32 [len] (zeros per token): the one tensor a fused
    kernel reads its per-tensor scales from."""
    return kernel_ready(torch.cat([layer.absmax.reshape(1) for layer in layers]), torch.float32)


def stack_outputs(exported: list[dict]) -> dict:
    """Layers that read the same input in the same format (per token, or per tensor with one calibrated absmax), as
    one layer whose outputs are theirs side by side (their quantizations of that input are identical, so one serves
    them all): export_int_shift dicts -> one (a missing bias becomes zeros). ValueError for different absmax."""
    calibrated = {None if e["absmax"] is None else float(e["absmax"].reshape(())) for e in exported}
    if len(calibrated) > 1:
        raise ValueError(f"stacked integer layers read one input but were calibrated to different activation absmax "
                         f"{sorted(map(str, calibrated))}: they cannot share its quantization")
    biases = [e["bias"] if e["bias"] is not None else torch.zeros(e["weight_int"].shape[0]) for e in exported]
    return {**exported[0], "weight_int": torch.cat([e["weight_int"] for e in exported]),
            "out_scale": torch.cat([e["out_scale"] for e in exported]), "bias": torch.cat(biases)}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def prepare_int_shift(packed: dict) -> IntShiftWeights:
    """`export_int_shift(module)` output -> the kernel layout (once per layer)."""
    bits = int(packed["bits"])
    weight = packed["weight_int"].cpu()
    out_features, in_features = weight.shape
    if bits == 8 and weight.dtype != torch.int8:
        raise ValueError(f"int_shift: 8-bit activations need int8 weights (exponent span <= 6), got {weight.dtype}")
    if weight.dtype not in (torch.int8, torch.int16):
        raise ValueError(f"int_shift: weight_int must be int8 or int16, got {weight.dtype}")
    group = _group(bits)
    in_p, out_p = _round_up(max(in_features, 1), LANES), _round_up(max(out_features, 1), LANES)
    wide = F.pad(weight.to(torch.int32), (0, in_p - in_features, 0, out_p - out_features))
    # [out_p, in_p] -> [out_p/16, 16, in_p/G, G] -> [out_p/16, in_p/G, 16, G]: lane o's G weights are contiguous.
    blocks = wide.reshape(out_p // LANES, LANES, in_p // group, group).permute(0, 2, 1, 3)
    layout = blocks.reshape(out_p // LANES, in_p // group, LANES * group)
    compensation = (-128 * wide.sum(dim=1)) if bits == 8 else torch.zeros(out_p, dtype=torch.int32)
    bias = packed["bias"] if packed["bias"] is not None else torch.zeros(out_features)
    absmax = packed["absmax"] if packed["absmax"] is not None else torch.zeros(1)
    return IntShiftWeights(
        packed=kernel_ready(layout.to(torch.int8 if bits == 8 else torch.int16)),
        compensation=kernel_ready(compensation.to(torch.int32)),
        out_scale=kernel_ready(F.pad(packed["out_scale"].float().cpu(), (0, out_p - out_features))),
        bias=kernel_ready(F.pad(bias.float().cpu(), (0, out_p - out_features))),
        absmax=kernel_ready(absmax.float().cpu().reshape(1)),
        bits=bits, per_token=packed["absmax"] is None, in_features=in_features, out_features=out_features)


def _blocks_per_pass(out_blocks: int, wanted: int) -> int:
    for candidate in (wanted, 4, 2, 1):
        if candidate <= out_blocks and out_blocks % candidate == 0:
            return candidate
    return 1


class _KernelParts:
    """The pieces both integer kernels are made of, for one activation width and token tile; used while a kernel
    is parsed (TVMScript), so they emit TIR into the enclosing loop nest.

    quantize(src, t, width, xq, scale, per_token, absmax, nonnegative): tokens src[t, 0..tile) [width fp32] ->
        xq [tile, width] (fixed point, +128 for vpdpbusd), scale[i] (dequantization), by the token's own absmax or
        the calibrated one.
    dot_products(xq, weights..., scale, p, width_in, blocks_per_pass, store): output blocks p*JB .. p*JB+JB-1 of
        every token of the tile, rescaled (fp32(acc) * scale_t * 2^(c_o + p_min) + b_o) and handed to
        store(i, block, value), which applies the activation / residual and writes.
    layer(src, t, width, xq, scale, per_token, absmax, packed, compensation, out_scale, bias, out_blocks, jb, store,
          nonnegative): one integer layer on a tile: quantize, then every pass of dot_products.
    layer_norm(x, t, normed, ln_w, ln_b, eps): normed[0, i, :] = LN(x[t, i, :]) for the tile's tokens.
    """

    def __init__(self, bits: int, tile: int):
        from tvm.script import tirx as T  # lazy: TVM is optional

        self.T, self.tile, self.bits = T, tile, bits
        self.group = _group(bits)
        self.level = float((1 << (bits - 1)) - 1)
        self.q_dtype = "uint8" if bits == 8 else "int16"
        self.w_dtype = "int8" if bits == 8 else "int16"
        self.word_type = f"{self.w_dtype}x{64 if bits == 8 else 32}"  # operands of one 512-bit register
        self.intrinsic = "llvm.x86.avx512.vpdpbusd.512" if bits == 8 else "llvm.x86.avx512.vpdpwssd.512"
        quantize, dot_products = self.quantize, self.dot_products

        @T.macro
        def layer(src, t, width_in, xq, scale, per_token, absmax, packed, compensation, out_scale, bias, out_blocks,
                  jb, store, nonnegative):
            quantize(src, t, width_in, xq, scale, per_token, absmax, nonnegative)
            for p in T.serial(out_blocks // jb):
                dot_products(xq, packed, compensation, out_scale, bias, scale, p, width_in, jb, store)

        self.layer = layer

    def horizontal(self, value, combine):
        """combine over the 16 lanes of a vector value, in 4 halving steps on register shuffles (lanes k and k + 8,
        then k and k + 4, ...): a scalar, emitted while the enclosing kernel is parsed. (Through a buffer, the same
        tree made LLVM scalarize its 8-lane step.)"""
        T, width = self.T, LANES // 2
        while width >= 1:
            low = T.Shuffle([value], [T.int32(k) for k in range(width)])
            high = T.Shuffle([value], [T.int32(width + k) for k in range(width)])
            value = T.bind(combine(low, high))
            width //= 2
        return value

    def calibration(self, calibrated_absmax):
        """A per-tensor layer's (inv, scale): level / max(absmax, floor) and its inverse step, the two IEEE divisions
        every per-tensor quantization of that layer uses (expressions, emitted where this is called)."""
        T, level = self.T, self.T.float32(self.level)
        peak = T.max(calibrated_absmax, T.float32(float(ABSMAX_FLOOR)))
        return level / peak, peak / level

    def quantize(self, src, t, width, xq, scale, per_token, absmax, nonnegative=False, absmax_index=0,
                 calibrated=None):
        """Tokens src[t, 0..tile) [width fp32] -> xq [tile, width] (fixed point, +128 for vpdpbusd) and scale[i]
        (dequantization), by each token's own absmax or the calibrated one; unrolled at parse time, every value a
        register. The absmax is an integer max over the |x| bit patterns (ordered like the floats, exact in any
        order); rounding is one vcvtps2dq (round to nearest even, as nearbyint). nonnegative (ReLU outputs) drops
        |x| and the lower clamp, which change nothing there. Per tensor: absmax[absmax_index] is the calibrated
        absmax, its two divisions done once for the whole tile (LLVM does not hoist them past the tile's stores),
        or `calibrated` = (inv, scale) as `calibration` gives them, computed once by the caller (kernels that
        quantize one token per call hoist them out of their token loop)."""
        T, level = self.T, self.level
        lanes = lambda kv: T.Ramp(kv * LANES, 1, LANES)  # noqa: E731
        if not per_token:
            inv, step = calibrated if calibrated is not None else self.calibration(absmax[absmax_index])
            calibrated_inv, calibrated_scale = T.bind(inv), T.bind(step)
        for i in range(self.tile):
            rows = [T.bind(src[t, i, lanes(kv)]) for kv in range(int(width) // LANES)]
            if per_token:
                magnitudes = [row if nonnegative else T.abs(row) for row in rows]
                running = magnitudes[0]
                for magnitude in magnitudes[1:]:
                    running = T.max(running, magnitude)
                peak = T.reinterpret("float32", T.call_llvm_pure_intrin(
                    "int32", "llvm.vector.reduce.smax", T.reinterpret(f"int32x{LANES}", running)))
                clamped_peak = T.bind(T.max(peak, T.float32(float(ABSMAX_FLOOR))))
                inv = T.bind(T.float32(level) / clamped_peak)
                T.buffer_store(scale, clamped_peak / T.float32(level), [i])
            else:
                inv = calibrated_inv
                T.buffer_store(scale, calibrated_scale, [i])
            for kv, row in enumerate(rows):
                T.buffer_store(xq, self.fixed_point(row, inv, nonnegative), [i, lanes(kv)])

    def fixed_point(self, row, inv, nonnegative=False):
        """16 fp32 values -> their fixed-point codes as the dot products read them: clamp(round_half_even(row * inv),
        -Q, Q) (+128 for vpdpbusd), one vcvtps2dq; nonnegative drops the lower clamp."""
        T, level = self.T, self.level
        scaled = row * T.Broadcast(inv, LANES)
        if not nonnegative:
            scaled = T.max(scaled, T.Broadcast(T.float32(-level), LANES))
        clamped = T.min(scaled, T.Broadcast(T.float32(level), LANES))
        rounded = T.call_llvm_pure_intrin(f"int32x{LANES}", "llvm.x86.avx512.mask.cvtps2dq.512", clamped,
                                          T.Broadcast(T.int32(0), LANES), T.int16(-1), T.int32(4))
        offset = 128 if self.bits == 8 else 0
        return T.Cast(f"{self.q_dtype}x{LANES}", rounded + T.Broadcast(T.int32(offset), LANES))

    def layer_norm(self, x, t, normed, ln_w, ln_b, eps: float) -> None:
        """normed[0, i, :] = LN(x[t, i, :]) (fp32: mean, centred squares, rsqrt) for the tile's tokens, unrolled at
        parse time with every row a register value; the tokens' dependency chains are independent, so they overlap."""
        T, width = self.T, int(normed.shape[2])
        lanes = lambda kv: T.Ramp(kv * LANES, 1, LANES)  # noqa: E731
        for i in range(self.tile):
            rows = [T.bind(x[t, i, lanes(kv)]) for kv in range(width // LANES)]
            total = rows[0]
            for row in rows[1:]:
                total = total + row
            mean = T.bind(self.horizontal(T.bind(total), lambda a, b: a + b) / T.float32(width))
            centred = [T.bind(row - T.Broadcast(mean, LANES)) for row in rows]
            squares = centred[0] * centred[0]
            for row in centred[1:]:
                squares = squares + row * row
            variance = self.horizontal(T.bind(squares), lambda a, b: a + b) / T.float32(width)
            rstd = T.bind(T.float32(1) / T.sqrt(variance + T.float32(eps)))
            for kv, row in enumerate(centred):
                T.buffer_store(normed, row * T.Broadcast(rstd, LANES) * ln_w[lanes(kv)] + ln_b[lanes(kv)],
                               [0, i, lanes(kv)])

    def dot_products(self, xq, packed, compensation, out_scale, bias, scale, p, width_in, jb, store, word=None):
        """Fully unrolled over the input groups: the TILE x JB accumulators are bound values (T.bind), not a
        buffer, so LLVM keeps them in registers for the whole reduction. (A local accumulator buffer lives in TVM's
        workspace memory; LLVM cannot prove it does not alias the activations and stored every accumulator after
        every dot product.) Each group loads its JB weight vectors and TILE broadcast activation words once.
        word(i, kg): token i's G quantized inputs of group kg as one int32 (default: read from xq [tile, width])."""
        T, tile, group = self.T, self.tile, self.group
        if word is None:
            word = lambda i, kg: T.reinterpret("int32", xq[i, T.Ramp(kg * group, 1, group)])  # noqa: E731
        blocks = [p * jb + j for j in range(jb)]
        acc = {(i, j): T.bind(compensation[T.Ramp(blocks[j] * LANES, 1, LANES)]) for i in range(tile) for j in range(jb)}
        for kg in range(width_in // group):
            words = [T.bind(T.reinterpret(self.word_type, T.Broadcast(word(i, kg), LANES))) for i in range(tile)]
            for j in range(jb):
                weight = T.bind(packed[blocks[j], kg, T.Ramp(0, 1, LANES * group)])
                for i in range(tile):
                    acc[i, j] = T.bind(T.call_llvm_pure_intrin(f"int32x{LANES}", self.intrinsic, acc[i, j], words[i],
                                                               weight))
        for i in range(tile):  # one rescale and the bias (out_scale is a power of two: an FMA rounds the same)
            for j in range(jb):
                value = (T.Cast(f"float32x{LANES}", acc[i, j]) * T.Broadcast(scale[i], LANES)) \
                    * out_scale[T.Ramp(blocks[j] * LANES, 1, LANES)] + bias[T.Ramp(blocks[j] * LANES, 1, LANES)]
                store(i, blocks[j], value)

    def relu(self, value):
        return self.T.max(value, self.T.Broadcast(self.T.float32(0), LANES))


def make_int_shift(in_padded: int, out_padded: int, bits: int, per_token: bool, activation: str,
                   tile: int = DEFAULT_TILE, blocks: int = 4):
    """IRModule "main"(x fp32 [tiles, tile, in_padded], packed, compensation int32 [out_padded], out_scale fp32,
    bias fp32 [out_padded], absmax fp32 [1], y fp32 [tiles, tile, out_padded]) for the VNNI CPU target."""
    import tvm  # lazy: TVM is optional (the integer reference runs without it)
    from tvm.script import tirx as T  # lazy: TVM is optional

    if in_padded % LANES or out_padded % LANES:
        raise ValueError(f"int_shift kernel: padded sizes must be multiples of {LANES}, got {in_padded}, {out_padded}")
    parts = _KernelParts(bits, tile)
    out_blocks = out_padded // LANES
    jb = _blocks_per_pass(out_blocks, blocks)
    relu = activation == "relu"

    @T.prim_func
    def main(x_handle: T.handle, packed: T.Buffer((out_blocks, in_padded // parts.group, LANES * parts.group),
                                                  parts.w_dtype),
             compensation: T.Buffer((out_padded,), "int32"), out_scale: T.Buffer((out_padded,), "float32"),
             bias: T.Buffer((out_padded,), "float32"), absmax: T.Buffer((1,), "float32"), y_handle: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        tiles = T.int32()
        x = T.match_buffer(x_handle, (tiles, tile, in_padded), "float32")
        y = T.match_buffer(y_handle, (tiles, tile, out_padded), "float32")
        for chunk in T.parallel((tiles + TILES_PER_TASK - 1) // TILES_PER_TASK):
            xq = T.alloc_buffer((tile, in_padded), parts.q_dtype, scope="local")
            scale = T.alloc_buffer((tile,), "float32", scope="local")
            for within in T.serial(TILES_PER_TASK):
                if chunk * TILES_PER_TASK + within < tiles:
                    t = chunk * TILES_PER_TASK + within
                    parts.layer(x, t, in_padded, xq, scale, per_token, absmax, packed, compensation, out_scale, bias,
                                out_blocks, jb, lambda i, block, value: T.buffer_store(
                                    y, parts.relu(value) if relu else value, [t, i, T.Ramp(block * LANES, 1, LANES)]),
                                False)

    return tvm.IRModule({"main": main})


def make_int_ffn(dim_padded: int, hidden_padded: int, bits: int, per_token: bool, tile: int = DEFAULT_TILE,
                 blocks: tuple[int, int] = (4, 2), norm_eps: float | None = None):
    """A whole integer FFN half-block: y = x + fc2(relu(fc1(h))) with fc1, fc2 integer shift layers (same activation
    width and scale mode), per token tile, so the [tokens, hidden] activations never leave the core.

    norm_eps None: h is an input (the normed tokens): IRModule "main"(h fp32 [tiles, tile, C], x fp32
    [tiles, tile, C] (the residual), fc1's packed, compensation, out_scale, bias, absmax, fc2's (the same five),
    y fp32 [tiles, tile, C]); bit-exact against `reference_int_ffn`.
    norm_eps given: h = LayerNorm(x) is computed in the kernel too (fp32, mean and variance per token, like the
    dense FFN kernel): "main"(x, ln_w [C], ln_b [C], fc1's five, fc2's five, y). C must be the real width."""
    import tvm  # lazy: TVM is optional (the integer reference runs without it)
    from tvm.script import tirx as T  # lazy: TVM is optional

    if dim_padded % LANES or hidden_padded % LANES:
        raise ValueError(f"int_ffn kernel: padded sizes must be multiples of {LANES}, got {dim_padded}, {hidden_padded}")
    parts = _KernelParts(bits, tile)
    group, w_dtype = parts.group, parts.w_dtype
    hidden_blocks, dim_blocks = hidden_padded // LANES, dim_padded // LANES
    jb1, jb2 = _blocks_per_pass(hidden_blocks, blocks[0]), _blocks_per_pass(dim_blocks, blocks[1])

    residual = lambda x, t, y: lambda i, block, value: T.buffer_store(  # noqa: E731
        y, x[t, i, T.Ramp(block * LANES, 1, LANES)] + value, [t, i, T.Ramp(block * LANES, 1, LANES)])

    @T.macro
    def per_token_layers(h, h_tile, x, t, y, xq, hidden, hq, scale, packed1, compensation1, out_scale1, bias1, absmax1,
                         packed2, compensation2, out_scale2, bias2, absmax2):
        parts.layer(h, h_tile, dim_padded, xq, scale, per_token, absmax1, packed1, compensation1, out_scale1, bias1,
                    hidden_blocks, jb1, lambda i, block, value:
                    T.buffer_store(hidden, parts.relu(value), [0, i, T.Ramp(block * LANES, 1, LANES)]), False)
        parts.layer(hidden, 0, hidden_padded, hq, scale, per_token, absmax2, packed2, compensation2, out_scale2,
                    bias2, dim_blocks, jb2, residual(x, t, y), True)  # fc2 reads ReLU outputs

    @T.macro
    def per_tensor_layers(h, h_tile, x, t, y, xq, hidden, hq, scale, packed1, compensation1, out_scale1, bias1,
                          absmax1, packed2, compensation2, out_scale2, bias2, absmax2):
        # fc1's ReLU outputs go straight to fc2's fixed point (its scale is fixed): no fp32 hidden row in memory
        inv2 = T.bind(parts.calibration(absmax2[0])[0])
        scale2 = T.bind(parts.calibration(absmax2[0])[1])
        parts.quantize(h, h_tile, dim_padded, xq, scale, per_token, absmax1, False)
        for p in T.serial(hidden_blocks // jb1):
            parts.dot_products(xq, packed1, compensation1, out_scale1, bias1, scale, p, dim_padded, jb1,
                               lambda i, block, value: T.buffer_store(
                                   hq, parts.fixed_point(parts.relu(value), inv2, True),
                                   [i, T.Ramp(block * LANES, 1, LANES)]))
        for i in T.serial(tile):
            scale[i] = scale2
        for p in T.serial(dim_blocks // jb2):
            parts.dot_products(hq, packed2, compensation2, out_scale2, bias2, scale, p, hidden_padded, jb2,
                               residual(x, t, y))

    layers = per_token_layers if per_token else per_tensor_layers  # chosen here: a macro would parse a conditional
    # fc1's fp32 outputs: per token only (per tensor they go straight to fc2's fixed point; one vector stands in)
    hidden_shape = (1, tile, hidden_padded) if per_token else (1, 1, LANES)

    if norm_eps is None:
        @T.prim_func
        def main(h_handle: T.handle, x_handle: T.handle,
                 packed1: T.Buffer((hidden_blocks, dim_padded // group, LANES * group), w_dtype),
                 compensation1: T.Buffer((hidden_padded,), "int32"), out_scale1: T.Buffer((hidden_padded,), "float32"),
                 bias1: T.Buffer((hidden_padded,), "float32"), absmax1: T.Buffer((1,), "float32"),
                 packed2: T.Buffer((dim_blocks, hidden_padded // group, LANES * group), w_dtype),
                 compensation2: T.Buffer((dim_padded,), "int32"), out_scale2: T.Buffer((dim_padded,), "float32"),
                 bias2: T.Buffer((dim_padded,), "float32"), absmax2: T.Buffer((1,), "float32"), y_handle: T.handle):
            T.func_attr({"global_symbol": "main", "tir.noalias": True})
            tiles = T.int32()
            h = T.match_buffer(h_handle, (tiles, tile, dim_padded), "float32")
            x = T.match_buffer(x_handle, (tiles, tile, dim_padded), "float32")
            y = T.match_buffer(y_handle, (tiles, tile, dim_padded), "float32")
            for chunk in T.parallel((tiles + TILES_PER_TASK - 1) // TILES_PER_TASK):
                xq = T.alloc_buffer((tile, dim_padded), parts.q_dtype, scope="local")
                hidden = T.alloc_buffer(hidden_shape, "float32", scope="local")
                hq = T.alloc_buffer((tile, hidden_padded), parts.q_dtype, scope="local")
                scale = T.alloc_buffer((tile,), "float32", scope="local")
                for within in T.serial(TILES_PER_TASK):
                    if chunk * TILES_PER_TASK + within < tiles:
                        layers(h, chunk * TILES_PER_TASK + within, x, chunk * TILES_PER_TASK + within, y, xq, hidden,
                               hq, scale, packed1, compensation1, out_scale1, bias1, absmax1, packed2, compensation2,
                               out_scale2, bias2, absmax2)
    else:
        @T.prim_func
        def main(x_handle: T.handle, ln_w: T.Buffer((dim_padded,), "float32"),
                 ln_b: T.Buffer((dim_padded,), "float32"),
                 packed1: T.Buffer((hidden_blocks, dim_padded // group, LANES * group), w_dtype),
                 compensation1: T.Buffer((hidden_padded,), "int32"), out_scale1: T.Buffer((hidden_padded,), "float32"),
                 bias1: T.Buffer((hidden_padded,), "float32"), absmax1: T.Buffer((1,), "float32"),
                 packed2: T.Buffer((dim_blocks, hidden_padded // group, LANES * group), w_dtype),
                 compensation2: T.Buffer((dim_padded,), "int32"), out_scale2: T.Buffer((dim_padded,), "float32"),
                 bias2: T.Buffer((dim_padded,), "float32"), absmax2: T.Buffer((1,), "float32"), y_handle: T.handle):
            T.func_attr({"global_symbol": "main", "tir.noalias": True})
            tiles = T.int32()
            x = T.match_buffer(x_handle, (tiles, tile, dim_padded), "float32")
            y = T.match_buffer(y_handle, (tiles, tile, dim_padded), "float32")
            for chunk in T.parallel((tiles + TILES_PER_TASK - 1) // TILES_PER_TASK):
                normed = T.alloc_buffer((1, tile, dim_padded), "float32", scope="local")
                xq = T.alloc_buffer((tile, dim_padded), parts.q_dtype, scope="local")
                hidden = T.alloc_buffer(hidden_shape, "float32", scope="local")
                hq = T.alloc_buffer((tile, hidden_padded), parts.q_dtype, scope="local")
                scale = T.alloc_buffer((tile,), "float32", scope="local")
                for within in T.serial(TILES_PER_TASK):
                    if chunk * TILES_PER_TASK + within < tiles:
                        parts.layer_norm(x, chunk * TILES_PER_TASK + within, normed, ln_w, ln_b, norm_eps)
                        layers(normed, 0, x, chunk * TILES_PER_TASK + within, y, xq, hidden, hq, scale, packed1,
                               compensation1, out_scale1, bias1, absmax1, packed2, compensation2, out_scale2, bias2,
                               absmax2)

    return tvm.IRModule({"main": main})


def int_shift(x: torch.Tensor, weights: IntShiftWeights, activation: str = "none", tile: int | None = None,
              blocks: int | None = None) -> torch.Tensor:
    """x [..., in] (CPU float) -> [..., out] fp32 on the VNNI kernel; the integer reference (one warning) where
    this CPU has no AVX-512 VNNI or the kernel cannot be built."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"int_shift: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.shape[-1] != weights.in_features:
        raise ValueError(f"int_shift: x has {x.shape[-1]} input features, the layer expects {weights.in_features}")
    if x.device.type != "cpu":
        raise ValueError(f"int_shift: the integer kernel runs on CPU, got a tensor on {x.device}")
    default_tile, default_blocks = micro_tile(weights.out_padded)
    tile, blocks = tile or default_tile, blocks or default_blocks
    kernel = None
    if vnni_available():
        key = {"in": weights.in_padded, "out": weights.out_padded, "bits": weights.bits,
               "per_token": weights.per_token, "activation": activation, "tile": tile, "blocks": blocks}
        kernel = get_kernel("int_shift", key, x.device, lambda _: make_int_shift(
            weights.in_padded, weights.out_padded, weights.bits, weights.per_token, activation, tile, blocks))
    else:
        warn_once("int_shift: this CPU has no AVX-512 VNNI; integer shift layers run on the PyTorch reference")
        note_kernel("int_shift", "reference")
    if kernel is None:
        return reference_from_weights(x, weights, activation)
    lead = x.shape[:-1]
    rows = x.reshape(-1, weights.in_features).float()
    if weights.in_padded != weights.in_features:  # odd layer widths only (the model's are multiples of 16)
        rows = F.pad(rows, (0, weights.in_padded - weights.in_features))
    rows = kernel_ready(rows)
    out = torch.empty(rows.shape[0], weights.out_padded, dtype=torch.float32)
    tensors = weights.tensors()

    def launch(inputs, outputs):
        kernel(inputs[0].view(-1, tile, weights.in_padded), *tensors, outputs[0].view(-1, tile, weights.out_padded))

    run_tiled(launch, tile, rows.shape[0], [rows], [out])
    if weights.out_padded != weights.out_features:
        out = out[:, :weights.out_features]
    return out.reshape(*lead, weights.out_features)


# tokens per tile of the fused FFN kernel and output blocks of 16 per pass in fc1 and in fc2: with fc2's two blocks
# in two passes (8 accumulators, not 16, beside the tile's broadcast words) the FFN sublayer took 1.67 ms per
# chunk per tensor and 1.95 ms per token, against 1.80 and 2.01 ms for 8 x (2, 2), the earlier choice; 4 x (2, 1),
# 4 x (4, 1) and 8 x (1, 1) were within 3% of 8 x (2, 1) (results/int_shift_ffn_tiles_cpu.json, paired rounds)
FFN_TILE = 8
FFN_BLOCKS = (2, 1)


def _check_ffn_layers(name: str, dim: int, fc1: IntShiftWeights, fc2: IntShiftWeights, device: torch.device) -> None:
    """ValueError unless fc1 (C -> H) and fc2 (H -> C) chain on `dim` channels with one activation format, on CPU."""
    if (fc1.in_features, fc1.out_features, fc2.in_features, fc2.out_features) != (dim, fc2.in_features, fc1.out_features, dim):
        raise ValueError(f"{name}: layers {fc1.in_features}->{fc1.out_features}, {fc2.in_features}->{fc2.out_features} "
                         f"do not form an FFN on {dim} channels")
    if (fc1.bits, fc1.per_token) != (fc2.bits, fc2.per_token):
        raise ValueError(f"{name}: both layers must have the same activation width and scale mode")
    if device.type != "cpu":
        raise ValueError(f"{name}: the integer kernel runs on CPU, got a tensor on {device}")


def int_ffn(normed: torch.Tensor, x: torch.Tensor, fc1: IntShiftWeights, fc2: IntShiftWeights,
            tile: int | None = None, blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """x + fc2(relu(fc1(normed))) for integer shift layers fc1 (C -> H) and fc2 (H -> C) in one VNNI kernel:
    normed, x [..., C] (CPU float; normed = the block's LayerNorm of x) -> [..., C] fp32, bit-identical to
    `reference_int_ffn`; the reference (one warning) where this CPU has no AVX-512 VNNI or no kernel builds."""
    dim = x.shape[-1]
    if normed.shape != x.shape:
        raise ValueError(f"int_ffn: normed {tuple(normed.shape)} and x {tuple(x.shape)} must have the same shape")
    _check_ffn_layers("int_ffn", dim, fc1, fc2, x.device)
    tile, blocks = tile or FFN_TILE, tuple(blocks or FFN_BLOCKS)
    kernel = None
    if vnni_available():
        key = {"dim": fc1.in_padded, "hidden": fc1.out_padded, "bits": fc1.bits, "per_token": fc1.per_token,
               "tile": tile, "blocks": list(blocks)}
        kernel = get_kernel("int_ffn", key, x.device, lambda _: make_int_ffn(
            fc1.in_padded, fc1.out_padded, fc1.bits, fc1.per_token, tile, blocks))
    else:
        warn_once("int_ffn: this CPU has no AVX-512 VNNI; integer FFNs run on the PyTorch reference")
        note_kernel("int_ffn", "reference")
    if kernel is None:
        return reference_int_ffn(normed, x, fc1, fc2)
    lead = x.shape[:-1]
    rows = [t.reshape(-1, dim).float() for t in (normed, x)]
    if fc1.in_padded != dim:  # odd widths only (the model's are multiples of 16)
        rows = [F.pad(r, (0, fc1.in_padded - dim)) for r in rows]
    rows = [kernel_ready(r) for r in rows]
    out = torch.empty(rows[0].shape[0], fc1.in_padded, dtype=torch.float32)
    tensors = (*fc1.tensors(), *fc2.tensors())

    def launch(inputs, outputs):
        kernel(*(t.view(-1, tile, fc1.in_padded) for t in inputs), *tensors, outputs[0].view(-1, tile, fc1.in_padded))

    run_tiled(launch, tile, rows[0].shape[0], rows, [out])
    return out[:, :dim].reshape(*lead, dim)


def int_ffn_sublayer(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float, fc1: IntShiftWeights,
                     fc2: IntShiftWeights, tile: int | None = None, blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """x + fc2(relu(fc1(LayerNorm(x)))) in one VNNI kernel, the LayerNorm (ln_w, ln_b [C], eps) included: x [..., C]
    (CPU float) -> [..., C] fp32. The LN is fp32 arithmetic in another order than PyTorch's, so an activation whose
    scaled value lies within rounding of a .5 step may quantize one step apart from `reference_int_ffn_sublayer`;
    the integer part is `int_ffn`'s, bit-exact given the same normed input. Widths that are not a multiple of 16
    run the LN in PyTorch and `int_ffn` (padding would enter the kernel's mean and variance)."""
    dim = x.shape[-1]
    if tuple(ln_w.shape) != (dim,) or tuple(ln_b.shape) != (dim,):
        raise ValueError(f"int_ffn_sublayer: ln_w and ln_b must be [{dim}], got {tuple(ln_w.shape)}, {tuple(ln_b.shape)}")
    if fc1.in_padded != dim:
        return int_ffn(F.layer_norm(x.float(), (dim,), ln_w, ln_b, eps), x, fc1, fc2, tile, blocks)
    _check_ffn_layers("int_ffn_sublayer", dim, fc1, fc2, x.device)
    tile, blocks = tile or FFN_TILE, tuple(blocks or FFN_BLOCKS)
    kernel = None
    if vnni_available():
        key = {"dim": dim, "hidden": fc1.out_padded, "bits": fc1.bits, "per_token": fc1.per_token, "tile": tile,
               "blocks": list(blocks), "norm_eps": float(eps)}
        kernel = get_kernel("int_ffn_sublayer", key, x.device, lambda _: make_int_ffn(
            dim, fc1.out_padded, fc1.bits, fc1.per_token, tile, blocks, norm_eps=float(eps)))
    else:
        warn_once("int_ffn_sublayer: this CPU has no AVX-512 VNNI; integer FFNs run on the PyTorch reference")
        note_kernel("int_ffn_sublayer", "reference")
    if kernel is None:
        return reference_int_ffn_sublayer(x, ln_w, ln_b, eps, fc1, fc2)
    lead = x.shape[:-1]
    rows = kernel_ready(x.reshape(-1, dim).float())
    out = torch.empty(rows.shape[0], dim, dtype=torch.float32)
    norm = (kernel_ready(ln_w.detach(), torch.float32), kernel_ready(ln_b.detach(), torch.float32))
    tensors = (*fc1.tensors(), *fc2.tensors())

    def launch(inputs, outputs):
        kernel(inputs[0].view(-1, tile, dim), *norm, *tensors, outputs[0].view(-1, tile, dim))

    run_tiled(launch, tile, rows.shape[0], [rows], [out])
    return out.reshape(*lead, dim)


def reference_int_ffn_sublayer(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float,
                               fc1: IntShiftWeights, fc2: IntShiftWeights) -> torch.Tensor:
    """Ground truth of `int_ffn_sublayer`: PyTorch's LayerNorm, then `reference_int_ffn`."""
    return reference_int_ffn(F.layer_norm(x.float(), (x.shape[-1],), ln_w, ln_b, eps), x, fc1, fc2)


def reference_int_ffn(normed: torch.Tensor, x: torch.Tensor, fc1: IntShiftWeights, fc2: IntShiftWeights) -> torch.Tensor:
    """Ground truth of the fused integer FFN: the two integer layers' references and the residual add."""
    return x.float() + reference_from_weights(reference_from_weights(normed, fc1, "relu"), fc2)


def reference_from_weights(x: torch.Tensor, weights: IntShiftWeights, activation: str = "none") -> torch.Tensor:
    """`int_shift_reference` on the kernel-layout weights (unpacks them): the fallback and the tests' oracle."""
    group = _group(weights.bits)
    out_blocks, k_groups = weights.packed.shape[:2]
    wide = weights.packed.reshape(out_blocks, k_groups, LANES, group).permute(0, 2, 1, 3)
    weight = wide.reshape(out_blocks * LANES, k_groups * group)[:weights.out_features, :weights.in_features]
    packed = {"weight_int": weight, "out_scale": weights.out_scale[:weights.out_features],
              "bias": weights.bias[:weights.out_features], "bits": weights.bits,
              "absmax": None if weights.per_token else weights.absmax}
    return int_shift_reference(x, packed, activation)
