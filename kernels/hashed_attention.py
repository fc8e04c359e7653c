"""MatAdd kernels for the ray transformer's binary-hashed attention (ShiftAddViT's additive attention), in TVM.

Three kernels, each with a PyTorch reference that is both its ground truth and its fallback:
  * hash_pack:  x [R, H, S, d] -> packed codes [R, H, S, W] int32, bits = (x W_h + b_h >= 0), W = ceil(n / 32);
  * quadratic:  per ray, logits = scale_h * (n - 2 Hamming(q_code, k_code)) (XOR + popcount), a stable softmax
                over the ray's keys and the weighted sum of v, fused so the [S, S] logits never reach global memory;
  * linear:     per ray and head, Q_b (K_b^T V) / max(Q_b K_b^T 1, 1) with {0,1} codes as select-adds: a key's v
                is added to the bit's row when the bit is set, never multiplied by the code. `form="seed"` gives the
                attention part of ShiftAddViT's released form, (0.5 v + Q_b K_b^T V / pi) / (0.5 + Q_b K_b^T 1 / pi)
                (its depthwise-conv branch is an ordinary torch op the caller adds).
These match `gnt_shiftadd.shiftadd.hashed_attention` (pack_bits(codes), HashedQuadraticAttention.forward,
HashedLinearAttention.forward, SeedLinearAttention without the conv). Packing: bit j of word w holds code[32 w + j].

The ray count is symbolic (one build serves every chunk size); heads, samples, head dim and bits are static and part
of the build key. All kernel math is float32 (v in float16/bfloat16 is upcast, the result cast back to v's dtype).
Schedules: CPU parallel over rays, all intermediates computed under that loop (per sample, or per head for the
attention kernels) and vectorised over bits, channels or queries; CUDA one block per ray, one thread per (head, sample),
the ray's key codes and values, per-bit sums or projection weights in shared memory, per-thread rows in registers.
The rays loop is never split: compute_at into a split symbolic loop fails to build in TVM 0.27. Index arithmetic is
int32, so the wrappers refuse tensors of 2^31 elements or more (call them per chunk of rays).
The wrappers are for inference: inputs are detached (no autograd through the kernels).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from gnt_shiftadd.shiftadd.hashed_attention import _compute_dtype, pack_bits
from kernels.dispatch import get_kernel, note_kernel
from kernels.te_math import vector_exp

__all__ = ["reference_hash_pack", "reference_quadratic", "reference_linear", "make_hash_pack", "make_quadratic",
           "make_linear", "hash_pack", "quadratic_attention", "linear_attention", "num_words", "LINEAR_FORMS"]

WORD_BITS = 32
LINEAR_FORMS = ("hashed", "seed")


def num_words(n_bits: int) -> int:
    """int32 words holding n_bits codes."""
    return -(-n_bits // WORD_BITS)


# ------------------------------------------------------------------------------------------------------ references


def reference_hash_pack(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [R, H, S, d], weight [H, d, n], bias [H, n] -> int32 words [R, H, S, ceil(n/32)].

    Bit-identical to pack_bits(BinaryHasher.codes(x)): the same einsum in the same dtype, and the same threshold
    (a projection of exactly 0 gives bit 1, as sign_ste maps 0 to +1).
    """
    dtype = _compute_dtype(x, weight)
    projection = torch.einsum("rhsd,hdn->rhsn", x.to(dtype), weight.to(dtype)) + bias.to(dtype)[None, :, None, :]
    return pack_bits((projection >= 0).to(torch.int64))


def _unpack_bits(words: Tensor, n_bits: int) -> Tensor:
    """int32 words [..., W] -> float32 {0,1} codes [..., n_bits] (inverse of pack_bits)."""
    shifts = torch.arange(WORD_BITS, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift, but only bit 0 is kept
    return bits.reshape(*words.shape[:-1], -1)[..., :n_bits].to(torch.float32)


def reference_quadratic(q_words: Tensor, k_words: Tensor, v: Tensor, scale: Tensor | float, n_bits: int) -> Tensor:
    """q_words [R, H, Sq, W], k_words [R, H, Sk, W], v [R, H, Sk, d], scale [H] -> [R, H, Sq, d] in v's dtype.

    softmax_k(scale_h * (n - 2 Hamming)) @ v in float32, as HashedQuadraticAttention.forward computes it: the
    similarity as the +-1 code product (exactly n - 2 Hamming, and ~5x faster in torch than an int64 popcount).
    """
    heads = q_words.shape[1]
    scale = torch.as_tensor(scale, dtype=torch.float32, device=v.device).expand(heads)
    signed_q, signed_k = (2 * _unpack_bits(words, n_bits) - 1 for words in (q_words, k_words))
    similarity = signed_q @ signed_k.transpose(-1, -2)
    weights = torch.softmax(similarity * scale[None, :, None, None], dim=-1)
    return (weights @ v.to(torch.float32)).to(v.dtype)


def reference_linear(q_words: Tensor, k_words: Tensor, v: Tensor, n_bits: int, form: str = "hashed") -> Tensor:
    """q_words [R, H, Sq, W], k_words [R, H, Sk, W], v [R, H, Sk, d] -> [R, H, Sq, d] in v's dtype.

    form="hashed": Q_b (K_b^T V) / max(Q_b K_b^T 1, 1) (HashedLinearAttention.forward); form="seed":
    (0.5 v + Q_b K_b^T V / pi) / (0.5 + Q_b K_b^T 1 / pi) (SeedLinearAttention without its conv branch, Sq == Sk).
    """
    if form not in LINEAR_FORMS:
        raise ValueError(f"form must be one of {LINEAR_FORMS}, got {form!r}")
    if form == "seed" and q_words.shape[2] != v.shape[2]:
        raise ValueError(f"the seed form needs as many queries as keys, got {q_words.shape[2]} and {v.shape[2]}")
    query_codes, key_codes = _unpack_bits(q_words, n_bits), _unpack_bits(k_words, n_bits)
    values = v.to(torch.float32)
    numerator = query_codes @ (key_codes.transpose(-1, -2) @ values)  # [R, H, Sq, d]
    denominator = query_codes @ key_codes.sum(dim=-2).unsqueeze(-1)  # [R, H, Sq, 1]
    if form == "seed":
        return ((0.5 * values + numerator / math.pi) / (0.5 + denominator / math.pi)).to(v.dtype)
    return (numerator / denominator.clamp_min(1.0)).to(v.dtype)


# ---------------------------------------------------------------------------------------------------- TE compute


def _bit(word, bit):
    """Bit `bit` (an int32 expression in 0..31) of an int32 word, as int32 0/1 (an arithmetic shift is fine: only
    bit 0 of the shifted word is kept)."""
    from tvm import tirx  # lazy: TVM is optional (the references run without it)

    return tirx.bitwise_and(tirx.shift_right(word, bit), tirx.const(1, "int32"))


def _hash_pack_compute(heads: int, samples: int, head_dim: int, n_bits: int):
    """TE tensors [x, weight, bias, words]: projection (a reduction over d) then an OR-reduction of shifted bits."""
    from tvm import te, tirx  # lazy: TVM is optional (the references run without it)

    rays = te.var("rays")
    words = num_words(n_bits)
    x = te.placeholder((rays, heads, samples, head_dim), "float32", name="x")
    weight = te.placeholder((heads, head_dim, n_bits), "float32", name="weight")
    bias = te.placeholder((heads, n_bits), "float32", name="bias")
    k = te.reduce_axis((0, head_dim), name="k")
    projection = te.compute((rays, heads, samples, n_bits),
                            lambda r, h, s, b: te.sum(x[r, h, s, k] * weight[h, k, b], axis=k), name="projection")
    bitwise_or = te.comm_reducer(lambda a, b: tirx.bitwise_or(a, b), lambda dtype: tirx.const(0, dtype),
                                 name="bitwise_or")
    j = te.reduce_axis((0, WORD_BITS), name="j")

    def word(r, h, s, w):
        index = w * WORD_BITS + j
        # uint32 so that 1 << 31 is well defined; bits past n_bits are 0 (the guard also keeps the read in bounds)
        is_set = tirx.if_then_else(index < n_bits, projection[r, h, s, tirx.min(index, n_bits - 1)]
                                   + bias[h, tirx.min(index, n_bits - 1)] >= 0, False)
        shifted = tirx.shift_left(tirx.Cast("uint32", is_set), j.var.astype("uint32"))
        return bitwise_or(tirx.reinterpret("int32", shifted), axis=j)  # same bits, int32 storage as pack_bits

    packed = te.compute((rays, heads, samples, words), word, name="words")
    return [x, weight, bias, packed]


def _attention_placeholders(heads: int, queries: int, keys: int, head_dim: int, n_bits: int):
    """q_words [R, H, Sq, W], k_words [R, H, Sk, W] int32 and v [R, H, Sk, d] fp32, R symbolic."""
    from tvm import te  # lazy: TVM is optional (the references run without it)

    rays, words = te.var("rays"), num_words(n_bits)
    return (te.placeholder((rays, heads, queries, words), "int32", name="q_words"),
            te.placeholder((rays, heads, keys, words), "int32", name="k_words"),
            te.placeholder((rays, heads, keys, head_dim), "float32", name="v"))


def _quadratic_compute(heads: int, queries: int, keys: int, head_dim: int, n_bits: int, fast_exp: bool):
    """TE tensors [q_words, k_words, v, scale, out]: logits -> row max -> exp -> row sum -> weighted v / sum."""
    from tvm import te, tirx  # lazy: TVM is optional (the references run without it)

    q, k, v = _attention_placeholders(heads, queries, keys, head_dim, n_bits)
    rays, words = q.shape[0], num_words(n_bits)
    scale = te.placeholder((heads,), "float32", name="scale")

    def differing_bits(r, h, i, j, w):  # popcount on uint32: CUDA lowers only unsigned popcount (to __popc)
        differing = tirx.reinterpret("uint32", tirx.bitwise_xor(q[r, h, i, w], k[r, h, j, w]))
        return tirx.Cast("int32", tirx.popcount(differing))

    def hamming(r, h, i, j):  # words is static: an unrolled sum, not a reduction block
        total = differing_bits(r, h, i, j, 0)
        for w in range(1, words):
            total = total + differing_bits(r, h, i, j, w)
        return total

    logits = te.compute((rays, heads, queries, keys),
                        lambda r, h, i, j: scale[h] * tirx.Cast("float32", n_bits - 2 * hamming(r, h, i, j)),
                        name="logits")
    j_max = te.reduce_axis((0, keys), name="j_max")
    row_max = te.compute((rays, heads, queries), lambda r, h, i: te.max(logits[r, h, i, j_max], axis=j_max),
                         name="row_max")
    exp = vector_exp if fast_exp else tirx.exp
    exps = te.compute((rays, heads, queries, keys), lambda r, h, i, j: exp(logits[r, h, i, j] - row_max[r, h, i]),
                      name="exps")
    j_sum = te.reduce_axis((0, keys), name="j_sum")
    row_sum = te.compute((rays, heads, queries), lambda r, h, i: te.sum(exps[r, h, i, j_sum], axis=j_sum),
                         name="row_sum")
    j_acc = te.reduce_axis((0, keys), name="j_acc")
    weighted = te.compute((rays, heads, queries, head_dim),
                          lambda r, h, i, c: te.sum(exps[r, h, i, j_acc] * v[r, h, j_acc, c], axis=j_acc),
                          name="weighted")
    out = te.compute((rays, heads, queries, head_dim), lambda r, h, i, c: weighted[r, h, i, c] / row_sum[r, h, i],
                     name="out")
    return [q, k, v, scale, out]


def _linear_compute(heads: int, queries: int, keys: int, head_dim: int, n_bits: int, form: str):
    """TE tensors [q_words, k_words, v, out]: per-bit sums of v and key counts, then per-query select-adds of them."""
    from tvm import te, tirx  # lazy: TVM is optional (the references run without it)

    q, k, v = _attention_placeholders(heads, queries, keys, head_dim, n_bits)
    rays = q.shape[0]
    zero = tirx.const(0.0, "float32")

    # Select (both operands evaluated, a blend) rather than if_then_else (a branch, mispredicted half the time)
    def bit_set(codes, r, h, s, b):
        return _bit(codes[r, h, s, b // WORD_BITS], b % WORD_BITS) != 0  # b is a loop var: // and % stay in TIR

    one = tirx.const(1.0, "float32")
    j_kv = te.reduce_axis((0, keys), name="j_kv")
    bit_values = te.compute(
        (rays, heads, n_bits, head_dim),
        lambda r, h, b, c: te.sum(tirx.Select(bit_set(k, r, h, j_kv, b), v[r, h, j_kv, c], zero), axis=j_kv),
        name="bit_values")
    j_count = te.reduce_axis((0, keys), name="j_count")
    bit_counts = te.compute(
        (rays, heads, n_bits),
        lambda r, h, b: te.sum(tirx.Select(bit_set(k, r, h, j_count, b), one, zero), axis=j_count),
        name="bit_counts")
    b_num = te.reduce_axis((0, n_bits), name="b_num")
    numerator = te.compute(
        (rays, heads, queries, head_dim),
        lambda r, h, i, c: te.sum(tirx.Select(bit_set(q, r, h, i, b_num), bit_values[r, h, b_num, c], zero),
                                  axis=b_num),
        name="numerator")
    b_den = te.reduce_axis((0, n_bits), name="b_den")
    denominator = te.compute(
        (rays, heads, queries),
        lambda r, h, i: te.sum(tirx.Select(bit_set(q, r, h, i, b_den), bit_counts[r, h, b_den], zero), axis=b_den),
        name="denominator")
    if form == "seed":
        inv_pi = tirx.const(1.0 / math.pi, "float32")
        out = te.compute((rays, heads, queries, head_dim),
                         lambda r, h, i, c: (0.5 * v[r, h, i, c] + numerator[r, h, i, c] * inv_pi)
                         / (0.5 + denominator[r, h, i] * inv_pi), name="out")
    else:
        out = te.compute((rays, heads, queries, head_dim),
                         lambda r, h, i, c: numerator[r, h, i, c] / te.max(denominator[r, h, i], 1.0), name="out")
    return [q, k, v, out]


# ------------------------------------------------------------------------------------------------------ schedules


def _schedule(tensors):
    """A tvm.s_tir.Schedule of the prim func made from TE tensors (inputs first, output last)."""
    import tvm  # lazy: TVM is optional (the references run without it)
    from tvm import s_tir, te  # lazy: TVM is optional (the references run without it)

    return s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func(tensors)}))


_MAX_CUDA_THREADS = 1024


def _is_cuda(target: dict, threads: int) -> bool:
    """True for a CUDA target (which runs `threads` = heads x samples threads per block), False for llvm."""
    kind = target["kind"] if isinstance(target, dict) else target.kind.name
    if kind not in ("llvm", "cuda"):
        raise ValueError(f"hashed-attention kernels have llvm (CPU) and cuda schedules, not {kind!r}")
    if kind == "cuda" and threads > _MAX_CUDA_THREADS:
        raise ValueError(f"the CUDA schedule runs one thread per (head, sample): {threads} > {_MAX_CUDA_THREADS}")
    return kind == "cuda"


def _vectorize_inner_update(sch, block, init_loop_index: int) -> None:
    """Vectorise the innermost (spatial) loop of a reduction block, then split its init out at loop `init_loop_index`
    (vectorising first: once decomposed, the update block is no longer a reduction block the schedule accepts)."""
    loops = sch.get_loops(block)
    sch.vectorize(loops[-1])
    init = sch.decompose_reduction(block, loops[init_loop_index])
    init_inner = sch.get_loops(init)[-1]
    if sch.get(init_inner).kind != sch.get(loops[-1]).kind:
        sch.vectorize(init_inner)


def _unroll_inner(sch, block, count: int) -> None:
    """Unroll the innermost `count` loops of `block` (static extents only)."""
    for loop in sch.get_loops(block)[-count:]:
        sch.unroll(loop)


def _cooperative_fetch(sch, block, threads: int) -> None:
    """Spread a shared-memory copy block, computed at the ray's blockIdx loop, over `threads` threadIdx.x lanes."""
    loops = sch.get_loops(block)[1:]  # below the ray loop (unit loops, e.g. one code word, are already dropped)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _, lane = sch.split(fused, factors=[None, threads])
    sch.bind(lane, "threadIdx.x")


def make_hash_pack(target: dict, heads: int, samples: int, head_dim: int, n_bits: int):
    """IRModule: x [rays, H, S, d] f32, weight [H, d, n] f32, bias [H, n] f32 -> words [rays, H, S, W] int32."""
    sch = _schedule(_hash_pack_compute(heads, samples, head_dim, n_bits))
    packed, projection = sch.get_sblock("words"), sch.get_sblock("projection")
    r, h, s, _ = sch.get_loops(packed)[:4]
    if _is_cuda(target, heads * samples):
        thread = sch.fuse(h, s)  # one thread per (head, sample): it projects its d features onto n bits
        sch.bind(r, "blockIdx.x")
        sch.bind(thread, "threadIdx.x")
        words_local = sch.cache_write(packed, 0, "local")  # OR the 32 bits in a register, store each word once
        sch.reverse_compute_at(words_local, thread)
        sch.compute_at(projection, thread)
        sch.set_scope(projection, 0, "local")
        sch.reorder(*sch.get_loops(projection)[-2:][::-1])  # (bit, k) -> (k, bit): each x[k] loaded once
        _unroll_inner(sch, projection, 2)
        _unroll_inner(sch, packed, 2)  # constant bit positions: the n projections stay in registers
        weight_shared = sch.cache_read(projection, "weight", "shared")
        sch.compute_at(weight_shared, r)
        _cooperative_fetch(sch, weight_shared, heads * samples)
    else:
        sch.parallel(r)
        sch.compute_at(projection, s)
        sch.reorder(*sch.get_loops(projection)[-2:][::-1])  # (bit, k) -> (k, bit): vector over the n bits
        _vectorize_inner_update(sch, projection, -2)
        sch.unroll(sch.get_loops(packed)[-1])  # the 32 shifted ORs of one word
    return sch.mod


def make_quadratic(target: dict, heads: int, queries: int, keys: int, head_dim: int, n_bits: int):
    """IRModule: q_words [rays, H, Sq, W], k_words [rays, H, Sk, W] int32, v [rays, H, Sk, d] f32, scale [H] f32
    -> out [rays, H, Sq, d] f32. The logits, exps, row max and sum never leave the ray's loop: per (ray, head) in
    the CPU workspace, per query row in a CUDA thread's registers."""
    cuda = _is_cuda(target, heads * queries)
    sch = _schedule(_quadratic_compute(heads, queries, keys, head_dim, n_bits, fast_exp=not cuda))  # CUDA: expf
    out = sch.get_sblock("out")
    r, h, i, _ = sch.get_loops(out)
    row_blocks = ["weighted", "row_sum", "exps", "row_max", "logits"]  # consumers before producers for compute_at
    if cuda:
        thread = sch.fuse(h, i)  # one thread per (head, query sample) of the block's ray
        sch.bind(r, "blockIdx.x")
        sch.bind(thread, "threadIdx.x")
        for name in row_blocks:
            sch.compute_at(sch.get_sblock(name), thread)
            sch.set_scope(sch.get_sblock(name), 0, "local")
        weighted = sch.get_sblock("weighted")
        sch.reorder(*sch.get_loops(weighted)[-2:][::-1])  # (c, j) -> (j, c): d register accumulators
        for name, inner in (("logits", 1), ("row_max", 1), ("exps", 1), ("weighted", 2), ("row_sum", 1)):
            _unroll_inner(sch, sch.get_sblock(name), inner)  # constant indices keep the per-row arrays in registers
        _unroll_inner(sch, out, 1)
        threads = heads * queries
        k_shared = sch.cache_read(sch.get_sblock("logits"), "k_words", "shared")
        v_shared = sch.cache_read(weighted, "v", "shared")
        for block in (k_shared, v_shared):
            sch.compute_at(block, r)
            _cooperative_fetch(sch, block, threads)
    else:
        # per (ray, head), all queries at once, vectorised over the queries: the row max and sum become S-lane
        # element-wise max/add chains instead of one serial reduction per query (2.7x faster than row by row)
        sch.parallel(r)
        for name in row_blocks:
            sch.compute_at(sch.get_sblock(name), h)
        for name in ("logits", "exps"):
            # stored [key, query] so the query vector is contiguous: S^2 floats per (ray, head), in the workspace
            sch.transform_layout(name, ("write", 0), lambda ray, head, query, key: (ray, head, key, query))
            i_loop, j_loop = sch.get_loops(sch.get_sblock(name))[-2:]
            sch.reorder(j_loop, i_loop)
            sch.vectorize(i_loop)
        for name in ("row_max", "row_sum"):
            block = sch.get_sblock(name)
            i_loop, j_loop = sch.get_loops(block)[-2:]
            sch.reorder(j_loop, i_loop)
            _vectorize_inner_update(sch, block, -2)
        weighted = sch.get_sblock("weighted")
        sch.reorder(*sch.get_loops(weighted)[-2:][::-1])  # (c, j) -> (j, c): vector over the d channels
        _vectorize_inner_update(sch, weighted, -2)
        sch.vectorize(sch.get_loops(out)[-1])
    return sch.mod


def make_linear(target: dict, heads: int, queries: int, keys: int, head_dim: int, n_bits: int, form: str = "hashed"):
    """IRModule: q_words [rays, H, Sq, W], k_words [rays, H, Sk, W] int32, v [rays, H, Sk, d] f32
    -> out [rays, H, Sq, d] f32. The per-bit sums of v ([n, d] per head) and counts stay under the ray's loop."""
    if form not in LINEAR_FORMS:
        raise ValueError(f"form must be one of {LINEAR_FORMS}, got {form!r}")
    if form == "seed" and queries != keys:
        raise ValueError(f"the seed form adds 0.5 v_i to query i: needs as many queries as keys, got {queries}, {keys}")
    sch = _schedule(_linear_compute(heads, queries, keys, head_dim, n_bits, form))
    out = sch.get_sblock("out")
    bit_values, bit_counts = sch.get_sblock("bit_values"), sch.get_sblock("bit_counts")
    numerator, denominator = sch.get_sblock("numerator"), sch.get_sblock("denominator")
    r, h, i, _ = sch.get_loops(out)
    if _is_cuda(target, heads * queries):
        threads = heads * queries
        thread = sch.fuse(h, i)  # phase 2: one thread per (head, query sample)
        sch.bind(r, "blockIdx.x")
        sch.bind(thread, "threadIdx.x")
        for block in (numerator, denominator):
            sch.compute_at(block, thread)
            sch.set_scope(block, 0, "local")
        sch.reorder(*sch.get_loops(numerator)[-2:][::-1])  # (c, b) -> (b, c): test each query bit once
        for block, inner in ((numerator, 2), (denominator, 1), (out, 1)):
            _unroll_inner(sch, block, inner)
        for block, spread in ((bit_values, 3), (bit_counts, 2)):  # phase 1: the ray's per-bit sums, in shared memory
            sch.set_scope(block, 0, "shared")
            # each thread sums its (head, bit[, channel]) entries over the keys in a register, then stores it once
            # (a read-modify-write of shared memory under the split's bounds check cannot be synchronised)
            store = sch.cache_write(block, 0, "local")  # `block` now accumulates locally, `store` copies to shared
            sch.compute_at(store, r)
            fused = sch.fuse(*sch.get_loops(store)[1:1 + spread])
            _, lane = sch.split(fused, factors=[None, threads])
            sch.bind(lane, "threadIdx.x")
            sch.compute_at(block, lane)
            _unroll_inner(sch, block, 1)
    else:
        sch.parallel(r)
        sch.compute_at(numerator, i)
        sch.compute_at(denominator, h)
        for block in (bit_values, bit_counts):
            sch.compute_at(block, h)
        b, c, j = sch.get_loops(bit_values)[-3:]
        sch.reorder(j, b, c)  # per key: its code word loaded once, its v row select-added to each set bit's row
        sch.unroll(b)  # constant bit positions
        _vectorize_inner_update(sch, bit_values, -3)
        b, j = sch.get_loops(bit_counts)[-2:]
        sch.reorder(j, b)
        sch.unroll(b)
        sch.decompose_reduction(bit_counts, j)
        sch.reorder(*sch.get_loops(numerator)[-2:][::-1])  # (c, b) -> (b, c)
        sch.unroll(sch.get_loops(numerator)[-2])
        _vectorize_inner_update(sch, numerator, -2)
        i_loop, b = sch.get_loops(denominator)[-2:]
        sch.reorder(b, i_loop)
        sch.unroll(b)
        _vectorize_inner_update(sch, denominator, -2)
        sch.vectorize(sch.get_loops(out)[-1])
    return sch.mod


# -------------------------------------------------------------------------------------------------------- wrappers

def _compiled(name: str, key: dict, device: torch.device, make: Callable) -> Callable | None:
    """The built kernel for (name, key) on `device` through the facade (kernels.dispatch.get_kernel), or None."""
    return get_kernel(name, key, device, lambda target: make(target, **key))


def _check_words(name: str, words: Tensor, n_bits: int) -> None:
    if words.dim() != 4 or words.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 [R, H, S, W], got {words.dtype} {tuple(words.shape)}")
    if words.shape[-1] != num_words(n_bits):
        raise ValueError(f"{name} has {words.shape[-1]} words per code, but n_bits={n_bits} needs {num_words(n_bits)}")


def _check_attention_inputs(q_words: Tensor, k_words: Tensor, v: Tensor, n_bits: int) -> None:
    if not isinstance(n_bits, int) or n_bits < 1:
        raise ValueError(f"n_bits must be a positive int, got {n_bits!r}")
    _check_words("q_words", q_words, n_bits)
    _check_words("k_words", k_words, n_bits)
    if v.dim() != 4 or not v.is_floating_point():
        raise ValueError(f"v must be a floating [R, H, Sk, d] tensor, got {v.dtype} {tuple(v.shape)}")
    rays, heads = q_words.shape[:2]
    if k_words.shape[:2] != (rays, heads) or v.shape[:3] != k_words.shape[:3]:
        raise ValueError(f"shapes disagree: q_words {tuple(q_words.shape)}, k_words {tuple(k_words.shape)}, "
                         f"v {tuple(v.shape)} (expected [R, H, Sq, W], [R, H, Sk, W], [R, H, Sk, d])")
    if not (q_words.device == k_words.device == v.device):
        raise ValueError(f"inputs on different devices: {q_words.device}, {k_words.device}, {v.device}")


def _float32(x: Tensor) -> Tensor:
    """A contiguous float32 view/copy without autograd history (DLPack refuses tensors that require grad)."""
    return x.detach().to(torch.float32).contiguous()


def _int32(words: Tensor) -> Tensor:
    return words.detach().contiguous()


def _check_index_range(*tensors: Tensor) -> None:
    """The kernels index with int32 (blockIdx * row size etc.): every tensor must have fewer than 2^31 elements."""
    for tensor in tensors:
        if tensor.numel() >= 2**31:
            raise ValueError(f"a tensor of shape {tuple(tensor.shape)} is too large for the int32-indexed kernels; "
                             "call them on smaller chunks of rays")


def hash_pack(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [R, H, S, d], weight [H, d, n], bias [H, n] -> int32 words [R, H, S, ceil(n/32)] (BinaryHasher codes, packed).

    Float32 math; a projection within rounding of 0 may hash differently from the reference's einsum order.
    Float64 inputs go to the reference (the kernel would round them).
    """
    if x.dim() != 4 or weight.dim() != 3 or bias.dim() != 2:
        raise ValueError(f"expected x [R, H, S, d], weight [H, d, n], bias [H, n]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(bias.shape)}")
    rays, heads, samples, head_dim = x.shape
    n_bits = weight.shape[-1]
    if weight.shape[:2] != (heads, head_dim) or tuple(bias.shape) != (heads, n_bits):
        raise ValueError(f"weight must be [{heads}, {head_dim}, n] and bias [{heads}, n] for x {tuple(x.shape)}; "
                         f"got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if not (x.is_floating_point() and weight.is_floating_point() and bias.is_floating_point()):
        raise ValueError("x, weight and bias must be floating point")
    if not (x.device == weight.device == bias.device):
        raise ValueError(f"inputs on different devices: {x.device}, {weight.device}, {bias.device}")
    if torch.float64 in (x.dtype, weight.dtype, bias.dtype) or rays == 0:
        if rays:  # an empty input computes nothing: neither a kernel run nor a fallback
            note_kernel("hash_pack", "reference")
        return reference_hash_pack(x, weight, bias)
    key = {"heads": heads, "samples": samples, "head_dim": head_dim, "n_bits": n_bits}
    kernel = _compiled("hash_pack", key, x.device, make_hash_pack)
    if kernel is None:
        return reference_hash_pack(x, weight, bias)
    words = torch.empty(rays, heads, samples, num_words(n_bits), dtype=torch.int32, device=x.device)
    _check_index_range(x, words)
    kernel(_float32(x), _float32(weight), _float32(bias), words)
    return words


def quadratic_attention(q_words: Tensor, k_words: Tensor, v: Tensor, scale: Tensor | float, n_bits: int) -> Tensor:
    """q_words [R, H, Sq, W], k_words [R, H, Sk, W] int32, v [R, H, Sk, d], scale [H] (or a float)
    -> softmax_k(scale_h (n - 2 Hamming)) @ v, [R, H, Sq, d] in v's dtype (float32 math)."""
    _check_attention_inputs(q_words, k_words, v, n_bits)
    rays, heads, queries, _ = q_words.shape
    keys, head_dim = v.shape[2:]
    scale = torch.as_tensor(scale, dtype=torch.float32, device=v.device)
    if scale.dim() > 1 or scale.numel() not in (1, heads):
        raise ValueError(f"scale must be a float or a [{heads}] tensor, got shape {tuple(scale.shape)}")
    scale = scale.expand(heads).contiguous()
    if rays == 0 or keys == 0 or v.dtype == torch.float64:
        if v.dtype == torch.float64:  # the kernel would round it; an empty input computes nothing
            note_kernel("hashed_quadratic", "reference")
        return reference_quadratic(q_words, k_words, v, scale, n_bits)
    key = {"heads": heads, "queries": queries, "keys": keys, "head_dim": head_dim, "n_bits": n_bits}
    kernel = _compiled("hashed_quadratic", key, v.device, make_quadratic)
    if kernel is None:
        return reference_quadratic(q_words, k_words, v, scale, n_bits)
    out = torch.empty(rays, heads, queries, head_dim, dtype=torch.float32, device=v.device)
    _check_index_range(q_words, k_words, v, out)
    kernel(_int32(q_words), _int32(k_words), _float32(v), _float32(scale), out)
    return out.to(v.dtype)


def linear_attention(q_words: Tensor, k_words: Tensor, v: Tensor, n_bits: int, form: str = "hashed") -> Tensor:
    """q_words [R, H, Sq, W], k_words [R, H, Sk, W] int32, v [R, H, Sk, d] -> [R, H, Sq, d] in v's dtype.

    form="hashed": Q_b (K_b^T V) / max(Q_b K_b^T 1, 1); form="seed": ShiftAddViT's normalised form without its
    conv branch (see reference_linear). Float32 math, additions only inside the kernel (plus one divide per output).
    """
    _check_attention_inputs(q_words, k_words, v, n_bits)
    if form not in LINEAR_FORMS:
        raise ValueError(f"form must be one of {LINEAR_FORMS}, got {form!r}")
    rays, heads, queries, _ = q_words.shape
    keys, head_dim = v.shape[2:]
    if form == "seed" and queries != keys:
        raise ValueError(f"the seed form needs as many queries as keys, got {queries} and {keys}")
    if rays == 0 or keys == 0 or v.dtype == torch.float64:
        if v.dtype == torch.float64:  # the kernel would round it; an empty input computes nothing
            note_kernel("hashed_linear", "reference")
        return reference_linear(q_words, k_words, v, n_bits, form)
    key = {"heads": heads, "queries": queries, "keys": keys, "head_dim": head_dim, "n_bits": n_bits, "form": form}
    kernel = _compiled("hashed_linear", key, v.device, make_linear)
    if kernel is None:
        return reference_linear(q_words, k_words, v, n_bits, form)
    out = torch.empty(rays, heads, queries, head_dim, dtype=torch.float32, device=v.device)
    _check_index_range(q_words, k_words, v, out)
    kernel(_int32(q_words), _int32(k_words), _float32(v), out)
    return out.to(v.dtype)
