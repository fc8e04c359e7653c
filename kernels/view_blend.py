"""One fused TVM kernel for the blend colour head's per-(sample, view) work (models.heads.ViewColorBlend).

The blend head weighs every source view's colour at every sample: T = rays x samples tokens (about a million per
252x189 frame), V views, C = netwidth channels, H = the head's hidden width. In PyTorch that is a
[T, V, 2C + 4] concatenation, a [T, V, H] product, ReLU, a [T, V, 1] product, a masked softmax and the blend:
0.7-0.95 s of a 6 s CPU frame before this kernel (results/kernels_blend_cpu.md at commit ccfc93f, "head"). Here,
per token, nothing of size [V, H] leaves L1:

    hidden = relu(features @ Wf^T + ray_diff @ Wr^T + hq)        [T, V, H]   (hq = W_q LN(q) + b, once per token)
    logit  = hidden @ w2 + b2, finfo.min where the view is invisible  [T, V]
    w      = softmax_V(logit) * mask                               [T, V]
    out    = sum_V w * colors                                      [T, 3]      (0 for a token no view sees)

hq comes in precomputed (one small [T, C] x [C, H] product in PyTorch); the softmax over a ray's samples stays in
PyTorch ([R, S], cheap). Weights are fp32, transposed [in, out] (PreparedBlendWeights).

Layout as in kernels.view_attention: tokens in tiles of TILE (a symbolic count NT of tiles, never split, so one
build serves every chunk size); the wrapper runs the tile-aligned prefix in place and the last partial tile padded
with tokens no view sees (kernels.dispatch.run_tiled). CPU: parallel over tiles, token by token, the [V, H]
product vectorized over H with the V rows in registers. CUDA: one thread block per tile, the [tile, V, H] product
in shared memory, one thread per (token, colour channel) for the softmax and the blend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kernels.build import kernel_ready
from kernels.dispatch import get_kernel, needs_grad, note_kernel, run_tiled
from kernels.te_math import register_blocked, vector_exp, vector_lanes

__all__ = ["TILE", "PreparedBlendWeights", "reference_view_blend", "make_view_blend", "view_blend_kernel",
           "view_blend"]

TILE = 16  # tokens per tile (CPU parallel unit, CUDA thread block)
_RAY_DIFF_DIM = 4
_RGB = 3
CUDA_THREADS = 128
_CUDA_SHARED_BYTES = 40 * 1024


# ----------------------------------------------------------------------------------------------------------------
# Weights and the PyTorch reference
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PreparedBlendWeights:
    """fc1 (Linear(2C + 4 -> H), input blocks [features, h, ray_diff]) and fc2 (Linear(H -> 1)) in the kernel's
    layout: features_t [C, H], ray_t [4, H], fc2_w [H], fc2_b [1]; per_sample_w [H, C] and fc1_b [H] make hq in
    PyTorch. Contiguous fp32 snapshots (build again after changing the layers)."""

    features_t: torch.Tensor
    ray_t: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor
    per_sample_w: torch.Tensor
    fc1_b: torch.Tensor

    @property
    def channels(self) -> int:
        return self.features_t.shape[0]

    @property
    def hidden(self) -> int:
        return self.features_t.shape[1]

    @property
    def device(self) -> torch.device:
        return self.features_t.device

    @classmethod
    def from_linears(cls, fc1: nn.Module, fc2: nn.Module) -> "PreparedBlendWeights":
        """TypeError unless both are plain nn.Linear; ValueError for shapes that are not a blend head's."""
        for name, layer in (("fc1", fc1), ("fc2", fc2)):
            if type(layer) is not nn.Linear:
                raise TypeError(f"view blend kernel: {name} must be a plain nn.Linear, got {type(layer).__name__}")
        if fc2.out_features != 1 or fc2.in_features != fc1.out_features:
            raise ValueError(f"view blend kernel: fc2 must be Linear({fc1.out_features} -> 1), "
                             f"got Linear({fc2.in_features} -> {fc2.out_features})")
        if (fc1.in_features - _RAY_DIFF_DIM) % 2 or fc1.in_features <= _RAY_DIFF_DIM:
            raise ValueError(f"view blend kernel: fc1 must take 2C + 4 inputs, got {fc1.in_features}")
        channels = (fc1.in_features - _RAY_DIFF_DIM) // 2
        weight = fc1.weight.detach().float()
        bias = fc1.bias.detach().float() if fc1.bias is not None else weight.new_zeros(fc1.out_features)
        fc2_b = fc2.bias.detach().float() if fc2.bias is not None else weight.new_zeros(1)
        layout = lambda t: kernel_ready(t.clone(), torch.float32)  # noqa: E731 (snapshots, not views)
        return cls(features_t=layout(weight[:, :channels].t()), ray_t=layout(weight[:, 2 * channels:].t()),
                   fc2_w=layout(fc2.weight.detach().float().reshape(-1)), fc2_b=layout(fc2_b.reshape(1)),
                   per_sample_w=layout(weight[:, channels:2 * channels]), fc1_b=layout(bias))

    def per_sample(self, h: torch.Tensor) -> torch.Tensor:
        """hq = W_q h + b: [..., C] -> [..., H] (fp32)."""
        return F.linear(h.float(), self.per_sample_w, self.fc1_b)

    def kernel_arguments(self) -> tuple[torch.Tensor, ...]:
        return self.features_t, self.ray_t, self.fc2_w, self.fc2_b


def reference_view_blend(hq: torch.Tensor, features: torch.Tensor, colors: torch.Tensor, ray_diff: torch.Tensor,
                         mask: torch.Tensor, features_t: torch.Tensor, ray_t: torch.Tensor, fc2_w: torch.Tensor,
                         fc2_b: torch.Tensor) -> torch.Tensor:
    """ViewColorBlend after hq (the ground truth and the fallback): hq [..., H], features [..., V, C],
    colors [..., V, 3], ray_diff [..., V, 4], mask [..., V] (1 = visible) -> [..., 3] fp32."""
    hidden = F.relu(features.float() @ features_t + ray_diff.float() @ ray_t + hq.float()[..., None, :])
    logits = hidden @ fc2_w + fc2_b  # [..., V]
    mask = mask.float()
    logits = logits.masked_fill(mask <= 0, torch.finfo(torch.float32).min)
    weights = torch.softmax(logits, dim=-1) * mask
    return (weights[..., None] * colors.float()).sum(dim=-2)


# ----------------------------------------------------------------------------------------------------------------
# TVM kernel
# ----------------------------------------------------------------------------------------------------------------

def _view_blend_compute(views: int, channels: int, hidden: int, fast_exp: bool):
    """TE definition; the arguments in call order (output last), shapes as in the module doc with tokens as
    [NT, TILE]."""
    from tvm import te, tirx  # lazy: TVM is optional (the references run without it)

    exp = vector_exp if fast_exp else tirx.exp
    num_tiles = te.var("num_tiles")
    hq = te.placeholder((num_tiles, TILE, hidden), name="hq")
    features = te.placeholder((num_tiles, TILE, views, channels), name="features")
    colors = te.placeholder((num_tiles, TILE, views, _RGB), name="colors")
    ray_diff = te.placeholder((num_tiles, TILE, views, _RAY_DIFF_DIM), name="ray_diff")
    mask = te.placeholder((num_tiles, TILE, views), name="mask")
    features_t = te.placeholder((channels, hidden), name="features_t")
    ray_t = te.placeholder((_RAY_DIFF_DIM, hidden), name="ray_t")
    fc2_w = te.placeholder((hidden,), name="fc2_w")
    fc2_b = te.placeholder((1,), name="fc2_b")
    zero = tirx.const(0.0, "float32")
    lowest = tirx.const(float(torch.finfo(torch.float32).min), "float32")

    c = te.reduce_axis((0, channels), name="c")
    pre = te.compute((num_tiles, TILE, views, hidden),
                     lambda n, t, v, h: te.sum(features[n, t, v, c] * features_t[c, h], axis=c), name="pre")
    act = te.compute(
        (num_tiles, TILE, views, hidden),
        lambda n, t, v, h: te.max(pre[n, t, v, h] + hq[n, t, h]
                                  + sum(ray_diff[n, t, v, i] * ray_t[i, h] for i in range(_RAY_DIFF_DIM)), zero),
        name="act")
    # fc2 in two steps so that the CPU vectorizes it: `lanes` partial sums over H, then their sum
    lanes = vector_lanes(hidden)
    k = te.reduce_axis((0, hidden // lanes), name="k")
    partial = te.compute((num_tiles, TILE, views, lanes),
                         lambda n, t, v, lane: te.sum(act[n, t, v, k * lanes + lane] * fc2_w[k * lanes + lane], axis=k),
                         name="partial")
    score = te.compute((num_tiles, TILE, views),
                       lambda n, t, v: sum(partial[n, t, v, lane] for lane in range(lanes)), name="score")
    logits = te.compute((num_tiles, TILE, views),
                        lambda n, t, v: tirx.if_then_else(mask[n, t, v] <= zero, lowest, score[n, t, v] + fc2_b[0]),
                        name="logits")

    def over_views(combine, term):
        value = term(0)
        for view in range(1, views):
            value = combine(value, term(view))
        return value

    peak = te.compute((num_tiles, TILE), lambda n, t: over_views(te.max, lambda view: logits[n, t, view]), name="peak")
    exps = te.compute((num_tiles, TILE, views), lambda n, t, v: exp(logits[n, t, v] - peak[n, t]), name="exps")
    # denominator >= 1 (the peak view gives exp(0)): a token no view sees gets 0 * mask = 0, never NaN
    denominator = te.compute((num_tiles, TILE), lambda n, t: over_views(lambda a, b: a + b,
                                                                         lambda view: exps[n, t, view]),
                             name="denominator")
    out = te.compute(
        (num_tiles, TILE, _RGB),
        lambda n, t, ch: over_views(lambda a, b: a + b, lambda view: exps[n, t, view] / denominator[n, t]
                                    * mask[n, t, view] * colors[n, t, view, ch]), name="out")
    return [hq, features, colors, ray_diff, mask, features_t, ray_t, fc2_w, fc2_b, out]




def _schedule_cpu(sch, hidden: int) -> None:
    """Parallel over tiles, then token by token; every per-token stage lives in a small L1 buffer under the token
    loop. The [V, H] product keeps one 16-wide chunk of H for all V views in registers while it runs over C."""
    out = sch.get_sblock("out")
    n, token, _ = sch.get_loops(out)
    sch.parallel(n)
    for name in ("denominator", "exps", "peak", "logits", "score", "partial", "act", "pre"):
        sch.compute_at(sch.get_sblock(name), token, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(sch.get_sblock("act"))[-1])  # over H
    partial = sch.get_sblock("partial")
    view, lane, k = sch.get_loops(partial)[-3:]
    sch.reorder(k, view, lane)
    sch.unroll(view)
    sch.vectorize(lane)
    sch.decompose_reduction(partial, k)
    register_blocked(sch, "pre", hidden)
    for name in ("exps", "logits"):
        sch.unroll(sch.get_loops(sch.get_sblock(name))[-1])  # over views


def _schedule_cuda(sch, threads: int) -> None:
    """One thread block per tile: the [tile, V, H] product spread over the block's threads into shared memory;
    scores per (token, view) in shared memory; one thread per (token, colour channel) takes the softmax (peak and
    denominator in registers) and the blend."""
    out = sch.get_sblock("out")
    n, token, channel = sch.get_loops(out)
    sch.bind(n, "blockIdx.x")
    _, lane = sch.split(sch.fuse(token, channel), factors=[None, threads])
    sch.bind(lane, "threadIdx.x")
    for name in ("exps", "act"):
        sch.compute_inline(sch.get_sblock(name))
    for name in ("denominator", "peak"):
        sch.compute_at(sch.get_sblock(name), lane)
        sch.set_scope(sch.get_sblock(name), 0, "local")
    for name, reduces in (("logits", False), ("score", False), ("partial", True), ("pre", True)):
        block = sch.get_sblock(name)
        stage = sch.cache_write(block, 0, "local") if reduces else block
        sch.compute_at(stage, n)
        sch.set_scope(stage, 0, "shared")
        _, lane = sch.split(sch.fuse(*sch.get_loops(stage)[1:]), factors=[None, threads])
        sch.bind(lane, "threadIdx.x")
        if reduces:
            sch.compute_at(block, lane)


def make_view_blend(target: dict, views: int, channels: int, hidden: int):
    """The scheduled IRModule for one (views, channels, hidden) on `target` (a TVM target dict). Arguments of
    `main`: hq [NT, TILE, H], features [NT, TILE, V, C], colors [NT, TILE, V, 3], ray_diff [NT, TILE, V, 4],
    mask [NT, TILE, V], PreparedBlendWeights.kernel_arguments(), out [NT, TILE, 3]; all fp32, NT symbolic."""
    import tvm  # lazy: TVM is optional
    from tvm import s_tir, te

    on_cuda = target["kind"] == "cuda"
    if on_cuda and TILE * views * hidden * 4 > _CUDA_SHARED_BYTES:
        raise ValueError(f"view blend kernel: {views} views x {hidden} hidden units do not fit the CUDA tile's "
                         f"shared memory ({_CUDA_SHARED_BYTES} bytes)")
    arguments = _view_blend_compute(views, channels, hidden, fast_exp=not on_cuda)
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func(arguments)}))
    if on_cuda:
        _schedule_cuda(sch, CUDA_THREADS)
    else:
        _schedule_cpu(sch, hidden)
    return sch.mod


def view_blend_kernel(device: torch.device | str, views: int, channels: int, hidden: int) -> Callable | None:
    """The compiled kernel for `device`, or None (one warning) when none can be had (kernels.dispatch.get_kernel)."""
    key = {"views": views, "channels": channels, "hidden": hidden, "tile": TILE}
    return get_kernel("view_blend", key, torch.device(device),
                      lambda target: make_view_blend(target, views, channels, hidden))


# ----------------------------------------------------------------------------------------------------------------
# Public wrapper
# ----------------------------------------------------------------------------------------------------------------

def _validate(hq, features, colors, ray_diff, mask, weights: PreparedBlendWeights) -> tuple[int, torch.Size]:
    for name, tensor in (("hq", hq), ("features", features), ("colors", colors), ("ray_diff", ray_diff),
                         ("mask", mask)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"view_blend: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != features.device:
            raise ValueError(f"view_blend: {name} is on {tensor.device} but features is on {features.device}")
    if features.dim() < 3 or features.shape[-1] != weights.channels:
        raise ValueError(f"view_blend: features must be [..., V, C={weights.channels}], got {tuple(features.shape)}")
    lead, views = features.shape[:-2], features.shape[-2]
    expected = {"hq": (*lead, weights.hidden), "colors": (*lead, views, _RGB),
                "ray_diff": (*lead, views, _RAY_DIFF_DIM), "mask": (*lead, views)}
    for name, tensor in (("hq", hq), ("colors", colors), ("ray_diff", ray_diff), ("mask", mask)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"view_blend: {name} must be {expected[name]} to match features "
                             f"{tuple(features.shape)}, got {tuple(tensor.shape)}")
    if weights.device != features.device:
        raise ValueError(f"view_blend: weights are on {weights.device} but features is on {features.device}")
    return views, lead


def view_blend(hq: torch.Tensor, features: torch.Tensor, colors: torch.Tensor, ray_diff: torch.Tensor,
               mask: torch.Tensor, weights: PreparedBlendWeights) -> torch.Tensor:
    """The fused kernel on torch tensors; same result as reference_view_blend (fp32 rounding aside).

    hq [..., H], features [..., V, C], colors [..., V, 3], ray_diff [..., V, 4], mask [..., V] -> [..., 3] fp32.
    Inference only: with gradients needed, or no kernel to be had (one warning), the reference runs instead."""
    views, lead = _validate(hq, features, colors, ray_diff, mask, weights)
    if needs_grad(hq, features, colors, ray_diff, mask):
        note_kernel("view_blend", "reference")
        return reference_view_blend(hq, features, colors, ray_diff, mask, *weights.kernel_arguments())
    kernel = view_blend_kernel(features.device, views, weights.channels, weights.hidden)
    if kernel is None:
        return reference_view_blend(hq, features, colors, ray_diff, mask, *weights.kernel_arguments())
    tokens, channels, hidden = math.prod(lead), weights.channels, weights.hidden
    rows = [kernel_ready(hq.reshape(tokens, hidden), torch.float32),
            kernel_ready(features.reshape(tokens, views, channels), torch.float32),
            kernel_ready(colors.reshape(tokens, views, _RGB), torch.float32),
            kernel_ready(ray_diff.reshape(tokens, views, _RAY_DIFF_DIM), torch.float32),
            kernel_ready(mask.reshape(tokens, views), torch.float32)]
    out = torch.empty(tokens, _RGB, dtype=torch.float32, device=features.device)

    def launch(inputs, outputs) -> None:
        hq_part, feature_part, color_part, ray_part, mask_part = inputs
        kernel(hq_part.view(-1, TILE, hidden), feature_part.view(-1, TILE, views, channels),
               color_part.view(-1, TILE, views, _RGB), ray_part.view(-1, TILE, views, _RAY_DIFF_DIM),
               mask_part.view(-1, TILE, views), *weights.kernel_arguments(), outputs[0].view(-1, TILE, _RGB))

    run_tiled(launch, TILE, tokens, rows, [out])  # padded tokens: no view sees them, their output is 0
    return out.view(*lead, _RGB)
