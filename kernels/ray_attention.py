"""One fused TVM kernel for the attention half of a ray-transformer block: x + out_fc(core(q, k, v)) with
q, k, v = LN(x) Wq^T, LN(x) Wk^T, LN(x) Wv^T, for the dense core (softmax(q k^T / sqrt(d)) v) and for ShiftAddViT's
hashed core (softmax(scale_h (n - 2 Hamming(code(q), code(k)))) v, XOR + popcount on packed codes).

Per ray everything is small (S = 24 samples x C = 32 channels: 3 KB of tokens), yet PyTorch runs it as ~10 ops over
the whole chunk ([R, S, C] -> LN -> three GEMMs -> head transposes -> the core -> transpose back -> out_fc -> add),
each a round trip through memory: 0.9-1.1 s of a 6 s CPU frame before this kernel (results/kernels_blend_cpu.md
at commit ccfc93f, "ray_attention").
Here one ray's LN, projections, codes, logits, softmax and output never leave L1:

    xn       = LN(x)                                                     [S, C]
    qkv      = xn @ [Wq; Wk; Wv]^T                                       [S, 3C]
    logits   = q_h k_h^T / sqrt(d)                (dense)                [H, S, S]
             = scale_h (n - 2 popcount(code_h(q) ^ code_h(k)))   (hashed: code = bits of q_h W_h + b_h >= 0)
    attn     = softmax_keys(logits) @ v_h                                [S, C]
    out      = x + attn @ Wo^T + bo                                      [S, C]

CPU only (parallel over rays; the ray count is symbolic, never split). The model's leaf (kernels.apply
KernelRayAttentionSublayer) is swapped in on the CPU; on CUDA the ray attention keeps its per-core kernels
(kernels.hashed_attention) and PyTorch projections.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, needs_grad, note_kernel
from kernels.te_math import register_blocked, vector_exp, vector_lanes

__all__ = ["CORES", "RayAttentionWeights", "reference_ray_attention", "make_ray_attention", "ray_attention_kernel",
           "ray_attention"]

CORES = ("dense", "hashed")
WORD_BITS = 32


@dataclass(frozen=True, eq=False)
class RayAttentionWeights:
    """A ray block's attention half in the kernel's layout (contiguous fp32 snapshots):
    ln_w, ln_b [C]; qkv_t [C, 3C] = [Wq; Wk; Wv]^T; out_t [C, C] = Wo^T; out_b [C]; core "dense" or "hashed" with
    hash_w [H, d, n], hash_b [H, n], scale [H] (hashed) or scale [H] = 1/sqrt(d) (dense)."""

    ln_w: torch.Tensor
    ln_b: torch.Tensor
    eps: float
    qkv_t: torch.Tensor
    out_t: torch.Tensor
    out_b: torch.Tensor
    heads: int
    core: str
    scale: torch.Tensor
    hash_w: torch.Tensor | None = None
    hash_b: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return self.qkv_t.shape[0]

    @property
    def n_bits(self) -> int:
        return 0 if self.hash_w is None else self.hash_w.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.qkv_t.device

    @classmethod
    def from_parts(cls, ln_w, ln_b, eps: float, wq, wk, wv, wo, bo, heads: int, core: str, scale=None,
                   hash_w=None, hash_b=None) -> "RayAttentionWeights":
        """Weights in nn.Linear layout ([out, in]); ValueError for inconsistent shapes or an unknown core."""
        if core not in CORES:
            raise ValueError(f"ray attention kernel: core must be one of {CORES}, got {core!r}")
        channels = wq.shape[1]
        if channels % heads:
            raise ValueError(f"ray attention kernel: {channels} channels are not divisible by {heads} heads")
        for name, weight in (("wq", wq), ("wk", wk), ("wv", wv), ("wo", wo)):
            if tuple(weight.shape) != (channels, channels):
                raise ValueError(f"ray attention kernel: {name} must be [{channels}, {channels}], "
                                 f"got {tuple(weight.shape)}")
        head_dim = channels // heads
        layout = lambda t: kernel_ready(t.detach().float().clone(), torch.float32)  # noqa: E731 (snapshots)
        if bo is None:
            bo = wo.new_zeros(channels)
        if core == "hashed":
            if hash_w is None or hash_b is None or scale is None:
                raise ValueError("ray attention kernel: the hashed core needs hash_w, hash_b and scale")
            if hash_w.shape[:2] != (heads, head_dim) or tuple(hash_b.shape) != (heads, hash_w.shape[-1]):
                raise ValueError(f"ray attention kernel: hash_w must be [{heads}, {head_dim}, n] and hash_b "
                                 f"[{heads}, n], got {tuple(hash_w.shape)} and {tuple(hash_b.shape)}")
            scale = torch.as_tensor(scale, dtype=torch.float32, device=wq.device).expand(heads)
            hash_w, hash_b = layout(hash_w), layout(hash_b)
        else:
            scale = torch.full((heads,), 1.0 / math.sqrt(head_dim), device=wq.device)
        return cls(ln_w=layout(ln_w), ln_b=layout(ln_b), eps=float(eps),
                   qkv_t=layout(torch.cat([wq, wk, wv], dim=0).t()), out_t=layout(wo.t()), out_b=layout(bo),
                   heads=heads, core=core, scale=layout(scale), hash_w=hash_w, hash_b=hash_b)

    def kernel_arguments(self) -> tuple[torch.Tensor, ...]:
        common = (self.ln_w, self.ln_b, self.qkv_t, self.out_t, self.out_b, self.scale)
        return common + ((self.hash_w, self.hash_b) if self.core == "hashed" else ())


# ----------------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------------

def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    rays, samples, channels = t.shape
    return t.view(rays, samples, heads, channels // heads).transpose(1, 2)  # [R, H, S, d]


def reference_ray_attention(x: torch.Tensor, w: RayAttentionWeights, return_codes_margin: bool = False):
    """The ground truth and fallback: x [R, S, C] -> x + out_fc(core(LN(x))) fp32 [R, S, C], the same math as
    RayAttention with a DotProductAttention or HashedQuadraticAttention core (eval mode).
    return_codes_margin: also return |projection| min per ray ([R]; hashed core, else +inf): a code bit whose
    projection is that close to 0 may come out either way under another summation order (tests skip such rays)."""
    x = x.float()
    channels = x.shape[-1]
    xn = F.layer_norm(x, (channels,), w.ln_w, w.ln_b, w.eps)
    q, k, v = (_split_heads(t.contiguous(), w.heads) for t in (xn @ w.qkv_t).split(channels, dim=-1))
    margin = torch.full((x.shape[0],), float("inf"), device=x.device)
    if w.core == "dense":
        logits = q @ k.transpose(-1, -2) * w.scale[None, :, None, None]
    else:
        def signed(t):
            projection = torch.einsum("rhsd,hdn->rhsn", t, w.hash_w) + w.hash_b[None, :, None, :]
            return 2.0 * (projection >= 0).float() - 1.0, projection.abs().flatten(1).amin(dim=1)

        (sq, mq), (sk, mk) = signed(q), signed(k)
        margin = torch.minimum(mq, mk)
        logits = (sq @ sk.transpose(-1, -2)) * w.scale[None, :, None, None]
    attended = torch.softmax(logits, dim=-1) @ v  # [R, H, S, d]
    out = x + attended.transpose(1, 2).flatten(2) @ w.out_t + w.out_b
    return (out, margin) if return_codes_margin else out


# ----------------------------------------------------------------------------------------------------------------
# TVM kernel
# ----------------------------------------------------------------------------------------------------------------

def _ray_attention_compute(samples: int, channels: int, heads: int, core: str, n_bits: int, eps: float):
    """TE definition: the arguments in call order, output last (x [R, S, C], the weights as kernel_arguments)."""
    from tvm import te, tirx  # lazy: TVM is optional (the references run without it)

    head_dim = channels // heads
    rays = te.var("rays")
    x = te.placeholder((rays, samples, channels), name="x")
    ln_w = te.placeholder((channels,), name="ln_w")
    ln_b = te.placeholder((channels,), name="ln_b")
    qkv_t = te.placeholder((channels, 3 * channels), name="qkv_t")
    out_t = te.placeholder((channels, channels), name="out_t")
    out_b = te.placeholder((channels,), name="out_b")
    scale = te.placeholder((heads,), name="scale")

    c1 = te.reduce_axis((0, channels), name="c1")
    mean = te.compute((rays, samples), lambda r, s: te.sum(x[r, s, c1] / channels, axis=c1), name="mean")
    c2 = te.reduce_axis((0, channels), name="c2")
    var = te.compute((rays, samples), lambda r, s: te.sum((x[r, s, c2] - mean[r, s]) * (x[r, s, c2] - mean[r, s])
                                                          / channels, axis=c2), name="var")
    xn = te.compute((rays, samples, channels), lambda r, s, c: (x[r, s, c] - mean[r, s])
                    * tirx.rsqrt(var[r, s] + tirx.const(eps, "float32")) * ln_w[c] + ln_b[c], name="xn")
    c3 = te.reduce_axis((0, channels), name="c3")
    qkv = te.compute((rays, samples, 3 * channels), lambda r, s, o: te.sum(xn[r, s, c3] * qkv_t[c3, o], axis=c3),
                     name="qkv")
    extra = []
    # logits are laid out keys-major, [H, S_keys, S_queries], so that every softmax step (row max, exp, row sum)
    # is a vector operation over the queries
    if core == "dense":
        queries_t = te.compute((rays, heads, head_dim, samples),
                               lambda r, h, e, i: qkv[r, i, h * head_dim + e] * scale[h], name="queries_t")
        e = te.reduce_axis((0, head_dim), name="e")
        logits = te.compute((rays, heads, samples, samples), lambda r, h, j, i: te.sum(
            qkv[r, j, channels + h * head_dim + e] * queries_t[r, h, e, i], axis=e), name="logits")
    else:
        hash_w = te.placeholder((heads, head_dim, n_bits), name="hash_w")
        hash_b = te.placeholder((heads, n_bits), name="hash_b")
        extra = [hash_w, hash_b]
        words = -(-n_bits // WORD_BITS)
        e = te.reduce_axis((0, head_dim), name="e")
        # [R, 2 (q, k), S, H, n]: each head's d -> n projection of q and of k
        projection = te.compute((rays, 2, samples, heads, n_bits), lambda r, t, s, h, b: te.sum(
            qkv[r, s, t * channels + h * head_dim + e] * hash_w[h, e, b], axis=e), name="projection")
        bitwise_or = te.comm_reducer(lambda a, b: tirx.bitwise_or(a, b), lambda dtype: tirx.const(0, dtype),
                                     name="bitwise_or")
        bit = te.reduce_axis((0, WORD_BITS), name="bit")

        def word(r, t, h, w, s):
            index = w * WORD_BITS + bit
            is_set = tirx.if_then_else(index < n_bits,
                                       projection[r, t, s, h, tirx.min(index, n_bits - 1)]
                                       + hash_b[h, tirx.min(index, n_bits - 1)] >= 0, False)
            return bitwise_or(tirx.shift_left(tirx.Cast("uint32", is_set), bit.var.astype("uint32")), axis=bit)

        codes = te.compute((rays, 2, heads, words, samples), word, name="codes")  # uint32 words, samples last

        def hamming(r, h, j, i):
            total = tirx.Cast("int32", tirx.popcount(tirx.bitwise_xor(codes[r, 0, h, 0, i], codes[r, 1, h, 0, j])))
            for w in range(1, words):
                total = total + tirx.Cast("int32", tirx.popcount(
                    tirx.bitwise_xor(codes[r, 0, h, w, i], codes[r, 1, h, w, j])))
            return total

        logits = te.compute((rays, heads, samples, samples), lambda r, h, j, i: scale[h] * tirx.Cast(
            "float32", n_bits - 2 * hamming(r, h, j, i)), name="logits")
    jm = te.reduce_axis((0, samples), name="jm")
    row_max = te.compute((rays, heads, samples), lambda r, h, i: te.max(logits[r, h, jm, i], axis=jm), name="row_max")
    exps = te.compute((rays, heads, samples, samples),
                      lambda r, h, j, i: vector_exp(logits[r, h, j, i] - row_max[r, h, i]), name="exps")
    js = te.reduce_axis((0, samples), name="js")
    row_sum = te.compute((rays, heads, samples), lambda r, h, i: te.sum(exps[r, h, js, i], axis=js), name="row_sum")
    # the attention-weighted values and their normalisation stay queries-last ([H, d, S], [C, S]): every step is a
    # vector over the queries, and the output projection reads them one broadcast scalar at a time
    ja = te.reduce_axis((0, samples), name="ja")
    attended = te.compute((rays, heads, head_dim, samples), lambda r, h, d, i: te.sum(
        exps[r, h, ja, i] * qkv[r, ja, 2 * channels + h * head_dim + d], axis=ja), name="attended")
    normalised = te.compute((rays, channels, samples), lambda r, c, i: attended[r, c // head_dim, c % head_dim, i]
                            / row_sum[r, c // head_dim, i], name="normalised")
    c4 = te.reduce_axis((0, channels), name="c4")
    projected = te.compute((rays, samples, channels), lambda r, s, c: te.sum(normalised[r, c4, s] * out_t[c4, c],
                                                                            axis=c4), name="projected")
    out = te.compute((rays, samples, channels), lambda r, s, c: x[r, s, c] + out_b[c] + projected[r, s, c],
                     name="out")
    return [x, ln_w, ln_b, qkv_t, out_t, out_b, scale, *extra, out]




def _schedule_cpu(sch, samples: int, channels: int, heads: int, core: str) -> None:
    """Parallel over rays; every stage computed under the ray loop in small per-ray buffers."""
    out = sch.get_sblock("out")
    ray = sch.get_loops(out)[0]
    sch.parallel(ray)
    stages = ["projected", "normalised", "attended", "row_sum", "exps", "row_max", "logits"]
    stages += ["codes", "projection"] if core == "hashed" else ["queries_t"]
    stages += ["qkv", "xn", "var", "mean"]
    for name in stages:
        sch.compute_at(sch.get_sblock(name), ray, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(out)[-1])
    sch.vectorize(sch.get_loops(sch.get_sblock("xn"))[-1])
    sch.vectorize(sch.get_loops(sch.get_sblock("normalised"))[-1])
    for name in ("mean", "var"):  # 24 independent sums side by side instead of one serial chain per row
        block = sch.get_sblock(name)
        row, c = sch.get_loops(block)[-2:]
        sch.reorder(c, row)
        sch.unroll(row)
        sch.decompose_reduction(block, c)
    register_blocked(sch, "qkv", 3 * channels)
    register_blocked(sch, "projected", channels)
    # the softmax, keys-major: row max and row sum accumulate a vector over the queries while the keys go by
    for name in ("row_max", "row_sum"):
        block = sch.get_sblock(name)
        h, i, j = sch.get_loops(block)[-3:]
        sch.reorder(h, j, i)
        sch.vectorize(i)
        sch.decompose_reduction(block, j)
    sch.vectorize(sch.get_loops(sch.get_sblock("exps"))[-1])
    # attention-weighted values: per head, a [d, queries] block of accumulators in registers while the keys stream
    # by (one vector of exps and d broadcast values per key)
    attended = sch.get_sblock("attended")
    h, d, i, ja = sch.get_loops(attended)[-4:]
    i_outer, i_lane = sch.split(i, factors=[None, vector_lanes(samples)])
    sch.reorder(h, ja, d, i_outer, i_lane)
    sch.unroll(d)
    sch.unroll(i_outer)
    sch.vectorize(i_lane)
    sch.decompose_reduction(attended, ja)
    logits = sch.get_sblock("logits")
    if core == "hashed":
        projection = sch.get_sblock("projection")
        t, s, h, b, e = sch.get_loops(projection)[-5:]
        sch.reorder(t, s, h, e, b)
        sch.vectorize(b)
        sch.decompose_reduction(projection, e)
        sch.unroll(sch.get_loops(sch.get_sblock("codes"))[-1])  # the 32 shifted ORs of one word
        sch.vectorize(sch.get_loops(logits)[-1])  # XOR + popcount, vector over the queries
    else:
        h, j, i, e = sch.get_loops(logits)[-4:]
        sch.reorder(h, j, e, i)
        sch.vectorize(i)
        sch.decompose_reduction(logits, e)


def make_ray_attention(target: dict, samples: int, channels: int, heads: int, core: str, n_bits: int, eps: float):
    """The scheduled IRModule (CPU): arguments x [R, S, C], RayAttentionWeights.kernel_arguments(), out [R, S, C]."""
    import tvm  # lazy: TVM is optional
    from tvm import s_tir, te

    if target["kind"] != "llvm":
        raise ValueError(f"the fused ray attention kernel has a CPU (llvm) schedule only, not {target['kind']!r}")
    if core not in CORES:
        raise ValueError(f"ray attention kernel: core must be one of {CORES}, got {core!r}")
    arguments = _ray_attention_compute(samples, channels, heads, core, n_bits, eps)
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func(arguments)}))
    _schedule_cpu(sch, samples, channels, heads, core)
    return sch.mod


def ray_attention_kernel(device: torch.device | str, samples: int, w: RayAttentionWeights) -> Callable | None:
    """The compiled kernel for `device`, or None (one warning) when none can be had (kernels.dispatch.get_kernel)."""
    key = {"samples": samples, "channels": w.channels, "heads": w.heads, "core": w.core, "n_bits": w.n_bits,
           "eps": w.eps}
    return get_kernel("ray_attention", key, torch.device(device),
                      lambda target: make_ray_attention(target, samples, w.channels, w.heads, w.core, w.n_bits,
                                                        w.eps))


def ray_attention(x: torch.Tensor, w: RayAttentionWeights) -> torch.Tensor:
    """The fused attention half of a ray block: x [R, S, C] -> x + out_fc(core(LN(x))) fp32 [R, S, C].
    Inference only: with gradients needed, or no kernel to be had (one warning), the reference runs instead."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != w.channels:
        raise ValueError(f"ray_attention: x must be [rays, samples, C={w.channels}], "
                         f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.device != w.device:
        raise ValueError(f"ray_attention: weights are on {w.device} but x is on {x.device}")
    if x.numel() >= 2 ** 31:
        raise ValueError(f"ray_attention: {x.numel()} elements exceed int32 indexing; call it per chunk of rays")
    if needs_grad(x):
        note_kernel("ray_attention", "reference")
        return reference_ray_attention(x, w)
    kernel = ray_attention_kernel(x.device, x.shape[1], w) if x.shape[0] else None
    if kernel is None:
        return reference_ray_attention(x, w)
    x = kernel_ready(x, torch.float32)
    out = torch.empty_like(x)
    kernel(x, *w.kernel_arguments(), out)
    return out
