"""Switch a trained (ShiftAdd-)GNT to the compiled TVM kernels for inference: `use_kernels(model)`.

In place, torchao-style: every transformer block of `model.transformer` is swapped for a kernel-backed block
that reads the same trained parameters (the original block is kept inside it, so its state_dict keys, op
counts and training code paths are unchanged); `ShiftLinear`s elsewhere run on MatShift. What runs where:

  front end:   grid_sample outputs -> per-view feature MLP + masked max-pool over views in one kernel (no
               [rays, samples, views, 3 + F] concatenation)
  view block:  LN + q_fc (torch / MatShift) -> fused view attention (one kernel: k/v projections, pos MLP,
               attention MLP, masked softmax over views, weighted sum) -> out_fc + residual -> fused FFN sublayer
  ray block:   LN + q/k/v (torch / MatShift) -> hashed attention (hash+pack, then the fused XOR/popcount
               softmax kernel or the additive linear form) or torch SDPA when dense -> out_fc -> fused FFN
  FFN:         LN + FFN (+ in-kernel MoE routing) + residual in one kernel, for dense, shift and MoE FFNs

Every kernel is called through its torch custom op (`kernels/ops.py`), so a kernel-backed model still traces
with torch.compile (one opaque node per kernel). Inference only (no autograd through the kernels; call
`model.eval()` first). The CNN, the projection into the source views and the small per-token MLPs stay in
PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.models.transformers import RayTransformerBlock, ViewTransformerBlock
from gnt_shiftadd.shiftadd.hashed_attention import HashedLinearAttention, HashedQuadraticAttention, \
    SeedLinearAttention
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, decode_shift_codes
from kernels.backend import resolve_backend, warn_once
from kernels.ffn import FFNWeights, ffn_weights, gemm_ffn_sublayer
from gnt_shiftadd.models.projector import sample_source_views
from kernels.ops import ffn_sublayer, hash_pack, linear_attention, mat_shift, quadratic_attention, view_attention, \
    view_features
from kernels.view_features import ViewFeatureWeights
from kernels.view_attention import PreparedViewWeights, view_attention_weights

__all__ = ["use_kernels", "KernelFrontEnd", "KernelShiftLinear", "KernelViewBlock", "KernelRayBlock", "kernel_summary"]


GEMM_CHOICES = ("auto", "tvm", "blas")


def _check_gemm(gemm: str) -> None:
    if gemm not in GEMM_CHOICES:
        raise ValueError(f"gemm must be one of {GEMM_CHOICES}, got {gemm!r}")


def _gemm_on_tvm(gemm: str, device: torch.device) -> bool:
    """Where dense-shaped products (shift linears, one-expert FFNs) run. "auto": the TVM kernels on CUDA, the
    platform BLAS on CPU, where MKL's GEMM on the decoded +-2^k weights (same math) was as fast or faster than
    MatShift and the fused FFN (results/gemm_choice_cpu.json): a CPU has no cheaper fp32 shift-multiply."""
    _check_gemm(gemm)
    return gemm == "tvm" or (gemm == "auto" and device.type == "cuda")


def run_ffn(x: torch.Tensor, w: FFNWeights, on_tvm: bool) -> torch.Tensor:
    """x + FFN(LN(x)): the fused kernel (always for MoE: routing without host sync) or two BLAS GEMMs."""
    if on_tvm or w.num_experts > 1:
        return ffn_sublayer(x, w)
    return gemm_ffn_sublayer(x, w)


class KernelShiftLinear(nn.Module):
    """A ShiftLinear evaluated from its exported codes: the MatShift kernel, or a BLAS GEMM on the decoded
    weight (see `_gemm_on_tvm`). x [..., in] -> [..., out]."""

    def __init__(self, source: ShiftLinear, gemm: str = "auto"):
        super().__init__()
        self.source = source
        device = source.sign_param.device
        self.on_tvm = _gemm_on_tvm(gemm, device)
        packed = source.export_codes()
        self.packed = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}
        self.weight = decode_shift_codes(packed).to(device)  # exact +-2^k (or 0), for the BLAS path
        self.bias = packed["bias"].to(device) if packed["bias"] is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source.spec.fixed_point_bits:  # no kernel has the fixed-point input path
            return self.source(x)
        if self.on_tvm:
            return mat_shift(x, self.packed)
        return F.linear(x, self.weight, self.bias)


class KernelFrontEnd(nn.Module):
    """GNT.front_end on the view-features kernel: (points [R, S, 3], target_origin [3], views) -> (features
    [R, S, V, C], q [R, S, C], ray_diff [R, S, V, 4], mask [R, S, V, 1], colors [R, S, V, 3]), as the
    transformer's own front."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.weights = ViewFeatureWeights.from_linears(transformer.rgbfeat_fc1, transformer.rgbfeat_fc2)

    def forward(self, points, target_origin, views):
        rgb, feat, ray_diff, mask = sample_source_views(points, target_origin, views)
        num_views, rays, samples = rgb.shape[0], points.shape[0], points.shape[1]
        tokens_mask = mask.reshape(rays * samples, num_views)
        features, q = view_features(rgb.reshape(num_views, 3, -1), feat.reshape(num_views, feat.shape[1], -1),
                                    tokens_mask, self.weights)
        channels = q.shape[-1]
        colors = rgb.permute(2, 3, 0, 1)  # [R, S, V, 3], a view: only the blend colour head reads it
        return (features.view(rays, samples, num_views, channels), q.view(rays, samples, channels), ray_diff,
                tokens_mask.view(rays, samples, num_views, 1), colors)


class KernelViewBlock(nn.Module):
    """ViewTransformerBlock on the fused view-attention and FFN kernels.
    q [R, S, C], features [R, S, V, C], ray_diff [R, S, V, 4], mask [R, S, V, 1] -> [R, S, C]."""

    def __init__(self, block: ViewTransformerBlock, gemm: str = "auto"):
        super().__init__()
        self.block = block
        self.ffn_on_tvm = _gemm_on_tvm(gemm, block.ff_norm.weight.device)
        self.view_weights = PreparedViewWeights.from_dict(view_attention_weights(block.attn))
        self.ffn: FFNWeights = ffn_weights(block.ff_norm, block.ff)

    def forward(self, q, features, ray_diff, mask):
        rays, samples, views, dim = features.shape
        attn = self.block.attn
        query = attn.q_fc(self.block.attn_norm(q)).reshape(-1, dim)
        mixed = view_attention(query, features.reshape(-1, views, dim), ray_diff.reshape(-1, views, 4),
                               mask.reshape(-1, views), self.view_weights)
        q = q + attn.out_fc(mixed).reshape(rays, samples, dim)
        return run_ffn(q, self.ffn, self.ffn_on_tvm)


class KernelRayBlock(nn.Module):
    """RayTransformerBlock with the hashed attention (or SDPA when dense) and the fused FFN kernel.
    x [R, S, C] -> [R, S, C]."""

    def __init__(self, block: RayTransformerBlock, gemm: str = "auto"):
        super().__init__()
        self.block = block
        self.ffn_on_tvm = _gemm_on_tvm(gemm, block.ff_norm.weight.device)
        self.ffn: FFNWeights = ffn_weights(block.ff_norm, block.ff)

    def _attention(self, q, k, v):
        core = self.block.attn.core
        if isinstance(core, HashedQuadraticAttention):
            hasher = core.hasher
            words_q = hash_pack(q, hasher.weight.detach(), hasher.bias.detach())
            words_k = hash_pack(k, hasher.weight.detach(), hasher.bias.detach())
            return quadratic_attention(words_q, words_k, v, core.scale.detach(), hasher.n_bits)
        if isinstance(core, HashedLinearAttention) and not isinstance(core, SeedLinearAttention):
            hasher = core.hasher
            words_q = hash_pack(q, hasher.weight.detach(), hasher.bias.detach())
            words_k = hash_pack(k, hasher.weight.detach(), hasher.bias.detach())
            return linear_attention(words_q, words_k, v, hasher.n_bits)
        return core(q, k, v)  # dense SDPA and the seed's linear form (conv branch) stay in PyTorch

    def forward(self, x):
        attn = self.block.attn
        normed = self.block.attn_norm(x)
        q, k, v = (attn._split_heads(fc(normed)).contiguous() for fc in (attn.q_fc, attn.k_fc, attn.v_fc))
        out = self._attention(q, k, v).transpose(1, 2).flatten(2)
        return run_ffn(x + attn.out_fc(out), self.ffn, self.ffn_on_tvm)


def _swap_shift_linears(module: nn.Module, gemm: str) -> int:
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, ShiftLinear):
            setattr(module, name, KernelShiftLinear(child, gemm))
            swapped += 1
        elif not isinstance(child, KernelShiftLinear):
            swapped += _swap_shift_linears(child, gemm)
    return swapped


@torch.no_grad()
def use_kernels(model: nn.Module, backend: str = "tvm", gemm: str = "auto") -> dict:
    """Swap `model` (a GNT; in eval mode) to kernel-backed blocks in place when backend resolves to "tvm".

    `gemm` picks where dense-shaped products run ("auto": TVM on CUDA, BLAS on CPU; "tvm" or "blas" to force).

    Returns a summary {"backend", "view_blocks", "ray_blocks", "shift_linears"}. With backend "torch" (or when TVM
    is unavailable, after one warning) the model is left untouched: the PyTorch modules are the reference.
    """
    backend = resolve_backend(backend)
    summary = {"backend": backend, "view_blocks": 0, "ray_blocks": 0, "shift_linears": 0, "front_end": 0}
    if backend == "torch":
        return summary
    if model.training:
        raise RuntimeError("use_kernels is for inference: call model.eval() first")
    _check_gemm(gemm)  # before anything is swapped
    transformer = model.transformer
    for blocks, kind, wrapper in ((transformer.view_blocks, ViewTransformerBlock, KernelViewBlock),
                                  (transformer.ray_blocks, RayTransformerBlock, KernelRayBlock)):
        for index, block in enumerate(blocks):
            if not isinstance(block, kind):
                continue
            try:
                blocks[index] = wrapper(block, gemm)
            except (TypeError, ValueError) as error:  # e.g. fixed-point shift inputs: the block stays in PyTorch
                warn_once(f"{type(block).__name__} {index} stays on the PyTorch reference: {error}")
                continue
            summary["view_blocks" if wrapper is KernelViewBlock else "ray_blocks"] += 1
    summary["shift_linears"] = _swap_shift_linears(transformer, gemm)
    if hasattr(model, "front_end"):
        try:
            model.front_end = KernelFrontEnd(transformer)
            summary["front_end"] = 1
        except (TypeError, ValueError) as error:
            warn_once(f"the view-feature front end stays on the PyTorch reference: {error}")
    return summary


def kernel_summary(model: nn.Module) -> str:
    kinds = {}
    for module in model.modules():
        if isinstance(module, (KernelFrontEnd, KernelViewBlock, KernelRayBlock, KernelShiftLinear)):
            kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    return ", ".join(f"{count} {name}" for name, count in sorted(kinds.items())) or "no kernels"

