"""The attention half of a ray-transformer block with integer shift layers and the hashed core, in one VNNI kernel
per ray (CPU): for ShiftAdd variants whose ray-attention linears are all 8-bit IntShiftLinear (per-token scales, or
calibrated per-tensor ones) and whose core is ShiftAddViT's hashed quadratic attention (j, k).

Without it the block runs as ~12 ops over the whole chunk (LN, three integer layers that each quantize the same
normed tokens, head transposes, hash + pack of q and of k, the popcount softmax, a transpose back, the integer
out_fc, the residual). Here one ray's 24 tokens never leave L1:

    xn      = LN(x)                                            [S, C]   (in the kernel, or PyTorch's: norm_in_kernel)
    q|k|v   = int(xn) @ [Wq; Wk; Wv]^T                         [S, 3C]  (one quantization per token serves all three:
                                                                         the layers quantize the same input alike)
    code    = bits of (q_h W_h + b_h >= 0), one int32 per head and token (n <= 32 bits)
    pc      = popcount(code_q ^ code_k)                        [H, S, S] (vector over the queries)
    att     = softmax_keys(scale_h (n - 2 pc)) v_h             [C, S]   (the softmax weights R^(pc - min pc) from
                                                                         a table, no exp; channels-major: the next
                                                                         quantization's absmax is a vector max)
    out     = x + int(att) @ Wo^T + bo                          [S, C]

The integer layers compute what their modules compute (`int_shift_reference`): q|k|v bit-exact given the same
normed tokens; out_fc's input comes from the softmax, whose weights (table powers, or an exp polynomial for vectors
of fewer than 8 queries) and sums round in their own order, so an activation within rounding of a .5 step may
quantize one step apart (as may q|k|v with the LN in the kernel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.shiftadd.int_shift import ABSMAX_FLOOR, rounding_tie_distance
from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, note_kernel
from kernels.int_shift import LANES, IntShiftWeights, _KernelParts, absmax_vector, export_8bit, prepare_int_shift, \
    reference_from_weights, stack_outputs, vnni_available
from kernels.te_math import script_exp, vector_lanes

__all__ = ["IntRayWeights", "softmax_table", "reference_int_ray_attention", "make_int_ray_attention",
           "int_ray_attention", "quantization_margins"]

RAYS_PER_TASK = 8  # rays per parallel task: the scratch buffers are allocated once per task
_LEVEL = 127.0  # 8-bit activations
_TABLE = 16  # entries per half of a head's softmax table (IntRayWeights.softmax_table)
_PERMUTES = {8: "llvm.x86.avx2.permps", 16: "llvm.x86.avx512.permvar.sf.512"}  # in-register table lookups


@dataclass(frozen=True, eq=False)
class IntRayWeights:
    """A ray block's attention half in the kernel layout: ln_w, ln_b [C] and eps (the block's LayerNorm); qkv
    (q_fc, k_fc, v_fc stacked, C -> 3C) and out (C -> C) as IntShiftWeights, 8-bit, both per token or both per
    tensor (act_absmax fp32 [2]: their calibrated absmax, zeros per token); the hashed core's
    scale [H], hash_w [H, d, n], hash_b [H, n] (fp32 snapshots); and the softmax in popcount form:

    logit_j = s (n - 2 pc_j), so exp(logit_j - max logit) = R^(pc_j - min pc) with R = exp(-2 |s|), where a head
    with s < 0 has its query codes flipped (pc -> n - pc): flip [H] int32 (the n-bit mask or 0);
    softmax_table [H, 33] fp32: R^k (k < 16), R^(8 m) (m < 16), |s|."""

    ln_w: torch.Tensor
    ln_b: torch.Tensor
    eps: float
    qkv: IntShiftWeights
    out: IntShiftWeights
    heads: int
    scale: torch.Tensor
    hash_w: torch.Tensor
    hash_b: torch.Tensor
    softmax_table: torch.Tensor
    flip: torch.Tensor
    act_absmax: torch.Tensor
    per_token: bool

    @property
    def channels(self) -> int:
        return self.out.in_features

    @property
    def n_bits(self) -> int:
        return self.hash_w.shape[-1]

    @classmethod
    def from_modules(cls, norm: nn.Module, attention: nn.Module) -> "IntRayWeights":
        """ValueError unless norm is an affine nn.LayerNorm and attention a RayAttention whose q/k/v/out linears are
        all 8-bit IntShiftLinear with int8 weights in one activation-scale mode (per tensor: q, k, v calibrated
        alike, as they share one quantization) and whose core is a HashedQuadraticAttention with 16 or
        32 bits (one int32 code per head), on C a multiple of 16."""
        from gnt_shiftadd.models.transformers import RayAttention  # the model side; kernels only read its layers
        from gnt_shiftadd.shiftadd.hashed_attention import HashedQuadraticAttention

        if type(attention) is not RayAttention or type(attention.core) is not HashedQuadraticAttention:
            raise ValueError("integer ray attention: needs a RayAttention with a HashedQuadraticAttention core")
        if type(norm) is not nn.LayerNorm or norm.weight is None or norm.bias is None:
            raise ValueError("integer ray attention: the block's norm must be an affine nn.LayerNorm")
        names = ("q_fc", "k_fc", "v_fc", "out_fc")
        by_name, per_token = export_8bit({name: getattr(attention, name) for name in names}, "integer ray attention")
        exported = [by_name[name] for name in names]
        channels = attention.q_fc.in_features
        hasher = attention.core.hasher
        if channels % LANES or hasher.n_bits not in (16, 32):
            raise ValueError(f"integer ray attention: needs C % 16 == 0 and 16 or 32 hash bits, got C={channels}, "
                             f"n={hasher.n_bits}")
        try:
            qkv = stack_outputs(exported[:3])
        except ValueError as error:
            raise ValueError(f"integer ray attention: q_fc, k_fc, v_fc: {error}") from error
        snapshot = lambda t: kernel_ready(t.detach().float().cpu().clone(), torch.float32)  # noqa: E731
        scale = snapshot(attention.core.scale)
        table, flip = softmax_table(scale, hasher.n_bits)
        qkv, out = prepare_int_shift(qkv), prepare_int_shift(exported[3])
        return cls(ln_w=snapshot(norm.weight), ln_b=snapshot(norm.bias), eps=float(norm.eps), qkv=qkv, out=out,
                   heads=attention.num_heads, scale=scale, hash_w=snapshot(hasher.weight),
                   hash_b=snapshot(hasher.bias), softmax_table=table, flip=flip, act_absmax=absmax_vector([qkv, out]),
                   per_token=per_token)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every weight tensor (what the custom op takes)."""
        return (self.ln_w, self.ln_b, *self.qkv.tensors()[:4], *self.out.tensors()[:4], self.scale, self.hash_w,
                self.hash_b, self.softmax_table, self.flip, self.act_absmax)

    def kernel_arguments(self) -> tuple[torch.Tensor, ...]:
        """The kernel's weight arguments in call order."""
        return (self.ln_w, self.ln_b, *self.qkv.tensors()[:4], *self.out.tensors()[:4], self.softmax_table,
                self.flip, self.hash_w, self.hash_b, self.act_absmax)

    @classmethod
    def from_tensors(cls, ln_w, ln_b, qkv_w, qkv_c, qkv_s, qkv_b, out_w, out_c, out_s, out_b, scale, hash_w, hash_b,
                     softmax_table, flip, act_absmax, eps: float, per_token: bool) -> "IntRayWeights":
        """Inverse of `tensors()` (what the custom op receives), no copies."""
        channels = ln_w.shape[0]
        calibrated = lambda i: None if per_token else act_absmax[i:i + 1]  # noqa: E731
        return cls(ln_w=ln_w, ln_b=ln_b, eps=float(eps),
                   qkv=IntShiftWeights.eight_bit((qkv_w, qkv_c, qkv_s, qkv_b), channels, 3 * channels, calibrated(0)),
                   out=IntShiftWeights.eight_bit((out_w, out_c, out_s, out_b), channels, channels, calibrated(1)),
                   heads=scale.shape[0], scale=scale, hash_w=hash_w, hash_b=hash_b, softmax_table=softmax_table,
                   flip=flip, act_absmax=act_absmax, per_token=bool(per_token))


def softmax_table(scale: torch.Tensor, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax_table [H, 33] fp32, flip [H] int32) for the heads' scales (IntRayWeights): powers of
    R = exp(-2 |s|) computed in float64 and rounded once."""
    magnitude = scale.detach().double().abs()
    powers = torch.arange(_TABLE, dtype=torch.float64)
    ratio = torch.exp(-2.0 * magnitude)[:, None]
    table = torch.cat([ratio ** powers, ratio ** (8 * powers), magnitude[:, None]], dim=1).float()
    mask = -1 if n_bits == 32 else (1 << n_bits) - 1
    flip = torch.where(scale.detach() < 0, mask, 0).to(torch.int32)
    return kernel_ready(table.contiguous(), torch.float32), kernel_ready(flip.contiguous())


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------------

def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    rays, samples, channels = t.shape
    return t.reshape(rays, samples, heads, channels // heads).transpose(1, 2)  # [R, H, S, d]


def _core_parts(normed: torch.Tensor, w: IntRayWeights):
    """(q|k|v [R, S, 3C], the projections to code bits of q and k [R, H, S, n] each, the attended values [R, S, C]):
    RayAttention's forward with the integer layers and HashedQuadraticAttention, op for op (eval mode)."""
    channels = w.channels
    qkv = reference_from_weights(normed, w.qkv)
    q, k, v = (_heads(t, w.heads) for t in qkv.split(channels, dim=-1))
    projections = [torch.einsum("rhsd,hdn->rhsn", t, w.hash_w) + w.hash_b[None, :, None, :] for t in (q, k)]
    signed_q, signed_k = (torch.where(p >= 0, 1.0, -1.0) for p in projections)
    logits = (signed_q @ signed_k.transpose(-1, -2)) * w.scale[None, :, None, None]
    attended = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).flatten(2)
    return qkv, projections, attended


def reference_int_ray_attention(x: torch.Tensor, w: IntRayWeights) -> torch.Tensor:
    """The ground truth and fallback: x [R, S, C] -> x + out_fc(core(q, k, v)) with q, k, v = the integer layers of
    LN(x), fp32 [R, S, C]; the same values as the modules (PreNormAttention over RayAttention with IntShiftLinear
    layers and a HashedQuadraticAttention core)."""
    x = x.float()
    normed = F.layer_norm(x, (w.channels,), w.ln_w, w.ln_b, w.eps)
    _, _, attended = _core_parts(normed, w)
    return x + reference_from_weights(attended, w.out)


def quantization_margins(x: torch.Tensor, w: IntRayWeights) -> torch.Tensor:
    """Per ray [R], the smallest distance, over everything the kernel rounds or thresholds, from where another
    rounding of its fp32 input could change the result: q|k|v's and out_fc's scaled activations from a .5 step (in
    quantization steps) and the code projections from 0. Tests skip rays whose margin is tiny."""
    x = x.float()
    normed = F.layer_norm(x, (w.channels,), w.ln_w, w.ln_b, w.eps)
    _, projections, attended = _core_parts(normed, w)
    margins = [p.abs().flatten(1).amin(dim=1) for p in projections]
    calibrated = (None, None) if w.per_token else (w.act_absmax[0], w.act_absmax[1])
    margins += [rounding_tie_distance(values, absmax=absmax).flatten(1).amin(dim=1)
                for values, absmax in zip((normed, attended), calibrated)]
    return torch.stack(margins).amin(dim=0)


# ----------------------------------------------------------------------------------------------------------------
# TVM kernel
# ----------------------------------------------------------------------------------------------------------------

def _token_tile(samples: int) -> int:
    """Tokens per integer micro-tile: the largest of 8, 6, 4, 3, 2, 1 that divides the ray's samples."""
    return next(tile for tile in (8, 6, 4, 3, 2, 1) if samples % tile == 0)


def make_int_ray_attention(samples: int, channels: int, heads: int, n_bits: int, eps: float | None,
                           per_token: bool = True):
    """IRModule "main" for the VNNI CPU, one ray per step (ray count symbolic): (normed, x [R * S / T, T, C], ln_w,
    ln_b, the qkv and out layers' packed, compensation, out_scale, bias, softmax_table [H, 33], flip [H],
    hash_w [H, d, n], hash_b [H, n], act_absmax [2], out like x), T = _token_tile(S) tokens per tile. eps given:
    the LN is computed in the kernel (normed is not read: pass x twice); eps None: normed = the block's LN of x
    from the caller. per_token False: q|k|v and out_fc quantize with their calibrated absmax (act_absmax)."""
    import tvm  # lazy: TVM is optional
    from tvm.script import tirx as T

    if channels % LANES or channels % heads or n_bits not in (16, 32):
        raise ValueError(f"int ray attention kernel: needs C % 16 == 0, C % H == 0 and 16 or 32 bits, got C="
                         f"{channels}, H={heads}, n={n_bits}")
    tile = _token_tile(samples)
    per_ray = samples // tile
    parts = _KernelParts(8, tile)
    head_dim = channels // heads
    qkv_blocks, out_blocks, groups = 3 * channels // LANES, channels // LANES, channels // 4
    jb_qkv = 3 if qkv_blocks % 3 == 0 and tile <= 6 else 2 if qkv_blocks % 2 == 0 else 1
    jb_out = 2 if out_blocks % 2 == 0 else 1
    ql = vector_lanes(samples)  # queries per vector in the core and in out_fc's quantization
    lanes = lambda start, width=LANES: start if width == 1 else T.Ramp(start, 1, width)  # noqa: E731
    vec = lambda value: value if ql == 1 else T.Broadcast(value, ql)  # noqa: E731
    suffix = "" if ql == 1 else f"x{ql}"  # the query vectors' dtype suffix (scalars when S is odd)
    layer_shape = lambda outputs: (outputs // LANES, channels // 4, LANES * 4)  # noqa: E731

    def hash_weights(hash_w, hash_b, h):
        """Head h's projection weights [head_dim x n] and bias [n], bound once for all its tokens: they stay in
        registers, so each token's projection is head_dim FMAs that take the token's inputs as embedded broadcasts
        from memory (loading the weights in every FMA instead needed a broadcast instruction per input: 11% slower
        per chunk, bit-identical)."""
        return [T.bind(hash_w[h, e, lanes(0, n_bits)]) for e in range(head_dim)], T.bind(hash_b[h, lanes(0, n_bits)])

    def hash_word(qkv, codes, weights, bias, flip, s, t, h):
        """codes[t, h, s] = head h's code of token s's q (t = 0) or k (t = 1): bit b = (projection b >= 0), all n
        projections in one vector (n lanes), 8 bits per sign-mask move (vmovmskps; LLVM makes the pair of a 16-lane
        compare one kmovw); query codes are XORed with the head's flip mask."""
        projection = T.Broadcast(qkv[s, t * channels + h * head_dim], n_bits) * weights[0]
        for e in range(1, head_dim):
            projection = projection + T.Broadcast(qkv[s, t * channels + h * head_dim + e], n_bits) * weights[e]
        set_bits = T.bind(T.Select(projection + bias >= T.Broadcast(T.float32(0), n_bits),
                                   T.Broadcast(T.int32(-1), n_bits), T.Broadcast(T.int32(0), n_bits)))
        word = None
        for v in range(n_bits // 8):
            half = T.Shuffle([set_bits], [T.int32(v * 8 + k) for k in range(8)])
            bits = T.call_llvm_pure_intrin("int32", "llvm.x86.avx.movmsk.ps.256", T.reinterpret("float32x8", half))
            bits = bits if v == 0 else T.shift_left(bits, T.int32(8 * v))
            word = bits if word is None else T.bitwise_or(word, bits)
        T.buffer_store(codes, T.bitwise_xor(word, flip[h] * (1 - t)), [t, h, s])

    def head_block(qkv, codes, table, attended, h, qb):
        """Head h, queries qb*ql..: the softmax weights over every key from the popcounts, and the weighted sum of v,
        every key unrolled and every value a register; written channels-major to attended [C, S]. With the head's
        scale s > 0 (else the query codes come flipped, see IntRayWeights), exp(logit_j - max_j logit_j) =
        R^(pc_j - min pc) with R = exp(-2 s): two 8-entry table lookups in registers (R^(k & 7) * R^(8 (k >> 3)),
        vpermps), no exp."""
        query_codes = T.bind(codes[0, h, lanes(qb * ql, ql)])
        counts = [T.bind(T.popcount(T.bitwise_xor(query_codes, vec(codes[1, h, j])))) for j in range(samples)]
        fewest = counts[0]
        for count in counts[1:]:
            fewest = T.min(fewest, count)
        fewest = T.bind(fewest)
        if ql in _PERMUTES:
            low, high = T.bind(table[h, lanes(0, ql)]), T.bind(table[h, lanes(_TABLE, ql)])
            permute = lambda values, index: T.call_llvm_pure_intrin(f"float32x{ql}", _PERMUTES[ql], values,  # noqa
                                                                    index)
            exps = [T.bind(permute(low, T.bitwise_and(count - fewest, vec(T.int32(7))))
                           * permute(high, T.shift_right(count - fewest, vec(T.int32(3))))) for count in counts]
        else:  # a vector narrower than 8 queries: exp of the logits' differences
            step = T.bind(vec(T.float32(-2.0)) * vec(table[h, 2 * _TABLE]))  # -2 |s|
            exps = [T.bind(script_exp(T, step * T.Cast(f"float32{suffix}", count - fewest), ql)) for count in counts]
        total = exps[0]
        for e in exps[1:]:
            total = total + e
        total = T.bind(total)
        acc = [None] * head_dim
        for j in range(samples):
            for d in range(head_dim):
                term = exps[j] * vec(qkv[j, 2 * channels + h * head_dim + d])
                acc[d] = T.bind(term if j == 0 else acc[d] + term)
        for d in range(head_dim):
            T.buffer_store(attended, acc[d] / total, [h * head_dim + d, lanes(qb * ql, ql)])

    def quantize_queries(attended, out_scales, words, qb, act_absmax):
        """out_fc's quantization of queries qb*ql.., vector over the queries: the absmax is a max over the channel
        rows (or out_fc's calibrated one), and each group of 4 channels becomes one int32 word per query (its 4
        bytes, +128, as vpdpbusd reads them)."""
        rows = [T.bind(attended[c, lanes(qb * ql, ql)]) for c in range(channels)]
        if per_token:
            running = T.abs(rows[0])
            for row in rows[1:]:
                running = T.max(running, T.abs(row))
        else:
            running = vec(act_absmax[1])
        peak = T.bind(T.max(running, vec(T.float32(float(ABSMAX_FLOOR)))))
        inv = T.bind(vec(T.float32(_LEVEL)) / peak)
        T.buffer_store(out_scales, peak / vec(T.float32(_LEVEL)), [lanes(qb * ql, ql)])
        for kg in range(groups):
            word = None
            for b in range(4):
                clamped = T.min(T.max(rows[4 * kg + b] * inv, vec(T.float32(-_LEVEL))), vec(T.float32(_LEVEL)))
                byte = T.Cast(f"int32{suffix}", T.nearbyint(clamped)) + vec(T.int32(128))
                byte = byte if b == 0 else T.shift_left(byte, vec(T.int32(8 * b)))
                word = byte if word is None else T.bitwise_or(word, byte)
            T.buffer_store(words, word, [kg, lanes(qb * ql, ql)])

    def qkv_tile(x, normed, normed_tile, xq, scale, ln_w, ln_b, act_absmax, row):
        """Quantize tile `row`'s tokens (normed by the caller, or LN here) into xq / scale."""
        if eps is None:
            parts.quantize(normed, row, channels, xq, scale, per_token, act_absmax, False, 0)
        else:
            parts.layer_norm(x, row, normed_tile, ln_w, ln_b, eps)
            parts.quantize(normed_tile, 0, channels, xq, scale, per_token, act_absmax, False, 0)

    @T.macro
    def attention(r, x, normed, normed_tile, xq, scale, qkv, codes, attended, words, out_scales, ln_w, ln_b, qkv_w,
                  qkv_c, qkv_s, qkv_b, out_w, out_c, out_s, out_b, table, flip, hash_w, hash_b, act_absmax, out):
        # q | k | v: one quantization per token, the three layers' outputs side by side
        for tt in T.serial(per_ray):
            qkv_tile(x, normed, normed_tile, xq, scale, ln_w, ln_b, act_absmax, r * per_ray + tt)
            for p in T.serial(qkv_blocks // jb_qkv):
                parts.dot_products(xq, qkv_w, qkv_c, qkv_s, qkv_b, scale, p, channels, jb_qkv,
                                   lambda i, block, value: T.buffer_store(qkv, value,
                                                                          [tt * tile + i, lanes(block * LANES)]))
        for h in T.serial(heads):  # tokens innermost: the head's projection weights stay in registers
            weights, bias = hash_weights(hash_w, hash_b, h)
            for t in T.serial(2):
                for s in T.serial(samples):
                    hash_word(qkv, codes, weights, bias, flip, s, t, h)
        for h in T.serial(heads):
            for qb in T.serial(samples // ql):
                head_block(qkv, codes, table, attended, h, qb)
        for qb in T.serial(samples // ql):
            quantize_queries(attended, out_scales, words, qb, act_absmax)
        # out = x + out_fc(att)
        for tt in T.serial(per_ray):
            for i in T.serial(tile):
                scale[i] = out_scales[tt * tile + i]
            for p in T.serial(out_blocks // jb_out):
                parts.dot_products(None, out_w, out_c, out_s, out_b, scale, p, channels, jb_out,
                                   lambda i, block, value: T.buffer_store(
                                       out, x[r * per_ray + tt, i, lanes(block * LANES)] + value,
                                       [r * per_ray + tt, i, lanes(block * LANES)]),
                                   word=lambda i, kg: words[kg, tt * tile + i])

    @T.macro
    def body(tiles, x, normed, ln_w, ln_b, qkv_w, qkv_c, qkv_s, qkv_b, out_w, out_c, out_s, out_b, table, flip,
             hash_w, hash_b, act_absmax, out):
        for task in T.parallel((tiles // per_ray + RAYS_PER_TASK - 1) // RAYS_PER_TASK):
            normed_tile = T.alloc_buffer((1, tile, channels), "float32", scope="local")
            xq = T.alloc_buffer((tile, channels), "uint8", scope="local")
            scale = T.alloc_buffer((tile,), "float32", scope="local")
            qkv = T.alloc_buffer((samples, 3 * channels), "float32", scope="local")
            codes = T.alloc_buffer((2, heads, samples), "int32", scope="local")
            attended = T.alloc_buffer((channels, samples), "float32", scope="local")
            words = T.alloc_buffer((groups, samples), "int32", scope="local")
            out_scales = T.alloc_buffer((samples,), "float32", scope="local")
            for within in T.serial(RAYS_PER_TASK):
                if task * RAYS_PER_TASK + within < tiles // per_ray:
                    attention(task * RAYS_PER_TASK + within, x, normed, normed_tile, xq, scale, qkv, codes, attended,
                              words, out_scales, ln_w, ln_b, qkv_w, qkv_c, qkv_s, qkv_b, out_w, out_c, out_s, out_b,
                              table, flip, hash_w, hash_b, act_absmax, out)

    @T.prim_func
    def main(normed_h: T.handle, x_h: T.handle, ln_w: T.Buffer((channels,), "float32"),
             ln_b: T.Buffer((channels,), "float32"), qkv_w: T.Buffer(layer_shape(3 * channels), "int8"),
             qkv_c: T.Buffer((3 * channels,), "int32"), qkv_s: T.Buffer((3 * channels,), "float32"),
             qkv_b: T.Buffer((3 * channels,), "float32"), out_w: T.Buffer(layer_shape(channels), "int8"),
             out_c: T.Buffer((channels,), "int32"), out_s: T.Buffer((channels,), "float32"),
             out_b: T.Buffer((channels,), "float32"), table: T.Buffer((heads, 2 * _TABLE + 1), "float32"),
             flip: T.Buffer((heads,), "int32"),
             hash_w: T.Buffer((heads, head_dim, n_bits), "float32"), hash_b: T.Buffer((heads, n_bits), "float32"),
             act_absmax: T.Buffer((2,), "float32"), out_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        tiles = T.int32()
        normed = T.match_buffer(normed_h, (tiles, tile, channels), "float32")  # = x when the LN is in the kernel
        x = T.match_buffer(x_h, (tiles, tile, channels), "float32")
        out = T.match_buffer(out_h, (tiles, tile, channels), "float32")
        body(tiles, x, normed, ln_w, ln_b, qkv_w, qkv_c, qkv_s, qkv_b, out_w, out_c, out_s, out_b, table, flip,
             hash_w, hash_b, act_absmax, out)

    return tvm.IRModule({"main": main})


def int_ray_attention(x: torch.Tensor, w: IntRayWeights, norm_in_kernel: bool = True) -> torch.Tensor:
    """x [R, S, C] (CPU) -> x + out_fc(hashed core(q, k, v of LN(x))) fp32 [R, S, C] on the VNNI kernel;
    norm_in_kernel=False takes the LayerNorm from PyTorch (then q|k|v are bit-exact against the modules). The
    reference (one note) where this CPU has no AVX-512 VNNI or no kernel builds."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != w.channels:
        raise ValueError(f"int_ray_attention: x must be [rays, samples, C={w.channels}], "
                         f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"int_ray_attention: the integer kernel runs on CPU, got a tensor on {x.device}")
    rays, samples, channels = x.shape
    if x.numel() >= 2 ** 31:
        raise ValueError(f"int_ray_attention: {x.numel()} elements exceed int32 indexing; call it per chunk of rays")
    kernel = None
    eps = w.eps if norm_in_kernel else None
    if vnni_available():
        key = {"samples": samples, "channels": channels, "heads": w.heads, "n_bits": w.n_bits, "eps": eps,
               "per_token": w.per_token}
        kernel = get_kernel("int_ray_attention", key, x.device, lambda _: make_int_ray_attention(
            samples, channels, w.heads, w.n_bits, eps, w.per_token))
    else:
        note_kernel("int_ray_attention", "reference")
    if kernel is None:
        return reference_int_ray_attention(x, w)
    out = torch.empty(rays, samples, channels, dtype=torch.float32)
    if rays:
        tile = _token_tile(samples)
        tiled = lambda t: kernel_ready(t, torch.float32).view(-1, tile, channels)  # noqa: E731
        rows = tiled(x)
        normed = rows if norm_in_kernel else tiled(F.layer_norm(x.float(), (channels,), w.ln_w, w.ln_b, w.eps))
        kernel(normed, rows, *w.kernel_arguments(), out.view(-1, tile, channels))
    return out
