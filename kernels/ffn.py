"""Fused FFN sublayer: out = x + FFN_e(LayerNorm(x)), one kernel, for dense, shift and Mult/Shift MoE FFNs.

A transformer block's FFN half reads its input once and writes its output once here; the normalized tokens,
the router logits and the [tokens, hidden] activations (hidden = 4-8 x width) stay in cache or on-chip memory.
With E stacked experts, a router computed in the kernel picks each token's expert (top-1, ties to expert 0, as
`MoEFeedForward` in eval) and the token then reads only that expert's weights: every token pays for one FFN
and there is no host synchronisation, no sort and no data-dependent shape. Shift experts arrive as their
decoded weights (exact +-2^k, see kernels/mat_shift.py for why that is the fast form on CPU/GPU).

Layout: x [tiles, TILE, C] fp32 with a symbolic tile count (the last partial tile follows the facade's tail
rule, kernels.dispatch.run_tiled).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.models.transformers import FeedForward
from gnt_shiftadd.shiftadd.moe import MoEFeedForward
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear
from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, linear_weight, run_tiled
from kernels.mat_shift import TILE

__all__ = ["FFNWeights", "ffn_weights", "route_tokens", "reference_ffn_sublayer", "gemm_ffn_sublayer",
           "make_ffn_sublayer", "ffn_sublayer"]


@dataclass
class FFNWeights:
    """Stacked expert weights, fp32 and contiguous, ready for the kernel.

    fc1 [E, C, H] and fc2 [E, H, C] (transposed so the kernel's vector loads run over the output channels),
    b1 [E, H], b2 [E, C]; router_w [E, C], router_b [E] (E = 1: no router); LayerNorm gamma/beta [C], eps.
    """

    fc1: torch.Tensor
    b1: torch.Tensor
    fc2: torch.Tensor
    b2: torch.Tensor
    router_w: torch.Tensor
    router_b: torch.Tensor
    ln_w: torch.Tensor
    ln_b: torch.Tensor
    eps: float

    @property
    def num_experts(self) -> int:
        return self.fc1.shape[0]


def _bias(linear: nn.Module, size: int, like: torch.Tensor) -> torch.Tensor:
    return linear.bias.detach() if linear.bias is not None else like.new_zeros(size)


def ffn_weights(norm: nn.LayerNorm, ff: nn.Module) -> FFNWeights:
    """From a block's ff_norm and ff (FeedForward with nn.Linear or ShiftLinear layers, or MoEFeedForward of such
    FeedForwards with the straight-through gate). Raises TypeError for anything else, ValueError for fixed-point
    shift layers (their input rounding is not in the kernel)."""
    if isinstance(ff, MoEFeedForward):
        if ff.gate_scaling != "straight_through":
            raise TypeError("the fused FFN kernel supports the straight-through MoE gate only")
        experts = list(ff.experts)
        router_w, router_b = ff.router.weight.detach(), ff.router.bias.detach()
    elif isinstance(ff, FeedForward):
        experts = [ff]
        router_w = router_b = None  # one expert: no router
    else:
        raise TypeError(f"unsupported FFN {type(ff).__name__}")
    if not all(isinstance(e, FeedForward) for e in experts):
        raise TypeError("every MoE expert must be a FeedForward")
    hidden, dim = experts[0].fc1.out_features, experts[0].fc1.in_features
    fc1 = torch.stack([linear_weight(e.fc1).t() for e in experts])
    fc2 = torch.stack([linear_weight(e.fc2).t() for e in experts])
    b1 = torch.stack([_bias(e.fc1, hidden, fc1) for e in experts])
    b2 = torch.stack([_bias(e.fc2, dim, fc2) for e in experts])
    if router_w is None:
        router_w, router_b = fc1.new_zeros(1, dim), fc1.new_zeros(1)
    ln_w = norm.weight.detach() if norm.weight is not None else fc1.new_ones(dim)
    ln_b = norm.bias.detach() if norm.bias is not None else fc1.new_zeros(dim)
    return FFNWeights(*(kernel_ready(t, torch.float32) for t in (fc1, b1, fc2, b2, router_w, router_b, ln_w, ln_b)),
                      eps=float(norm.eps))


def route_tokens(x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
    """x [N, C] -> each token's expert, int64 [N] (top-1 of the router on LN(x); ties to the lower index)."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), w.ln_w, w.ln_b, w.eps)
    if w.num_experts == 1:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return (normed @ w.router_w.t() + w.router_b).argmax(dim=-1)


def reference_ffn_sublayer(x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
    """x [N, C] -> x + FFN_e(LN(x)) [N, C]; the ground truth of the kernel."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), w.ln_w, w.ln_b, w.eps)
    chosen = route_tokens(x, w)
    hidden = torch.relu(torch.einsum("nc,nch->nh", normed, w.fc1[chosen]) + w.b1[chosen])
    out = torch.einsum("nh,nhc->nc", hidden, w.fc2[chosen]) + w.b2[chosen]
    return (x.float() + out).to(x.dtype)


def gemm_ffn_sublayer(x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
    """x [..., C] -> x + FFN(LN(x)) for one expert with two BLAS GEMMs (the fast path on CPU, see kernels.apply)."""
    if w.num_experts != 1:
        raise ValueError(f"gemm_ffn_sublayer takes one expert, got {w.num_experts}")
    flat = x.reshape(-1, x.shape[-1]).float()
    normed = F.layer_norm(flat, (flat.shape[-1],), w.ln_w, w.ln_b, w.eps)
    hidden = torch.addmm(w.b1[0], normed, w.fc1[0]).relu_()
    return torch.addmm(w.b2[0], hidden, w.fc2[0]).add_(flat).to(x.dtype).reshape(x.shape)


def make_ffn_sublayer(target: dict, dim: int, hidden: int, experts: int, eps: float):
    """IRModule "main"(x [tiles, TILE, C], ln_w [C], ln_b [C], router_w [E, C], router_b [E], fc1 [E, C, H],
    b1 [E, H], fc2 [E, H, C], b2 [E, C], out [tiles, TILE, C]); eps is baked in. The routing decision stays
    inside the kernel (a second output would have to leave the tile loop); `route_tokens` gives it when needed."""
    import tvm  # lazy: TVM is optional (the references run without it)
    from tvm import s_tir, te, tirx  # lazy: TVM is optional (the references run without it)

    tiles = te.var("tiles")
    x = te.placeholder((tiles, TILE, dim), "float32", name="x")
    ln_w = te.placeholder((dim,), "float32", name="ln_w")
    ln_b = te.placeholder((dim,), "float32", name="ln_b")
    router_w = te.placeholder((experts, dim), "float32", name="router_w")
    router_b = te.placeholder((experts,), "float32", name="router_b")
    fc1 = te.placeholder((experts, dim, hidden), "float32", name="fc1")
    b1 = te.placeholder((experts, hidden), "float32", name="b1")
    fc2 = te.placeholder((experts, hidden, dim), "float32", name="fc2")
    b2 = te.placeholder((experts, dim), "float32", name="b2")

    c = te.reduce_axis((0, dim), "c")
    mean = te.compute((tiles, TILE), lambda t, i: te.sum(x[t, i, c] / dim, axis=c), name="mean")
    c2 = te.reduce_axis((0, dim), "c2")
    var = te.compute((tiles, TILE), lambda t, i: te.sum((x[t, i, c2] - mean[t, i]) * (x[t, i, c2] - mean[t, i])
                                                        / dim, axis=c2), name="var")
    normed = te.compute((tiles, TILE, dim), lambda t, i, j: (x[t, i, j] - mean[t, i])
                        * tirx.rsqrt(var[t, i] + tirx.const(eps, "float32")) * ln_w[j] + ln_b[j], name="normed")
    if experts > 1:
        c3 = te.reduce_axis((0, dim), "c3")
        logits = te.compute((tiles, TILE, experts), lambda t, i, e: te.sum(normed[t, i, c3] * router_w[e, c3],
                                                                          axis=c3), name="logits")

        def pick(t, i):  # first maximum wins, as torch.argmax
            best = tirx.const(0, "int32")
            best_value = logits[t, i, 0] + router_b[0]
            for e in range(1, experts):
                value = logits[t, i, e] + router_b[e]
                better = value > best_value
                best = tirx.if_then_else(better, tirx.const(e, "int32"), best)
                best_value = tirx.if_then_else(better, value, best_value)
            return best

        chosen = te.compute((tiles, TILE), pick, name="chosen")
    else:
        chosen = te.compute((tiles, TILE), lambda t, i: tirx.const(0, "int32"), name="chosen")
    c4 = te.reduce_axis((0, dim), "c4")
    pre = te.compute((tiles, TILE, hidden), lambda t, i, h: te.sum(normed[t, i, c4] * fc1[chosen[t, i], c4, h],
                                                                    axis=c4), name="pre")
    act = te.compute((tiles, TILE, hidden), lambda t, i, h: te.max(pre[t, i, h] + b1[chosen[t, i], h],
                                                                   tirx.const(0.0, "float32")), name="act")
    r = te.reduce_axis((0, hidden), "r")
    proj = te.compute((tiles, TILE, dim), lambda t, i, j: te.sum(act[t, i, r] * fc2[chosen[t, i], r, j], axis=r),
                      name="proj")
    out = te.compute((tiles, TILE, dim), lambda t, i, j: x[t, i, j] + proj[t, i, j] + b2[chosen[t, i], j],
                     name="out")
    func = te.create_prim_func([x, ln_w, ln_b, router_w, router_b, fc1, b1, fc2, b2, out])
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    stages = ["mean", "var", "normed"] + (["logits"] if experts > 1 else []) + ["chosen", "pre", "act", "proj"]
    if target["kind"] == "cuda":
        _schedule_cuda(sch, stages)
    else:
        _schedule_cpu(sch, stages, dim, hidden)
    return sch.mod


def _vectorize_last(sch, block_name: str, extent: int) -> None:
    loops = sch.get_loops(sch.get_sblock(block_name))
    for width in (16, 8, 4):
        if extent % width == 0 and extent >= width:
            _, inner = sch.split(loops[-1], [None, width])
            sch.vectorize(inner)
            return


def _schedule_cpu(sch, stages: list[str], dim: int, hidden: int) -> None:
    """Parallel over tiles; every intermediate is computed inside its tile (a few KB, stays in L1/L2)."""
    out_block = sch.get_sblock("out")
    tile = sch.get_loops(out_block)[0]
    sch.parallel(tile)
    for name in reversed(stages):
        sch.compute_at(sch.get_sblock(name), tile)
    for name, extent in (("pre", hidden), ("proj", dim)):  # matmuls: k outer, tokens unrolled, outputs vectorized
        block = sch.get_sblock(name)
        token, channel, k = sch.get_loops(block)[-3:]
        for width in (16, 8, 4):
            if extent % width == 0 and extent >= width:
                outer, inner = sch.split(channel, [None, width])
                sch.reorder(outer, k, token, inner)
                sch.vectorize(inner)
                sch.unroll(token)
                break
        sch.decompose_reduction(block, k)
    _vectorize_last(sch, "act", hidden)
    _vectorize_last(sch, "out", dim)
    _vectorize_last(sch, "normed", dim)


def _schedule_cuda(sch, stages: list[str]) -> None:
    """One block per tile, 128 threads; intermediates in shared memory, each stage's elements spread over threads."""
    threads = 128
    out_block = sch.get_sblock("out")
    tile, token, channel = sch.get_loops(out_block)
    sch.bind(tile, "blockIdx.x")
    _, inner = sch.split(sch.fuse(token, channel), [None, threads])
    sch.bind(inner, "threadIdx.x")
    for name in reversed(stages):
        block = sch.get_sblock(name)
        sch.compute_at(block, tile)
        sch.set_scope(block, 0, "shared")
        loops = sch.get_loops(block)[1:]
        iter_types = sch.get(block).iter_vars
        spatial = [loop for loop, iv in zip(loops, iter_types[1:]) if int(iv.iter_type) == 0]
        _, inner = sch.split(sch.fuse(*spatial), [None, threads])
        sch.bind(inner, "threadIdx.x")


def ffn_sublayer(x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
    """x [..., C] fp32 -> x + FFN_e(LN(x)) [..., C] on the TVM kernel (the reference if it cannot be built)."""
    experts, dim, hidden = w.fc1.shape
    if x.shape[-1] != dim:
        raise ValueError(f"ffn_sublayer: x has {x.shape[-1]} channels, the weights expect {dim}")
    if x.dtype != torch.float32:
        raise ValueError(f"ffn_sublayer: x must be float32, got {x.dtype}")
    lead = x.shape[:-1]
    flat = x.reshape(-1, dim)
    key = {"dim": dim, "hidden": hidden, "experts": experts, "eps": w.eps}
    kernel = get_kernel("ffn_sublayer", key, x.device, lambda t: make_ffn_sublayer(t, dim, hidden, experts, w.eps))
    if kernel is None:
        return reference_ffn_sublayer(flat, w).reshape(*lead, dim)
    rows = kernel_ready(flat)
    out = torch.empty_like(rows)

    def launch(inputs, outputs):
        kernel(inputs[0].view(-1, TILE, dim), w.ln_w, w.ln_b, w.router_w, w.router_b, w.fc1, w.b1, w.fc2, w.b2,
               outputs[0].view(-1, TILE, dim))

    run_tiled(launch, TILE, rows.shape[0], [rows], [out])
    return out.reshape(*lead, dim)
