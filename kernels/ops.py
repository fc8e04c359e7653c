"""The TVM kernels as torch custom ops (`torch.ops.shiftadd_gnt.*`), so models that call them stay traceable.

Each op takes plain tensors and scalars (no Python containers), has a fake (meta) implementation that gives the
output's shape and dtype without running anything, and runs the kernel (or its PyTorch reference when no
kernel can be built) in the real implementation. That lets `torch.compile` / `torch.export` treat a kernel as
one opaque node instead of breaking the graph at it, and `torch.library.opcheck` verify the registrations.

Inference only: the ops have no autograd formula. The convenience wrappers below therefore send a call that
needs gradients to the differentiable PyTorch reference instead of the op, so training through a
kernel-backed model is slow but correct, never silently gradient-free.

  op                                  inputs -> output
  mat_shift                           x [N.., in], codes uint8 [out, in], channel_exponent int32 [out],
                                      bias [out]? -> [N.., out]
  ffn_sublayer                        x [N.., C], stacked expert weights (see FFNWeights) -> [N.., C]
  view_attention                      qp [N.., C], features [N.., V, C], ray_diff [N.., V, 4], mask [N.., V],
                                      weights in the kernel layout (PreparedViewWeights) -> [N.., C]
  view_features                       rgb [V, 3, N], feat [V, F, N], mask [N, V], per-view MLP weights
                                      -> features [N, V, C], q0 [N, C]
  hash_pack                           x [R, H, S, d], weight [H, d, n], bias [H, n] -> int32 [R, H, S, W]
  hashed_quadratic / hashed_linear    q_words, k_words int32 [R, H, S, W], v [R, H, S, d] -> [R, H, Sq, d]
  int_shift                           x [N.., in], IntShiftWeights tensors (packed int8/int16, compensation,
                                      out_scale, bias, absmax) -> fp32 [N.., out]
  int_ffn                             normed, x [N.., C], both layers' IntShiftWeights tensors
                                      -> x + fc2(relu(fc1(normed))) fp32 [N.., C]
  int_ffn_sublayer                    x [N.., C], ln_w, ln_b [C], eps, both layers' IntShiftWeights tensors
                                      -> x + fc2(relu(fc1(LN(x)))) fp32 [N.., C]
  ray_attention                       x [R, S, C], RayAttentionWeights.kernel_arguments(), eps, heads, core
                                      -> x + out_fc(core(LN(x))) fp32 [R, S, C]
  view_attention_sublayer             x [N.., C], features, ray_diff, mask, the view attention's and the sublayer's
                                      weights (SublayerWeights), eps -> x + out_fc(attention(q_fc(LN(x)))) [N.., C]
  int_view_attention                  qp [N, C], features [N, V, C], ray_diff [N, V, 4], mask [N, V], the attention's
                                      integer layers (IntViewWeights tensors) -> [N, C] fp32 (CPU, VNNI)
  int_view_sublayer                   x [N, C], features, ray_diff, mask, the attention's integer layers, the block's
                                      LN and integer q_fc/out_fc (IntViewSublayerWeights tensors), sizes, eps,
                                      norm_in_kernel -> x + out_fc(attention(q_fc(LN(x)))) fp32 [N, C] (CPU, VNNI)
  int_ray_attention                   x [R, S, C], the block's LN, the integer q|k|v and out layers, the hashed
                                      core's scale/hash_w/hash_b/softmax table/flip (IntRayWeights.tensors()), eps,
                                      norm_in_kernel
                                      -> x + out_fc(hashed core(q, k, v)) fp32 [R, S, C] (CPU, VNNI)
  position_fusion                     q [R, S, C], points [R, S, 3], dir_code [R, D], PositionFusionWeights tensors
                                      -> the fused query [R, S, C] fp32
  int_position_fusion                 q [R, S, C], points [R, S, 3], dir_code [R, D], IntPositionFusionWeights
                                      tensors (the query, waves and fc2 layers' five each, coords_t, dir_w, b1),
                                      num_freqs -> the fused query [R, S, C] fp32 (CPU, VNNI)
  view_blend                          hq [N.., H], features [N.., V, C], colors [N.., V, 3], ray_diff [N.., V, 4],
                                      mask [N.., V], PreparedBlendWeights.kernel_arguments() -> fp32 [N.., 3]
  blend_head                          q [R, S, C], features [R, S, V, C], colors [R, S, V, 3], ray_diff [R, S, V, 4],
                                      mask [R, S, V], BlendHeadWeights.op_tensors() (the integer feature block's
                                      five tensors, or Nones), eps -> rgb [R, 3] (CPU)
  source_views                        points [R, S, 3], target_origin [3], SourceViewTensors (kernel layout)
                                      -> rgb [V, 3, R, S], feat [V, F, R, S], ray_diff [R, S, V, 4], mask [R, S, V, 1]
  source_front_end                    the same inputs + the front end's ViewFeatureWeights tensors (and its integer
                                      second layer's, or Nones) -> features
                                      [R, S, V, C], q0 [R, S, C], colors [R, S, V, 3], ray_diff, mask
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec
from kernels import blend_head as _blend_head
from kernels import ffn as _ffn
from kernels import hashed_attention as _hashed
from kernels import int_shift as _int_shift
from kernels import int_ray_attention as _int_ray
from kernels import int_view_attention as _int_view
from kernels import mat_shift as _mat_shift
from kernels import int_position_fusion as _int_position
from kernels import position_fusion as _position
from kernels import ray_attention as _ray
from kernels import source_views as _sources
from kernels import view_attention as _view
from kernels import view_blend as _blend
from kernels import view_features as _features
from kernels.dispatch import needs_grad, note_kernel

__all__ = ["int_shift", "int_ffn", "int_ffn_sublayer", "mat_shift", "ffn_sublayer", "view_attention", "view_attention_sublayer", "view_blend", "blend_head", "ray_attention", "position_fusion", "int_position_fusion", "int_view_attention", "int_view_sublayer", "int_ray_attention", "view_features", "source_views", "source_front_end", "hash_pack", "quadratic_attention",
           "linear_attention", "OPS"]

NAMESPACE = "shiftadd_gnt"


def _needs_grad(name: str, *tensors: Optional[Tensor]) -> bool:
    """kernels.dispatch.needs_grad, noting that kernel `name` then runs on the reference."""
    if needs_grad(*tensors):
        note_kernel(name, "reference")
        return True
    return False


# ----------------------------------------------------------------------------------------------------- MatShift

@torch.library.custom_op(f"{NAMESPACE}::mat_shift", mutates_args=())
def _mat_shift_op(x: Tensor, codes: Tensor, channel_exponent: Tensor, bias: Optional[Tensor], exponent_min: int,
                  exponent_max: int, activation: str) -> Tensor:
    packed = {"codes": codes, "channel_exponent": channel_exponent, "bias": bias, "exponent_min": exponent_min,
              "exponent_max": exponent_max,  # the reference fallback's decoder checks the code width too
              "code_bits": ShiftSpec(exponent_min=exponent_min, exponent_max=exponent_max).code_bits}
    return _mat_shift.mat_shift(x, packed, activation)


@_mat_shift_op.register_fake
def _(x, codes, channel_exponent, bias, exponent_min, exponent_max, activation):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def mat_shift(x: Tensor, packed: dict, activation: str = "none") -> Tensor:
    """`kernels.mat_shift.mat_shift` through the custom op; `packed` = ShiftLinear.export_codes() on x's device."""
    if _needs_grad("mat_shift", x):
        return _mat_shift.reference_mat_shift(x, packed, activation)
    return torch.ops.shiftadd_gnt.mat_shift(x, packed["codes"], packed["channel_exponent"], packed["bias"],
                                            int(packed["exponent_min"]), int(packed["exponent_max"]), activation)


# ------------------------------------------------------------------------------------------------ FFN sublayer

@torch.library.custom_op(f"{NAMESPACE}::ffn_sublayer", mutates_args=())
def _ffn_sublayer_op(x: Tensor, fc1: Tensor, b1: Tensor, fc2: Tensor, b2: Tensor, router_w: Tensor, router_b: Tensor,
                     ln_w: Tensor, ln_b: Tensor, eps: float) -> Tensor:
    weights = _ffn.FFNWeights(fc1=fc1, b1=b1, fc2=fc2, b2=b2, router_w=router_w, router_b=router_b, ln_w=ln_w,
                              ln_b=ln_b, eps=eps)
    return _ffn.ffn_sublayer(x, weights)


@_ffn_sublayer_op.register_fake
def _(x, fc1, b1, fc2, b2, router_w, router_b, ln_w, ln_b, eps):
    return torch.empty_like(x)


def ffn_sublayer(x: Tensor, w: "_ffn.FFNWeights") -> Tensor:
    """x + FFN_e(LN(x)) through the custom op (the reference when gradients are needed)."""
    if _needs_grad("ffn_sublayer", x):
        return _ffn.reference_ffn_sublayer(x.reshape(-1, x.shape[-1]), w).reshape(x.shape)
    return torch.ops.shiftadd_gnt.ffn_sublayer(x, w.fc1, w.b1, w.fc2, w.b2, w.router_w, w.router_b, w.ln_w, w.ln_b,
                                               float(w.eps))


# ---------------------------------------------------------------------------------------------- view attention

@torch.library.custom_op(f"{NAMESPACE}::view_attention", mutates_args=())
def _view_attention_op(qp: Tensor, features: Tensor, ray_diff: Tensor, mask: Tensor, kv_t: Tensor, pos1_t: Tensor,
                       pos1_b: Tensor, pos2_t: Tensor, pos2_b: Tensor, attn1_t: Tensor, attn1_b: Tensor,
                       attn2_t: Tensor, attn2_b: Tensor) -> Tensor:
    weights = _view.PreparedViewWeights.from_kernel_arguments(kv_t, pos1_t, pos1_b, pos2_t, pos2_b, attn1_t,
                                                              attn1_b, attn2_t, attn2_b)
    return _view.view_attention(qp, features, ray_diff, mask, weights)


@_view_attention_op.register_fake
def _(qp, features, ray_diff, mask, kv_t, pos1_t, pos1_b, pos2_t, pos2_b, attn1_t, attn1_b, attn2_t, attn2_b):
    return features.new_empty(*features.shape[:-2], kv_t.shape[0])


def view_attention(qp: Tensor, features: Tensor, ray_diff: Tensor, mask: Tensor,
                   weights: "dict | _view.PreparedViewWeights") -> Tensor:
    """The fused view attention through the custom op (the reference when gradients are needed)."""
    if not isinstance(weights, _view.PreparedViewWeights):
        weights = _view.PreparedViewWeights.from_dict(weights, device=features.device)
    if _needs_grad("view_attention", qp, features, ray_diff, mask):
        return _view.reference_view_attention(qp, features, ray_diff, mask, weights.source)
    return torch.ops.shiftadd_gnt.view_attention(qp, features, ray_diff, mask, *weights.kernel_arguments())


@torch.library.custom_op(f"{NAMESPACE}::view_attention_sublayer", mutates_args=())
def _view_sublayer_op(x: Tensor, features: Tensor, ray_diff: Tensor, mask: Tensor, kv_t: Tensor, pos1_t: Tensor,
                      pos1_b: Tensor, pos2_t: Tensor, pos2_b: Tensor, attn1_t: Tensor, attn1_b: Tensor, attn2_t: Tensor,
                      attn2_b: Tensor, ln_w: Tensor, ln_b: Tensor, q_t: Tensor, out_t: Tensor, out_b: Tensor,
                      eps: float) -> Tensor:
    weights = _view.PreparedViewWeights.from_kernel_arguments(kv_t, pos1_t, pos1_b, pos2_t, pos2_b, attn1_t,
                                                              attn1_b, attn2_t, attn2_b)
    return _view.view_attention_sublayer(x, features, ray_diff, mask, weights,
                                         _view.SublayerWeights(ln_w, ln_b, q_t, out_t, out_b, eps))


@_view_sublayer_op.register_fake
def _(x, features, ray_diff, mask, *weights_and_eps):
    return x.new_empty(x.shape, dtype=torch.float32)


def view_attention_sublayer(x: Tensor, features: Tensor, ray_diff: Tensor, mask: Tensor,
                            weights: "_view.PreparedViewWeights", sub: "_view.SublayerWeights") -> Tensor:
    """The fused pre-norm view-attention sublayer through the custom op (the reference when gradients are needed)."""
    if _needs_grad("view_attention_sublayer", x, features, ray_diff, mask):
        return _view.reference_view_attention_sublayer(x, features, ray_diff, mask, weights, sub)
    return torch.ops.shiftadd_gnt.view_attention_sublayer(x, features, ray_diff, mask, *weights.kernel_arguments(),
                                                          *sub.kernel_arguments(), sub.eps)


# ----------------------------------------------------------------------------------------------- ray attention

@torch.library.custom_op(f"{NAMESPACE}::ray_attention", mutates_args=())
def _ray_attention_op(x: Tensor, ln_w: Tensor, ln_b: Tensor, qkv_t: Tensor, out_t: Tensor, out_b: Tensor, scale: Tensor,
                      hash_w: Optional[Tensor], hash_b: Optional[Tensor], eps: float, heads: int, core: str) -> Tensor:
    weights = _ray.RayAttentionWeights(ln_w, ln_b, eps, qkv_t, out_t, out_b, heads, core, scale, hash_w, hash_b)
    return _ray.ray_attention(x, weights)


@_ray_attention_op.register_fake
def _(x, ln_w, ln_b, qkv_t, out_t, out_b, scale, hash_w, hash_b, eps, heads, core):
    return x.new_empty(x.shape, dtype=torch.float32)


def ray_attention(x: Tensor, w: "_ray.RayAttentionWeights") -> Tensor:
    """The fused attention half of a ray block through the custom op (the reference when gradients are needed)."""
    if _needs_grad("ray_attention", x):
        return _ray.reference_ray_attention(x, w)
    return torch.ops.shiftadd_gnt.ray_attention(x, w.ln_w, w.ln_b, w.qkv_t, w.out_t, w.out_b, w.scale, w.hash_w,
                                                w.hash_b, w.eps, w.heads, w.core)


# ---------------------------------------------------------------------------------------- integer view attention

@torch.library.custom_op(f"{NAMESPACE}::int_view_attention", mutates_args=())
def _int_view_attention_op(qp: Tensor, features: Tensor, ray_diff: Tensor, mask: Tensor, kv_w: Tensor, kv_c: Tensor,
                           kv_s: Tensor, kv_b: Tensor, p1_w: Tensor, p1_c: Tensor, p1_s: Tensor, p1_b: Tensor,
                           p2_w: Tensor, p2_c: Tensor, p2_s: Tensor, p2_b: Tensor, a1_w: Tensor, a1_c: Tensor,
                           a1_s: Tensor, a1_b: Tensor, a2_w: Tensor, a2_c: Tensor, a2_s: Tensor, a2_b: Tensor,
                           act_absmax: Tensor, channels: int, hidden: int, per_token: bool) -> Tensor:
    weights = _int_view.IntViewWeights.from_tensors(
        (kv_w, kv_c, kv_s, kv_b), (p1_w, p1_c, p1_s, p1_b), (p2_w, p2_c, p2_s, p2_b), (a1_w, a1_c, a1_s, a1_b),
        (a2_w, a2_c, a2_s, a2_b), act_absmax, channels, hidden, per_token)
    return _int_view.int_view_attention(qp, features, ray_diff, mask, weights)


@_int_view_attention_op.register_fake
def _(qp, features, ray_diff, mask, *weights_and_sizes):
    return qp.new_empty(qp.shape, dtype=torch.float32)


def int_view_attention(qp: Tensor, features: Tensor, ray_diff: Tensor, mask: Tensor,
                       w: "_int_view.IntViewWeights") -> Tensor:
    """The view attention with integer shift layers in one VNNI kernel through the custom op; inference only (the
    integer modules train through their own differentiable forwards)."""
    return torch.ops.shiftadd_gnt.int_view_attention(qp.detach(), features.detach(), ray_diff.detach(),
                                                     mask.detach(), *w.tensors(), w.channels, w.hidden, w.per_token)


@torch.library.custom_op(f"{NAMESPACE}::int_view_sublayer", mutates_args=())
def _int_view_sublayer_op(x: Tensor, features: Tensor, ray_diff: Tensor, mask: Tensor, kv_w: Tensor, kv_c: Tensor,
                          kv_s: Tensor, kv_b: Tensor, p1_w: Tensor, p1_c: Tensor, p1_s: Tensor, p1_b: Tensor,
                          p2_w: Tensor, p2_c: Tensor, p2_s: Tensor, p2_b: Tensor, a1_w: Tensor, a1_c: Tensor,
                          a1_s: Tensor, a1_b: Tensor, a2_w: Tensor, a2_c: Tensor, a2_s: Tensor, a2_b: Tensor,
                          act_absmax: Tensor, ln_w: Tensor, ln_b: Tensor, q_w: Tensor, q_c: Tensor, q_s: Tensor,
                          q_b: Tensor, o_w: Tensor, o_c: Tensor, o_s: Tensor, o_b: Tensor, sub_absmax: Tensor,
                          channels: int, hidden: int, eps: float, norm_in_kernel: bool, per_token: bool) -> Tensor:
    weights = _int_view.IntViewWeights.from_tensors(
        (kv_w, kv_c, kv_s, kv_b), (p1_w, p1_c, p1_s, p1_b), (p2_w, p2_c, p2_s, p2_b), (a1_w, a1_c, a1_s, a1_b),
        (a2_w, a2_c, a2_s, a2_b), act_absmax, channels, hidden, per_token)
    sub = _int_view.IntViewSublayerWeights.from_tensors(ln_w, ln_b, (q_w, q_c, q_s, q_b), (o_w, o_c, o_s, o_b),
                                                        sub_absmax, eps, per_token)
    return _int_view.int_view_sublayer(x, features, ray_diff, mask, weights, sub, norm_in_kernel)


@_int_view_sublayer_op.register_fake
def _(x, features, ray_diff, mask, *weights_and_flags):
    return x.new_empty(x.shape, dtype=torch.float32)


def int_view_sublayer(x: Tensor, features: Tensor, ray_diff: Tensor, mask: Tensor, w: "_int_view.IntViewWeights",
                      sub: "_int_view.IntViewSublayerWeights", norm_in_kernel: bool = True) -> Tensor:
    """The pre-norm view-attention sublayer with integer shift layers in one VNNI kernel through the custom op;
    inference only (the integer modules train through their own differentiable forwards)."""
    _int_view.check_one_mode(w, sub)  # the op passes one mode for both
    return torch.ops.shiftadd_gnt.int_view_sublayer(x.detach(), features.detach(), ray_diff.detach(), mask.detach(),
                                                    *w.tensors(), *sub.tensors(), w.channels, w.hidden, sub.eps,
                                                    norm_in_kernel, w.per_token)


# ----------------------------------------------------------------------------------------- integer ray attention

@torch.library.custom_op(f"{NAMESPACE}::int_ray_attention", mutates_args=())
def _int_ray_attention_op(x: Tensor, ln_w: Tensor, ln_b: Tensor, qkv_w: Tensor, qkv_c: Tensor, qkv_s: Tensor,
                          qkv_b: Tensor, out_w: Tensor, out_c: Tensor, out_s: Tensor, out_b: Tensor, scale: Tensor,
                          hash_w: Tensor, hash_b: Tensor, softmax_table: Tensor, flip: Tensor, act_absmax: Tensor,
                          eps: float, norm_in_kernel: bool, per_token: bool) -> Tensor:
    weights = _int_ray.IntRayWeights.from_tensors(ln_w, ln_b, qkv_w, qkv_c, qkv_s, qkv_b, out_w, out_c, out_s, out_b,
                                                  scale, hash_w, hash_b, softmax_table, flip, act_absmax, eps,
                                                  per_token)
    return _int_ray.int_ray_attention(x, weights, norm_in_kernel)


@_int_ray_attention_op.register_fake
def _(x, *weights_and_flags):
    return x.new_empty(x.shape, dtype=torch.float32)


def int_ray_attention(x: Tensor, w: "_int_ray.IntRayWeights", norm_in_kernel: bool = True) -> Tensor:
    """The attention half of a ray block with integer shift layers and the hashed core in one VNNI kernel through
    the custom op; inference only (the integer modules train through their own differentiable forwards)."""
    return torch.ops.shiftadd_gnt.int_ray_attention(x.detach(), *w.tensors(), w.eps, norm_in_kernel, w.per_token)


# --------------------------------------------------------------------------------------------- position fusion

@torch.library.custom_op(f"{NAMESPACE}::position_fusion", mutates_args=())
def _position_fusion_op(q: Tensor, points: Tensor, dir_code: Tensor, q_t: Tensor, code_t: Tensor, dir_w: Tensor,
                        b1: Tensor, w2_t: Tensor, b2: Tensor, num_freqs: int) -> Tensor:
    weights = _position.PositionFusionWeights(q_t, code_t, dir_w, b1, w2_t, b2, num_freqs)
    return _position.position_fusion(q, points, dir_code, weights)


@_position_fusion_op.register_fake
def _(q, points, dir_code, q_t, code_t, dir_w, b1, w2_t, b2, num_freqs):
    return q.new_empty(q.shape, dtype=torch.float32)


def position_fusion(q: Tensor, points: Tensor, dir_code: Tensor, w: "_position.PositionFusionWeights") -> Tensor:
    """The points' encoding and the fusion MLP in one kernel through the custom op (the reference when gradients
    are needed); see kernels/position_fusion.py."""
    if _needs_grad("position_fusion", q, points, dir_code):
        return _position.reference_position_fusion(q, points, dir_code, w)
    return torch.ops.shiftadd_gnt.position_fusion(q.detach(), points.detach(), dir_code.detach(), w.q_t, w.code_t,
                                                  w.dir_w, w.b1, w.w2_t, w.b2, w.num_freqs)


# -------------------------------------------------------------------------------------------------- view blend

@torch.library.custom_op(f"{NAMESPACE}::view_blend", mutates_args=())
def _view_blend_op(hq: Tensor, features: Tensor, colors: Tensor, ray_diff: Tensor, mask: Tensor, features_t: Tensor,
                   ray_t: Tensor, fc2_w: Tensor, fc2_b: Tensor) -> Tensor:
    weights = _blend.PreparedBlendWeights(features_t, ray_t, fc2_w, fc2_b, per_sample_w=features_t.new_empty(0),
                                          fc1_b=features_t.new_empty(0))  # hq is made by the caller
    return _blend.view_blend(hq, features, colors, ray_diff, mask, weights)


@_view_blend_op.register_fake
def _(hq, features, colors, ray_diff, mask, features_t, ray_t, fc2_w, fc2_b):
    return features.new_empty(*features.shape[:-2], 3, dtype=torch.float32)


def view_blend(hq: Tensor, features: Tensor, colors: Tensor, ray_diff: Tensor, mask: Tensor,
               weights: "_blend.PreparedBlendWeights") -> Tensor:
    """The blend head's per-view blend through the custom op (the reference when gradients are needed)."""
    if _needs_grad("view_blend", hq, features, colors, ray_diff, mask):
        return _blend.reference_view_blend(hq, features, colors, ray_diff, mask, *weights.kernel_arguments())
    return torch.ops.shiftadd_gnt.view_blend(hq, features, colors, ray_diff, mask, *weights.kernel_arguments())


@torch.library.custom_op(f"{NAMESPACE}::int_position_fusion", mutates_args=())
def _int_position_fusion_op(q: Tensor, points: Tensor, dir_code: Tensor, weights: list[Tensor],
                            num_freqs: int) -> Tensor:
    w = _int_position.IntPositionFusionWeights.from_tensors(weights, num_freqs)
    return _int_position.int_position_fusion(q, points, dir_code, w)


@_int_position_fusion_op.register_fake
def _(q, points, dir_code, weights, num_freqs):
    return q.new_empty(q.shape, dtype=torch.float32)


def int_position_fusion(q: Tensor, points: Tensor, dir_code: Tensor,
                        w: "_int_position.IntPositionFusionWeights") -> Tensor:
    """The points' encoding and the integer fusion MLP in one VNNI kernel through the custom op (the reference when
    gradients are needed); see kernels/int_position_fusion.py."""
    if _needs_grad("int_position_fusion", q, points, dir_code):
        return _int_position.reference_int_position_fusion(q, points, dir_code, w)
    return torch.ops.shiftadd_gnt.int_position_fusion(q.detach(), points.detach(), dir_code.detach(),
                                                      list(w.tensors()), w.num_freqs)


# -------------------------------------------------------------------------------------------------- blend head

@torch.library.custom_op(f"{NAMESPACE}::blend_head", mutates_args=())
def _blend_head_op(q: Tensor, features: Tensor, colors: Tensor, ray_diff: Tensor, mask: Tensor, ln_w: Tensor,
                   ln_b: Tensor, per_sample_t: Tensor, fc1_b: Tensor, features_t: Tensor, ray_t: Tensor,
                   fc2_w: Tensor, fc2_b: Tensor, sample_w: Tensor, sample_b: Tensor, int_packed: Optional[Tensor],
                   int_compensation: Optional[Tensor], int_out_scale: Optional[Tensor], int_bias: Optional[Tensor],
                   int_absmax: Optional[Tensor], eps: float) -> Tensor:
    blend = _blend.PreparedBlendWeights(features_t, ray_t, fc2_w, fc2_b, per_sample_w=per_sample_t.t(), fc1_b=fc1_b)
    features_int = None if int_packed is None else _int_shift.IntShiftWeights.eight_bit(
        (int_packed, int_compensation, int_out_scale, int_bias), ln_w.shape[0], fc1_b.shape[0], int_absmax)
    weights = _blend_head.BlendHeadWeights(ln_w, ln_b, eps, blend, per_sample_t, sample_w, sample_b, features_int)
    return _blend_head.blend_head(q, features, colors, ray_diff, mask, weights)


@_blend_head_op.register_fake
def _(q, features, colors, ray_diff, mask, ln_w, ln_b, per_sample_t, fc1_b, features_t, ray_t, fc2_w, fc2_b,
      sample_w, sample_b, int_packed, int_compensation, int_out_scale, int_bias, int_absmax, eps):
    return q.new_empty(q.shape[0], 3, dtype=torch.float32)


def blend_head(q: Tensor, features: Tensor, colors: Tensor, ray_diff: Tensor, mask: Tensor,
               w: "_blend_head.BlendHeadWeights") -> Tensor:
    """The whole blend colour head per ray in one kernel through the custom op (the reference when gradients are
    needed); see kernels/blend_head.py."""
    if _needs_grad("blend_head", q, features, colors, ray_diff, mask):
        return _blend_head.reference_blend_head(q, features, colors, ray_diff, mask, w)
    return torch.ops.shiftadd_gnt.blend_head(q.detach(), features.detach(), colors.detach(), ray_diff.detach(),
                                             mask.detach(), *w.op_tensors(), w.eps)


# ----------------------------------------------------------------------------------------------- view features

@torch.library.custom_op(f"{NAMESPACE}::view_features", mutates_args=())
def _view_features_op(rgb: Tensor, feat: Tensor, mask: Tensor, w1_rgb: Tensor, w1_feat: Tensor, b1: Tensor,
                      w2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    weights = _features.ViewFeatureWeights(w1_rgb, w1_feat, b1, w2, b2)
    return _features.view_features(rgb, feat, mask, weights)


@_view_features_op.register_fake
def _(rgb, feat, mask, w1_rgb, w1_feat, b1, w2, b2):
    tokens, views = mask.shape
    return rgb.new_empty(tokens, views, w2.shape[1]), rgb.new_empty(tokens, w2.shape[1])


def view_features(rgb: Tensor, feat: Tensor, mask: Tensor, w: "_features.ViewFeatureWeights") -> tuple[Tensor, Tensor]:
    """Per-view feature MLP + masked max-pool through the custom op (the reference when gradients are needed)."""
    if _needs_grad("view_features", rgb, feat, mask):
        return _features.reference_view_features(rgb, feat, mask, w)
    return torch.ops.shiftadd_gnt.view_features(rgb, feat, mask, *w.tensors())


# -------------------------------------------------------------------------------------------- hashed attention

@torch.library.custom_op(f"{NAMESPACE}::hash_pack", mutates_args=())
def _hash_pack_op(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return _hashed.hash_pack(x, weight, bias)


@_hash_pack_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], _hashed.num_words(weight.shape[-1]), dtype=torch.int32)


@torch.library.custom_op(f"{NAMESPACE}::hashed_quadratic", mutates_args=())
def _quadratic_op(q_words: Tensor, k_words: Tensor, v: Tensor, scale: Tensor, n_bits: int) -> Tensor:
    return _hashed.quadratic_attention(q_words, k_words, v, scale, n_bits)


def _attention_output(q_words: Tensor, v: Tensor) -> Tensor:
    """[R, H, Sq, d]: one value vector per query."""
    return v.new_empty(*q_words.shape[:-1], v.shape[-1])


@_quadratic_op.register_fake
def _(q_words, k_words, v, scale, n_bits):
    return _attention_output(q_words, v)


@torch.library.custom_op(f"{NAMESPACE}::hashed_linear", mutates_args=())
def _linear_op(q_words: Tensor, k_words: Tensor, v: Tensor, n_bits: int, form: str) -> Tensor:
    return _hashed.linear_attention(q_words, k_words, v, n_bits, form)


@_linear_op.register_fake
def _(q_words, k_words, v, n_bits, form):
    return _attention_output(q_words, v)


def hash_pack(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Binary codes packed into int32 words (no gradient exists: the codes are a sign)."""
    return torch.ops.shiftadd_gnt.hash_pack(x.detach(), weight.detach(), bias.detach())


def quadratic_attention(q_words: Tensor, k_words: Tensor, v: Tensor, scale: "Tensor | float", n_bits: int) -> Tensor:
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), device=v.device)
    if _needs_grad("hashed_quadratic", v, scale):
        return _hashed.reference_quadratic(q_words, k_words, v, scale, n_bits)
    return torch.ops.shiftadd_gnt.hashed_quadratic(q_words, k_words, v, scale, n_bits)


def linear_attention(q_words: Tensor, k_words: Tensor, v: Tensor, n_bits: int, form: str = "hashed") -> Tensor:
    if _needs_grad("hashed_linear", v):
        return _hashed.reference_linear(q_words, k_words, v, n_bits, form)
    return torch.ops.shiftadd_gnt.hashed_linear(q_words, k_words, v, n_bits, form)


# ------------------------------------------------------------------------------------------ integer shift layer

@torch.library.custom_op(f"{NAMESPACE}::int_shift", mutates_args=())
def _int_shift_op(x: Tensor, packed: Tensor, compensation: Tensor, out_scale: Tensor, bias: Tensor, absmax: Tensor,
                  bits: int, per_token: bool, in_features: int, out_features: int, activation: str) -> Tensor:
    weights = _int_shift.IntShiftWeights(packed, compensation, out_scale, bias, absmax, bits, per_token, in_features,
                                         out_features)
    return _int_shift.int_shift(x, weights, activation)


@_int_shift_op.register_fake
def _(x, packed, compensation, out_scale, bias, absmax, bits, per_token, in_features, out_features, activation):
    return x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32)


def int_shift(x: Tensor, w: "_int_shift.IntShiftWeights", activation: str = "none") -> Tensor:
    """Integer shift layer (kernels/int_shift.py) through the custom op; inference only (an IntShiftLinear trains
    through its own differentiable forward, which computes the same values)."""
    return torch.ops.shiftadd_gnt.int_shift(x.detach(), *w.tensors(), w.bits, w.per_token, w.in_features,
                                            w.out_features, activation)


@torch.library.custom_op(f"{NAMESPACE}::int_ffn", mutates_args=())
def _int_ffn_op(normed: Tensor, x: Tensor, packed1: Tensor, compensation1: Tensor, out_scale1: Tensor, bias1: Tensor,
                absmax1: Tensor, packed2: Tensor, compensation2: Tensor, out_scale2: Tensor, bias2: Tensor,
                absmax2: Tensor, bits: int, per_token: bool, dim: int, hidden: int) -> Tensor:
    fc1 = _int_shift.IntShiftWeights(packed1, compensation1, out_scale1, bias1, absmax1, bits, per_token, dim, hidden)
    fc2 = _int_shift.IntShiftWeights(packed2, compensation2, out_scale2, bias2, absmax2, bits, per_token, hidden, dim)
    return _int_shift.int_ffn(normed, x, fc1, fc2)


@_int_ffn_op.register_fake
def _(normed, x, packed1, compensation1, out_scale1, bias1, absmax1, packed2, compensation2, out_scale2, bias2, absmax2,
      bits, per_token, dim, hidden):
    return x.new_empty(x.shape, dtype=torch.float32)


def int_ffn(normed: Tensor, x: Tensor, fc1: "_int_shift.IntShiftWeights", fc2: "_int_shift.IntShiftWeights") -> Tensor:
    """x + fc2(relu(fc1(normed))) for integer shift layers, one kernel (kernels/int_shift.py); inference only."""
    return torch.ops.shiftadd_gnt.int_ffn(normed.detach(), x.detach(), *fc1.tensors(), *fc2.tensors(), fc1.bits,
                                          fc1.per_token, fc1.in_features, fc1.out_features)


@torch.library.custom_op(f"{NAMESPACE}::int_ffn_sublayer", mutates_args=())
def _int_ffn_sublayer_op(x: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, packed1: Tensor, compensation1: Tensor,
                         out_scale1: Tensor, bias1: Tensor, absmax1: Tensor, packed2: Tensor, compensation2: Tensor,
                         out_scale2: Tensor, bias2: Tensor, absmax2: Tensor, bits: int, per_token: bool, dim: int,
                         hidden: int) -> Tensor:
    fc1 = _int_shift.IntShiftWeights(packed1, compensation1, out_scale1, bias1, absmax1, bits, per_token, dim, hidden)
    fc2 = _int_shift.IntShiftWeights(packed2, compensation2, out_scale2, bias2, absmax2, bits, per_token, hidden, dim)
    return _int_shift.int_ffn_sublayer(x, ln_w, ln_b, eps, fc1, fc2)


@_int_ffn_sublayer_op.register_fake
def _(x, ln_w, ln_b, eps, packed1, compensation1, out_scale1, bias1, absmax1, packed2, compensation2, out_scale2, bias2,
      absmax2, bits, per_token, dim, hidden):
    return x.new_empty(x.shape, dtype=torch.float32)


def int_ffn_sublayer(x: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, fc1: "_int_shift.IntShiftWeights",
                     fc2: "_int_shift.IntShiftWeights") -> Tensor:
    """x + fc2(relu(fc1(LN(x)))) for integer shift layers, the LayerNorm in the same kernel; inference only."""
    return torch.ops.shiftadd_gnt.int_ffn_sublayer(x.detach(), ln_w.detach(), ln_b.detach(), float(eps),
                                                   *fc1.tensors(), *fc2.tensors(), fc1.bits, fc1.per_token,
                                                   fc1.in_features, fc1.out_features)


# ------------------------------------------------------------------------------------------------ source views

@torch.library.custom_op(f"{NAMESPACE}::source_views", mutates_args=())
def _source_views_op(points: Tensor, target_origin: Tensor, rot: Tensor, trans: Tensor, K: Tensor, origins: Tensor,
                     image: Tensor, features: Tensor, sizes: Tensor, c2w: Tensor,
                     feat_channels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    prepared = _sources.SourceViewTensors(rot, trans, K, origins, image, features, sizes, c2w)
    return tuple(t.contiguous() for t in _sources.source_views(points, target_origin, prepared))


@_source_views_op.register_fake
def _(points, target_origin, rot, trans, K, origins, image, features, sizes, c2w, feat_channels):
    rays, samples, _ = points.shape
    views = rot.shape[0]
    return (points.new_empty(views, 3, rays, samples), points.new_empty(views, feat_channels, rays, samples),
            points.new_empty(rays, samples, views, 4), points.new_empty(rays, samples, views, 1))


@torch.library.custom_op(f"{NAMESPACE}::source_front_end", mutates_args=())
def _source_front_end_op(points: Tensor, target_origin: Tensor, rot: Tensor, trans: Tensor, K: Tensor, origins: Tensor,
                         image: Tensor, features: Tensor, sizes: Tensor, c2w: Tensor, w1_rgb: Tensor, w1_feat: Tensor,
                         b1: Tensor, w2: Tensor, b2: Tensor, packed2: Optional[Tensor], compensation2: Optional[Tensor],
                         out_scale2: Optional[Tensor], bias2: Optional[Tensor], absmax2: Optional[Tensor]
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    prepared = _sources.SourceViewTensors(rot, trans, K, origins, image, features, sizes, c2w)
    second = None if packed2 is None else _int_shift.IntShiftWeights.eight_bit(
        (packed2, compensation2, out_scale2, bias2), w2.shape[0], w2.shape[1], absmax2)
    weights = _features.ViewFeatureWeights(w1_rgb, w1_feat, b1, w2, b2, second)
    return tuple(t.contiguous() for t in _sources.source_front_end(points, target_origin, prepared, weights))


@_source_front_end_op.register_fake
def _(points, target_origin, rot, trans, K, origins, image, features, sizes, c2w, w1_rgb, w1_feat, b1, w2, b2,
      packed2, compensation2, out_scale2, bias2, absmax2):
    rays, samples, _ = points.shape
    views, channels = rot.shape[0], w2.shape[1]
    return (points.new_empty(rays, samples, views, channels), points.new_empty(rays, samples, channels),
            points.new_empty(rays, samples, views, 3), points.new_empty(rays, samples, views, 4),
            points.new_empty(rays, samples, views, 1))


def source_front_end(points: Tensor, target_origin: Tensor, prepared: "_sources.SourceViewTensors",
                     weights: "_features.ViewFeatureWeights"):
    """Source views + GNT's front end in one kernel through the custom op (the reference when gradients are
    needed); see kernels/source_views.py."""
    if _needs_grad("source_front_end", points, target_origin):
        return _sources.reference_source_front_end(points, target_origin, prepared, weights)
    return torch.ops.shiftadd_gnt.source_front_end(points.detach(), target_origin.detach(),
                                                   *prepared.kernel_arguments(), prepared.c2w, *weights.tensors(),
                                                   *weights.second_tensors())


def source_views(points: Tensor, target_origin: Tensor, prepared: "_sources.SourceViewTensors"):
    """Projection + bilinear gathers + mask + view codes through the custom op (the reference when gradients are
    needed); see kernels/source_views.py."""
    if _needs_grad("source_views", points, target_origin):
        return _sources.reference_source_views(points, target_origin, prepared)
    return torch.ops.shiftadd_gnt.source_views(points.detach(), target_origin.detach(), *prepared.kernel_arguments(),
                                               prepared.c2w, prepared.feat_channels)


OPS = {"int_shift": _int_shift_op, "int_ffn": _int_ffn_op, "int_ffn_sublayer": _int_ffn_sublayer_op, "mat_shift": _mat_shift_op, "ffn_sublayer": _ffn_sublayer_op, "view_attention": _view_attention_op,
       "view_attention_sublayer": _view_sublayer_op,
       "view_blend": _view_blend_op, "blend_head": _blend_head_op, "ray_attention": _ray_attention_op, "position_fusion": _position_fusion_op, "int_position_fusion": _int_position_fusion_op, "int_view_attention": _int_view_attention_op, "int_ray_attention": _int_ray_attention_op, "int_view_sublayer": _int_view_sublayer_op, "view_features": _view_features_op,
       "source_views": _source_views_op, "source_front_end": _source_front_end_op,
       "hash_pack": _hash_pack_op, "hashed_quadratic": _quadratic_op, "hashed_linear": _linear_op}
