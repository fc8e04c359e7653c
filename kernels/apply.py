"""Switch a trained (ShiftAdd-)GNT to the compiled TVM kernels for inference by swapping leaves, torchao-style.

    summary = use_kernels_(model, KernelConfig(backend="tvm", gemm="auto"), filter_fn=None)

The model's forwards stay as they are; only its swappable leaves are replaced (in place) by kernel-backed modules
with the same call signature, chosen by a handler registered per module type (`register_kernel_handler`):

  SampledViewEmbedding (transformer.front_end, CPU) -> KernelFrontEnd: projection into the source views, bilinear
                      gathers of image and CNN features, mask, view codes, the per-view feature MLP and the
                      max-pool over views in one kernel (the views' kernel layout is made once per frame and
                      reused by every chunk; an 8-bit integer second layer runs on VNNI inside it); where it does
                      not apply, its two parts are swapped on their own:
  SourceViewSampler   (transformer.source_sampler, CPU) -> KernelSourceViews: the same up to the gathers
  ViewEmbedding       (transformer.view_embedding)  -> KernelViewEmbedding: grid_sample outputs -> per-view
                      feature MLP + masked max-pool in one kernel (no [R, S, V, 3 + F] concatenation)
  PreNormViewAttention (view_blocks.i.attn_sublayer) -> KernelViewAttentionSublayer (CPU): LN + q_fc + the fused
                      view attention + out_fc + residual in one kernel (fp32 linears); with 8-bit integer shift
                      layers (CPU, VNNI) KernelIntViewAttentionSublayer: the same in one VNNI kernel; otherwise, and
                      on CUDA, as below
  ViewAttention       (view_blocks.i.attn)          -> KernelViewAttention: q_fc, then one fused kernel (k/v
                      projections, pos MLP, attention MLP, masked softmax over views, weighted sum), then out_fc;
                      with 8-bit integer shift layers (CPU, VNNI) KernelIntViewAttention: the same per-(token, view)
                      work with every integer layer inside one VNNI kernel
  PreNormAttention    (ray_blocks.i.attn_sublayer)  -> KernelRayAttentionSublayer (CPU): LN + q/k/v projections +
                      dense or hashed-quadratic core (XOR/popcount) + out_fc + residual in one kernel per ray
                      (dense/shift fp32 linears); with 8-bit integer shift layers and the hashed core (CPU, VNNI)
                      KernelIntRayAttentionSublayer: the same in one VNNI kernel per ray; otherwise, and on CUDA, its
                      parts are swapped as below
  HashedQuadratic/LinearAttention (ray_blocks.i.attn.core) -> KernelHashedAttention: hash + pack, then the
                      XOR/popcount softmax kernel or the additive linear form (dense SDPA and the seed form stay)
  PreNormFeedForward  (*_blocks.i.ffn)              -> KernelFFNSublayer: LN + FFN (+ in-kernel MoE routing) +
                      residual in one kernel, for dense, shift and MoE FFNs; with integer shift layers (CPU)
                      KernelIntFFNSublayer: LN, fc1 + ReLU + fc2 + residual in one VNNI kernel
  PositionFusion      (transformer.position_fusion, CPU) -> KernelPositionFusion: the points' NeRF encoding (sin/cos
                      as polynomials) and every fusion MLP, per ray in one kernel (no [R, S, 3 + 6F] code); with
                      8-bit integer shift layers (VNNI) the integer position-fusion kernel
  RayColorBlend       (transformer.head.ray_blend, CPU) -> KernelBlendHead: the whole blend colour head (its norm,
                      per-view MLP, softmax over views, blend, sample logits and softmax over the samples) per ray
                      in one kernel; where it does not apply (CUDA):
  ViewColorBlend      (transformer.head.view_blend) -> KernelViewColorBlend: the blend colour head's per-view MLP,
                      masked softmax over views and colour blend in one kernel (no [R, S, V, 2C + 4] concatenation)
  ShiftLinear         (anywhere in the transformer) -> KernelShiftLinear: MatShift on the packed codes
  IntShiftLinear      (integer activations, CPU)    -> KernelIntShiftLinear: the VNNI integer kernel; the fused
                      fp32 leaves above refuse blocks holding them, which then run their integer layers on this
                      kernel and their other ops (norms, softmax over views) in PyTorch (not listed as skipped)

`filter_fn(module, fqn) -> bool` keeps chosen leaves on PyTorch. A leaf no kernel covers (e.g. shift layers with
fixed-point inputs) stays on the reference with one warning and is listed in `model.kernel_skipped`. With
gemm="auto", FFN sublayers always run on the fused FFN kernel (in a real frame it beats LN + two MKL GEMMs:
results/thread_policy_cpu.json, 3.5 vs 5.5 s per fern frame), and standalone shift linears run on MatShift on
CUDA but as BLAS GEMMs on the decoded +-2^k weights on CPU (results/gemm_choice_cpu.json); "tvm" or "blas" force
one side for both.

Every kernel leaf records what it ran (kernels.dispatch.KernelLeaf): `kernel_map(model)` says which module ran
on which kernel, `require_all_kernels(model)` raises if anything fell back to the reference. Every kernel is
called through its torch custom op (kernels/ops.py), so a kernel-backed model still traces with torch.compile.
Inference only (call model.eval() first): training always uses the differentiable PyTorch modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.models.gnt import PositionFusion, SampledViewEmbedding, ViewEmbedding
from gnt_shiftadd.models.heads import RayColorBlend, ViewColorBlend
from gnt_shiftadd.models.projector import SourceViews, SourceViewSampler
from gnt_shiftadd.models.transformers import DotProductAttention, FeedForward, PreNormAttention, PreNormFeedForward, \
    PreNormViewAttention, RayAttention, ViewAttention
from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear
from gnt_shiftadd.shiftadd.hashed_attention import HashedLinearAttention, HashedQuadraticAttention
from gnt_shiftadd.shiftadd.int_shift import IntegerLayerError, IntShiftLinear, export_int_shift
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, decode_shift_codes
from kernels.dispatch import KERNEL_BACKENDS, KernelLeaf, KernelNotApplicable, linear_weight, needs_grad, note_kernel, \
    resolve_backend, warn_once
from kernels.ffn import FFNWeights, ffn_weights, gemm_ffn_sublayer
from kernels.int_shift import prepare_int_shift, vnni_available
from kernels.int_position_fusion import IntPositionFusionWeights
from kernels.int_ray_attention import IntRayWeights
from kernels.int_view_attention import IntViewSublayerWeights, IntViewWeights, check_one_mode
from kernels.ops import blend_head, ffn_sublayer, hash_pack, int_ffn, int_ffn_sublayer, int_ray_attention, int_shift, int_view_attention, int_view_sublayer, linear_attention, mat_shift, quadratic_attention, \
    int_position_fusion, position_fusion, ray_attention, source_front_end, source_views, view_attention, view_attention_sublayer, view_blend, view_features
from kernels.position_fusion import PositionFusionWeights
from kernels.ray_attention import RayAttentionWeights
from kernels.source_views import fold_feature_block, prepare_source_views
from kernels.view_attention import PreparedViewWeights, SublayerWeights, view_attention_weights
from kernels.blend_head import BlendHeadWeights
from kernels.view_blend import PreparedBlendWeights
from kernels.view_features import ViewFeatureWeights

__all__ = ["GEMM_CHOICES", "KernelConfig", "use_kernels_", "use_kernels", "register_kernel_handler", "kernel_leaf_types",
           "KernelSourceViews", "KernelFrontEnd", "KernelViewEmbedding", "KernelViewAttention", "KernelIntViewAttention", "KernelIntViewAttentionSublayer", "KernelViewAttentionSublayer", "KernelPositionFusion", "KernelViewColorBlend", "KernelBlendHead", "KernelRayAttentionSublayer", "KernelIntRayAttentionSublayer", "KernelHashedAttention", "KernelFFNSublayer",
           "KernelShiftLinear", "KernelIntShiftLinear", "KernelIntFFNSublayer", "kernel_summary"]

GEMM_CHOICES = ("auto", "tvm", "blas")


@dataclass(frozen=True)
class KernelConfig:
    """backend: "tvm" (the compiled kernels), "auto" (tvm when TVM is importable, else the reference with one
    warning) or "torch" (leave the model alone); gemm: where dense-shaped products run (see the module doc);
    device_type: the device the kernels are chosen for, when not the model's own (the AOT export records a CUDA
    model's kernel requests on CPU tensors); int_norm_in_kernel: the integer FFN, ray- and view-attention kernels
    compute their block's LayerNorm themselves (faster; fp32 rounding in its own order, so a quantized activation may land
    one step from the module's) or take it from PyTorch (then an integer FFN half-block is bit-identical to its
    modules)."""

    backend: str = "tvm"
    gemm: str = "auto"
    device_type: str | None = None
    int_norm_in_kernel: bool = True  # False: integer kernels take their LayerNorm from PyTorch

    def kernel_device(self, device: torch.device) -> str:
        return self.device_type or device.type

    def __post_init__(self) -> None:
        if self.backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {self.backend!r}")
        if self.gemm not in GEMM_CHOICES:
            raise ValueError(f"gemm must be one of {GEMM_CHOICES}, got {self.gemm!r}")

    def gemm_on_tvm(self, device: torch.device) -> bool:
        """Standalone shift linears on MatShift: always with "tvm", on CUDA with "auto" (a CPU has no cheaper
        fp32 shift-multiply than MKL's FMA on the decoded weights)."""
        return self.gemm == "tvm" or (self.gemm == "auto" and self.kernel_device(device) == "cuda")

    def ffn_on_tvm(self) -> bool:
        """FFN sublayers on the fused kernel unless gemm="blas": LN + both layers + residual in one pass wins in a
        frame even where MKL's GEMMs win alone (benchmarks/thread_policy.py, results/gemm_choice_cpu.json)."""
        return self.gemm != "blas"


# ------------------------------------------------------------------------------------------------- kernel leaves

class KernelShiftLinear(KernelLeaf):
    """A ShiftLinear evaluated from its exported codes: MatShift, or a BLAS GEMM on the decoded weight.
    x [..., in] -> [..., out]. ValueError for fixed-point inputs (no kernel rounds them)."""

    def __init__(self, source: ShiftLinear, cfg: KernelConfig):
        super().__init__()
        if source.spec.fixed_point_bits:
            raise ValueError(f"{source} rounds its inputs to fixed point (fixed_point_bits="
                             f"{source.spec.fixed_point_bits}), which MatShift does not reproduce")
        self.source = source
        device = source.sign_param.device
        self.on_tvm = cfg.gemm_on_tvm(device)
        packed = source.export_codes()
        self.packed = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}
        self.weight = decode_shift_codes(packed).to(device)  # exact +-2^k (or 0), for the BLAS path
        self.bias = packed["bias"].to(device) if packed["bias"] is not None else None

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_tvm or needs_grad(x):  # the op sends gradients to the reference
            return mat_shift(x, self.packed)
        note_kernel("mat_shift", "blas")
        return F.linear(x, self.weight, self.bias)


class KernelIntShiftLinear(KernelLeaf):
    """An IntShiftLinear (integer activations) on the VNNI integer kernel, bit-identical to the module's own
    forward; CPU only (elsewhere, and for calls that need gradients, the module itself runs). x [..., in] -> [..., out]."""

    def __init__(self, source: IntShiftLinear, cfg: KernelConfig):
        super().__init__()
        if source.sign_param.device.type != "cpu":
            raise ValueError("the integer shift kernel runs on CPU (AVX-512 VNNI)")
        self.source = source
        self.weights = prepare_int_shift(export_int_shift(source))

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if needs_grad(x):
            note_kernel("int_shift", "reference")
            return self.source(x)
        return int_shift(x, self.weights)


class KernelIntFFNSublayer(KernelLeaf):
    """PreNormFeedForward whose FFN is two integer shift layers (FeedForward with IntShiftLinear fc1/fc2): the
    LayerNorm, fc1 + ReLU + fc2 and the residual in one VNNI kernel (the [tokens, hidden] activations stay in the
    core). The integer part is bit-identical to the modules given the same normed input; the in-kernel LN rounds in
    its own order (fp32, like the dense FFN kernel). With norm_in_kernel=False, or a norm other than a plain
    nn.LayerNorm, the norm runs in PyTorch before the integer kernel (then the block is bit-identical). CPU only;
    calls that need gradients run the modules. Same call: (x [..., C], norm, ff) -> x + ff(norm(x))."""

    def __init__(self, norm: nn.LayerNorm, ff: FeedForward, norm_in_kernel: bool = True):
        super().__init__()
        if not integer_feedforward(ff):
            raise TypeError("KernelIntFFNSublayer needs a FeedForward of two IntShiftLinear layers")
        if ff.fc1.sign_param.device.type != "cpu":
            raise ValueError("the integer FFN kernel runs on CPU (AVX-512 VNNI)")
        self.fc1, self.fc2 = prepare_int_shift(export_int_shift(ff.fc1)), prepare_int_shift(export_int_shift(ff.fc2))
        self.fused_norm = norm_in_kernel and type(norm) is nn.LayerNorm and norm.elementwise_affine \
            and norm.bias is not None
        if self.fused_norm:
            self.ln_w, self.ln_b = (t.detach().float().clone() for t in (norm.weight, norm.bias))
            self.eps = float(norm.eps)
        self._layer_ids = (id(norm), id(ff))
        self.covered_ids = {id(m) for m in ff.modules()}  # the kernel computes the whole FFN

    def run(self, x, norm, ff):
        _check_same_layers(self, (norm, ff))
        if needs_grad(x):
            note_kernel("int_ffn_sublayer" if self.fused_norm else "int_ffn", "reference")
            return x + ff(norm(x))
        if self.fused_norm:
            return int_ffn_sublayer(x, self.ln_w, self.ln_b, self.eps, self.fc1, self.fc2)
        return int_ffn(norm(x), x, self.fc1, self.fc2)


def integer_feedforward(ff: nn.Module) -> bool:
    """A FeedForward whose two layers take integer activations of the same width and scale mode."""
    return (type(ff) is FeedForward and isinstance(ff.fc1, IntShiftLinear) and isinstance(ff.fc2, IntShiftLinear)
            and (ff.fc1.activation_bits, ff.fc1.act_scale) == (ff.fc2.activation_bits, ff.fc2.act_scale))


class _PreparedViews:
    """The views' kernel layout (channels-last feature maps; then `transform` of it, if given), made on the first
    chunk of a frame and reused while the same SourceViews object, with unchanged tensors, comes back (the renderer
    passes one per frame). Holding the views keeps their id unique."""

    def __init__(self, transform: Callable | None = None):
        self._views: tuple | None = None  # (views, tensor versions, prepared)
        self._transform = transform

    def __call__(self, views: SourceViews):
        versions = tuple(t._version for t in (views.rgb, views.features, views.K, views.c2w))
        if self._views is None or self._views[0] is not views or self._views[1] != versions:
            prepared = prepare_source_views(views)
            self._views = (views, versions, self._transform(prepared) if self._transform else prepared)
        return self._views[2]


class KernelSourceViews(KernelLeaf):
    """SourceViewSampler on the source-views kernel (CPU). Same call: (points [R, S, 3], target_origin [3], views)
    -> (rgb [V, 3, R, S], feat [V, F, R, S], ray_diff [R, S, V, 4], mask [R, S, V, 1])."""

    def __init__(self):
        super().__init__()
        self.prepared_for = _PreparedViews()

    def run(self, points, target_origin, views):
        return source_views(points, target_origin, self.prepared_for(views))


class KernelFrontEnd(KernelLeaf):
    """SampledViewEmbedding on the fused source-views + front-end kernel (CPU): the gathered rows go from the taps
    through the per-view MLP and the max-pool over views without reaching memory. Same call: (points, target_origin,
    views, sampler, embedding, fc1, fc2) -> (features, q, colors, ray_diff, mask); fc1/fc2 must be the layers it
    was built from. Where the first layer is no wider than the feature maps, its feature block is applied to the
    maps once per set of views (kernels.source_views.fold_feature_block: half the front end's arithmetic). An
    8-bit integer second layer with a calibrated per-tensor scale (shiftadd.front_end: shift) runs on VNNI inside
    the same kernel; it needs the fold (KernelNotApplicable otherwise: the front end's parts are swapped instead)."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module, covered: tuple[nn.Module, ...]):
        super().__init__()
        self.weights = ViewFeatureWeights.from_linears(fc1, fc2)
        self._layer_ids = (id(fc1), id(fc2))
        # the sampler and the embedding run inside this kernel, and an integer second layer too (not swapped alone)
        self.covered_ids = {id(m) for m in covered} | ({id(fc2)} if self.weights.second is not None else set())
        feat_channels, hidden, _ = self.weights.shapes
        fold = hidden <= feat_channels
        if self.weights.second is not None and not (fold and hidden % 16 == 0):  # its parts run on their own kernels
            raise KernelNotApplicable(f"the integer front end needs its first layer folded into the feature maps "
                                      f"(hidden {hidden} <= {feat_channels} feature channels, a multiple of 16)")
        # per set of views: (views, weights) for the kernel, folded or as they are
        self.prepared_for = _PreparedViews((lambda prepared: fold_feature_block(prepared, self.weights)) if fold
                                           else (lambda prepared: (prepared, self.weights)))

    def run(self, points, target_origin, views, sampler, embedding, fc1, fc2):
        _check_same_layers(self, (fc1, fc2))
        return source_front_end(points, target_origin, *self.prepared_for(views))


class KernelViewEmbedding(KernelLeaf):
    """ViewEmbedding on the view-features kernel: (rgb [V, 3, R, S], feat [V, F, R, S], mask [R, S, V, 1], fc1,
    fc2) -> (features [R, S, V, C], q [R, S, C]); fc1/fc2 must be the layers it was built from."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.weights = ViewFeatureWeights.from_linears(fc1, fc2)
        self._layer_ids = (id(fc1), id(fc2))

    def run(self, rgb, feat, mask, fc1, fc2):
        _check_same_layers(self, (fc1, fc2))
        num_views, _, rays, samples = rgb.shape
        tokens_mask = mask.reshape(rays * samples, num_views)
        features, q = view_features(rgb.reshape(num_views, 3, -1), feat.reshape(num_views, feat.shape[1], -1),
                                    tokens_mask, self.weights)
        channels = q.shape[-1]
        return features.view(rays, samples, num_views, channels), q.view(rays, samples, channels)


class KernelPositionFusion(KernelLeaf):
    """PositionFusion on the position-fusion kernel (CPU): the points' encoding and the fusion MLP per ray in one
    kernel; an MLP with integer shift layers (shiftadd.position_fusion: shift, 8-bit per tensor) on the integer
    position-fusion kernel (VNNI). Same call: (q [R, S, C], points [R, S, 3], dir_code [R, D], mlp, encoding, memo)
    -> [R, S, C]; built for every one of the transformer's fusion MLPs (each call names its own), which must be the
    layers it was built from. KernelNotApplicable for layers neither kernel reproduces (fixed-point shift layers,
    integer layers without VNNI)."""

    def __init__(self, mlps: nn.ModuleList, encoding: nn.Module, channels: int):
        super().__init__()
        if getattr(encoding, "input_dims", None) != 3:
            raise KernelNotApplicable("the position fusion kernel encodes 3-d points")
        try:
            self.weights = {id(mlp): self._weights(mlp, channels, encoding.num_freqs) for mlp in mlps}
        except (TypeError, ValueError) as error:
            raise KernelNotApplicable(f"position fusion: {error}") from error
        self.covered_ids = {id(m) for mlp in mlps for m in mlp.modules()}

    @staticmethod
    def _weights(mlp: nn.Sequential, channels: int, num_freqs: int):
        try:
            return PositionFusionWeights.from_mlp(mlp, channels, num_freqs)
        except IntegerLayerError:
            if not vnni_available():
                raise KernelNotApplicable("the integer position fusion runs on CPUs with AVX-512 VNNI") from None
            return IntPositionFusionWeights.from_mlp(mlp, channels, num_freqs)

    def run(self, q, points, dir_code, mlp, encoding, memo):
        weights = self.weights.get(id(mlp))
        if weights is None:
            raise ValueError("KernelPositionFusion was called with a fusion MLP it was not built from; swap the "
                             "kernels in again after replacing the model's layers")
        fused = int_position_fusion if isinstance(weights, IntPositionFusionWeights) else position_fusion
        return fused(q, points, dir_code, weights).to(q.dtype)


class KernelViewAttention(KernelLeaf):
    """ViewAttention with everything between q_fc and out_fc in the fused kernel. Same call as ViewAttention:
    q [R, S, C] (already normed), features [R, S, V, C], ray_diff [R, S, V, 4], mask [R, S, V, 1] -> [R, S, C]."""

    def __init__(self, source: ViewAttention):
        super().__init__()
        self.source = source
        self.weights = PreparedViewWeights.from_dict(view_attention_weights(source))
        self.covered_ids = {id(m) for layer in (source.k_fc, source.v_fc, source.pos_fc1, source.pos_fc2,
                                                source.attn_fc1, source.attn_fc2) for m in layer.modules()}

    def run(self, q, features, ray_diff, mask):
        rays, samples, views, dim = features.shape
        query = self.source.q_fc(q).reshape(-1, dim)
        mixed = self.attend(query, features.reshape(-1, views, dim), ray_diff.reshape(-1, views, 4),
                            mask.reshape(-1, views))
        return self.source.out_fc(mixed).reshape(rays, samples, dim)

    def attend(self, query, features, ray_diff, mask):
        """Everything between q_fc and out_fc on token rows: query [N, C], features [N, V, C] -> [N, C]."""
        return view_attention(query, features, ray_diff, mask, self.weights)


class KernelIntViewAttention(KernelViewAttention):
    """ViewAttention whose k/v, position and attention MLPs are all 8-bit integer shift layers (g, j; CPU): the
    per-(token, view) work in one VNNI kernel (kernels/int_view_attention.py), every integer layer bit-exact;
    q_fc and out_fc stay module calls (integer layers run on their own kernel). Same call and result as
    ViewAttention. KernelNotApplicable for other layer formats."""

    def __init__(self, source: ViewAttention):
        KernelLeaf.__init__(self)
        try:
            self.weights = IntViewWeights.from_module(source)
        except ValueError as error:
            raise KernelNotApplicable(str(error)) from error
        self.source = source
        self.covered_ids = {id(m) for layer in (source.k_fc, source.v_fc, source.pos_fc1, source.pos_fc2,
                                                source.attn_fc1, source.attn_fc2) for m in layer.modules()}

    def attend(self, query, features, ray_diff, mask):
        if needs_grad(query, features, ray_diff):  # the integer modules train through their own forwards
            note_kernel("int_view_attention", "reference")
            return self.source.attend(query, features, ray_diff, mask[..., None])
        return int_view_attention(query, features, ray_diff, mask, self.weights)


class KernelViewAttentionSublayer(KernelLeaf):
    """PreNormViewAttention on the fused sublayer kernel (CPU). Same call: (q [R, S, C], features [R, S, V, C],
    ray_diff [R, S, V, 4], mask [R, S, V, 1], norm, attn) -> q + attn(norm(q), ...); norm/attn must be the modules
    it was built from. KernelNotApplicable (the attention is swapped on its own instead) for layers the fp32
    kernels do not reproduce (integer or fixed-point shift layers)."""

    def __init__(self, norm: nn.Module, attn: nn.Module):
        super().__init__()
        if type(attn) is not ViewAttention:
            raise KernelNotApplicable(f"no fused view-attention sublayer for {type(attn).__name__}")
        try:
            self.weights = PreparedViewWeights.from_dict(view_attention_weights(attn))
            self.sublayer = SublayerWeights.from_modules(norm, attn)
        except (TypeError, ValueError) as error:
            raise KernelNotApplicable(f"fused view-attention sublayer: {error}") from error
        self._layer_ids = (id(norm), id(attn))
        self.covered_ids = {id(m) for m in attn.modules()}

    def run(self, q, features, ray_diff, mask, norm, attn):
        _check_same_layers(self, (norm, attn))
        rays, samples, views, dim = features.shape
        out = view_attention_sublayer(q.reshape(-1, dim), features.reshape(-1, views, dim),
                                      ray_diff.reshape(-1, views, 4), mask.reshape(-1, views), self.weights,
                                      self.sublayer)
        return out.reshape(rays, samples, dim).to(q.dtype)


class KernelIntViewAttentionSublayer(KernelLeaf):
    """PreNormViewAttention whose view attention's eight linears are all 8-bit integer shift layers, all per token
    or all per tensor (g, j, k; CPU with VNNI): the LN, q_fc, the per-(token, view) attention, out_fc and the
    residual in one VNNI kernel (kernels/int_view_attention.py). norm_in_kernel=False takes the LN from PyTorch. Calls that need gradients run
    the modules. Same call: (q [R, S, C], features, ray_diff, mask, norm, attn) -> q + attn(norm(q), ...).
    KernelNotApplicable for other layers (then the attention alone is swapped)."""

    def __init__(self, norm: nn.Module, attn: nn.Module, norm_in_kernel: bool = True):
        super().__init__()
        if type(attn) is not ViewAttention:
            raise KernelNotApplicable(f"no integer view-attention sublayer for {type(attn).__name__}")
        try:
            self.weights = IntViewWeights.from_module(attn)
            self.sublayer = IntViewSublayerWeights.from_modules(norm, attn)
            check_one_mode(self.weights, self.sublayer)
        except ValueError as error:
            raise KernelNotApplicable(str(error)) from error
        self.norm_in_kernel = norm_in_kernel
        self._layer_ids = (id(norm), id(attn))
        self.covered_ids = {id(m) for m in attn.modules()}

    def run(self, q, features, ray_diff, mask, norm, attn):
        _check_same_layers(self, (norm, attn))
        if needs_grad(q, features, ray_diff):
            note_kernel("int_view_sublayer", "reference")
            return q + attn(norm(q), features, ray_diff, mask)
        rays, samples, views, dim = features.shape
        out = int_view_sublayer(q.reshape(-1, dim), features.reshape(-1, views, dim), ray_diff.reshape(-1, views, 4),
                                mask.reshape(-1, views), self.weights, self.sublayer, self.norm_in_kernel)
        return out.reshape(rays, samples, dim).to(q.dtype)


class KernelViewColorBlend(KernelLeaf):
    """ViewColorBlend on the view-blend kernel. Same call: (h [R, S, C], features [R, S, V, C], colors [R, S, V, 3],
    ray_diff [R, S, V, 4], mask [R, S, V, 1], fc1, fc2) -> sample colours [R, S, 3]; fc1/fc2 must be the layers it
    was built from (plain nn.Linear: TypeError otherwise, and the leaf stays on the reference)."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.weights = PreparedBlendWeights.from_linears(fc1, fc2)
        self._layer_ids = (id(fc1), id(fc2))

    def run(self, h, features, colors, ray_diff, mask, fc1, fc2):
        _check_same_layers(self, (fc1, fc2))
        rays, samples, views, _ = features.shape
        blended = view_blend(self.weights.per_sample(h).reshape(rays * samples, -1),
                             features.reshape(rays * samples, views, -1), colors.reshape(rays * samples, views, 3),
                             ray_diff.reshape(rays * samples, views, 4), mask.reshape(rays * samples, views),
                             self.weights)
        return blended.view(rays, samples, 3).to(features.dtype)


class KernelBlendHead(KernelLeaf):
    """RayColorBlend (the whole blend colour head) on the blend-head kernel (CPU): per ray, the norm, the per-view
    blend and the softmax over the samples in one kernel. Same call: (q [R, S, C], features, colors, ray_diff,
    mask [R, S, V, 1], norm, view_blend, fc1, fc2, sample_fc) -> rgb [R, 3]; the layers must be the ones it was
    built from."""

    def __init__(self, norm: nn.Module, view_blend: nn.Module, fc1: nn.Module, fc2: nn.Module, sample_fc: nn.Module):
        super().__init__()
        self.weights = BlendHeadWeights.from_modules(norm, fc1, fc2, sample_fc)
        self._layer_ids = (id(norm), id(fc1), id(fc2), id(sample_fc))
        self.covered_ids = {id(view_blend)} | {id(m) for m in fc1.modules()}  # run inside this kernel

    def run(self, q, features, colors, ray_diff, mask, norm, view_blend, fc1, fc2, sample_fc):
        _check_same_layers(self, (norm, fc1, fc2, sample_fc))
        return blend_head(q, features, colors, ray_diff, mask.squeeze(-1), self.weights).to(q.dtype)


class KernelRayAttentionSublayer(KernelLeaf):
    """PreNormAttention of a ray block on the fused ray-attention kernel (CPU). Same call: (x [R, S, C], norm, attn)
    -> x + attn(norm(x)); norm/attn must be the modules it was built from. KernelNotApplicable (the parts are
    swapped instead) for a core other than dot-product or hashed-quadratic, or linears with integer activations."""

    def __init__(self, norm: nn.Module, attn: nn.Module):
        super().__init__()
        if type(attn) is not RayAttention or not isinstance(norm, nn.LayerNorm):
            raise KernelNotApplicable(f"no fused ray attention for {type(norm).__name__} + {type(attn).__name__}")
        core = attn.core
        if type(core) is DotProductAttention:
            kind, extra = "dense", {}
        elif type(core) is HashedQuadraticAttention:
            kind, extra = "hashed", {"scale": core.scale.detach(), "hash_w": core.hasher.weight.detach(),
                                     "hash_b": core.hasher.bias.detach()}
        else:
            raise KernelNotApplicable(f"the fused ray attention has no {type(core).__name__} core")
        if any(getattr(layer, "bias", None) is not None for layer in (attn.q_fc, attn.k_fc, attn.v_fc)):
            raise KernelNotApplicable("the fused ray attention expects q/k/v projections without bias")
        out_bias = attn.out_fc.bias.detach() if attn.out_fc.bias is not None else None
        self.weights = RayAttentionWeights.from_parts(
            norm.weight.detach(), norm.bias.detach(), norm.eps, *(linear_weight(layer) for layer in
                                                                  (attn.q_fc, attn.k_fc, attn.v_fc, attn.out_fc)),
            out_bias, attn.num_heads, kind, **extra)
        self._layer_ids = (id(norm), id(attn))
        self.covered_ids = {id(m) for m in attn.modules()}  # the kernel computes the whole attention

    def run(self, x, norm, attn):
        _check_same_layers(self, (norm, attn))
        return ray_attention(x, self.weights).to(x.dtype)


class KernelIntRayAttentionSublayer(KernelLeaf):
    """PreNormAttention of a ray block whose q/k/v/out linears are 8-bit per-token integer shift layers and whose
    core is the hashed quadratic attention (j; CPU with VNNI): LN, one quantization for q|k|v, the integer layers,
    hash codes, the popcount softmax, out_fc and the residual in one kernel per ray (kernels/int_ray_attention.py).
    norm_in_kernel=False takes the LN from PyTorch (then q|k|v are bit-exact). Calls that need gradients run the
    modules. Same call: (x [R, S, C], norm, attn) -> x + attn(norm(x)). KernelNotApplicable for other layers."""

    def __init__(self, norm: nn.Module, attn: nn.Module, norm_in_kernel: bool = True):
        super().__init__()
        try:
            self.weights = IntRayWeights.from_modules(norm, attn)
        except ValueError as error:
            raise KernelNotApplicable(str(error)) from error
        self.norm_in_kernel = norm_in_kernel
        self._layer_ids = (id(norm), id(attn))
        self.covered_ids = {id(m) for m in attn.modules()}  # the kernel computes the whole attention

    def run(self, x, norm, attn):
        _check_same_layers(self, (norm, attn))
        if needs_grad(x):
            note_kernel("int_ray_attention", "reference")
            return x + attn(norm(x))
        return int_ray_attention(x, self.weights, self.norm_in_kernel).to(x.dtype)


class KernelHashedAttention(KernelLeaf):
    """A hashed ray-attention core on the MatAdd kernels: q, k, v [R, H, S, d] -> [R, H, S, d]."""

    def __init__(self, source: nn.Module):
        super().__init__()
        if type(source) not in (HashedQuadraticAttention, HashedLinearAttention):
            raise TypeError(f"no hashed attention kernel for {type(source).__name__}")
        self.source = source

    def run(self, q, k, v):
        hasher = self.source.hasher
        weight, bias = hasher.weight.detach(), hasher.bias.detach()
        words_q, words_k = hash_pack(q, weight, bias), hash_pack(k, weight, bias)
        if isinstance(self.source, HashedQuadraticAttention):
            return quadratic_attention(words_q, words_k, v, self.source.scale.detach(), hasher.n_bits)
        return linear_attention(words_q, words_k, v, hasher.n_bits)


class KernelFFNSublayer(KernelLeaf):
    """PreNormFeedForward on the fused FFN kernel (always for MoE: routing without host sync) or two BLAS GEMMs.
    Same call: (x [..., C], norm, ff) -> x + ff(norm(x)); norm/ff must be the modules it was built from."""

    def __init__(self, norm: nn.LayerNorm, ff: nn.Module, cfg: KernelConfig):
        super().__init__()
        self.weights: FFNWeights = ffn_weights(norm, ff)
        self.on_tvm = cfg.ffn_on_tvm()
        self._layer_ids = (id(norm), id(ff))
        self.covered_ids = {id(m) for m in ff.modules()}  # the kernel computes the whole FFN

    def run(self, x, norm, ff):
        _check_same_layers(self, (norm, ff))
        if self.on_tvm or self.weights.num_experts > 1 or needs_grad(x):  # the op sends gradients to the reference
            return ffn_sublayer(x, self.weights)
        note_kernel("ffn_sublayer", "blas")
        return gemm_ffn_sublayer(x, self.weights)


def _check_same_layers(leaf: nn.Module, layers: tuple) -> None:
    if torch.compiler.is_compiling():  # checked eagerly; a traced graph is built from the layers it was given
        return
    if tuple(id(layer) for layer in layers) != leaf._layer_ids:
        raise RuntimeError(f"{type(leaf).__name__}: the model's layers were replaced after the kernels were swapped "
                           "in (its prepared weights are stale); call use_kernels_ again")


# ---------------------------------------------------------------------------------------------------- handlers

Handler = Callable[[nn.Module, nn.Module, KernelConfig], nn.Module]
# composite leaves whose kernels cover their block's parts: handled before any of those parts, whatever the order
# the parent defines its children in
_SUBLAYERS = (SampledViewEmbedding, PreNormAttention, PreNormViewAttention, PreNormFeedForward, RayColorBlend)
_HANDLERS: dict[type, Handler] = {}


def kernel_leaf_types() -> dict[str, type]:
    """The module types that have a kernel handler, by class name (what `filter_fn` can keep on PyTorch)."""
    return {cls.__name__: cls for cls in _HANDLERS}


def register_kernel_handler(module_type: type) -> Callable[[Handler], Handler]:
    """Decorator: handler(module, parent, cfg) -> its kernel-backed replacement, for modules of exactly
    `module_type`; raise TypeError/ValueError to leave that module on the reference (with one warning)."""
    def register(handler: Handler) -> Handler:
        _HANDLERS[module_type] = handler
        return handler
    return register


@register_kernel_handler(SampledViewEmbedding)
def _front_end(module, parent, cfg):
    if isinstance(parent.rgbfeat_fc2, IntShiftLinear) and not vnni_available():  # its parts run on their own kernels
        raise KernelNotApplicable("the integer front end runs on CPUs with AVX-512 VNNI")
    if cfg.kernel_device(parent.rgbfeat_fc1.weight.device) != "cpu":
        raise KernelNotApplicable("the fused front end is CPU-only; on CUDA grid_sample is native and the front end "
                                  "has its own kernel")
    if parent.rgbfeat_fc2.out_features % 16:
        raise KernelNotApplicable("the fused front end writes its channels 16 at a time; the sampler and the front "
                                  "end keep their own kernels")
    return KernelFrontEnd(parent.rgbfeat_fc1, parent.rgbfeat_fc2, (parent.source_sampler, parent.view_embedding))


@register_kernel_handler(SourceViewSampler)
def _source_views(module, parent, cfg):
    if cfg.kernel_device(parent.rgbfeat_fc1.weight.device) != "cpu":
        raise KernelNotApplicable("the source-views kernel is CPU-only; on CUDA grid_sample is a native kernel")
    return KernelSourceViews()


@register_kernel_handler(ViewEmbedding)
def _view_embedding(module, parent, cfg):
    if isinstance(parent.rgbfeat_fc2, IntShiftLinear):  # fp32 only: its layers run on their own kernels instead
        raise KernelNotApplicable("the view-features kernel computes fp32 layers")
    return KernelViewEmbedding(parent.rgbfeat_fc1, parent.rgbfeat_fc2)


@register_kernel_handler(ViewAttention)
def _view_attention(module, parent, cfg):
    if isinstance(module.k_fc, IntShiftLinear):  # integer layers: the VNNI view attention where it applies (CPU)
        if cfg.kernel_device(module.k_fc.sign_param.device) != "cpu" or not vnni_available():
            raise KernelNotApplicable("the integer view attention runs on CPUs with AVX-512 VNNI")
        return KernelIntViewAttention(module)
    return KernelViewAttention(module)


@register_kernel_handler(RayColorBlend)
def _blend_head(module, parent, cfg):
    if cfg.kernel_device(parent.norm.weight.device) != "cpu":
        raise KernelNotApplicable("the blend-head kernel is CPU-only; on CUDA the view blend has its own kernel")
    if isinstance(parent.view_fc1, BlockShiftLinear) and not vnni_available():
        raise KernelNotApplicable("the blend-head kernel's integer feature block runs on CPUs with AVX-512 VNNI")
    try:
        return KernelBlendHead(parent.norm, parent.view_blend, parent.view_fc1, parent.view_fc2, parent.sample_fc)
    except (TypeError, ValueError) as error:  # e.g. a width the kernel does not take: the view blend's own kernel
        raise KernelNotApplicable(f"blend head: {error}") from error


@register_kernel_handler(ViewColorBlend)
def _view_color_blend(module, parent, cfg):
    return KernelViewColorBlend(parent.view_fc1, parent.view_fc2)


@register_kernel_handler(PositionFusion)
def _position_fusion(module, parent, cfg):
    if cfg.kernel_device(parent.rgbfeat_fc1.weight.device) != "cpu":
        raise KernelNotApplicable("the position fusion kernel is CPU-only")
    return KernelPositionFusion(parent.pos_fuse, parent.pos_enc, parent.rgbfeat_fc2.out_features)


def _attention_sublayer(parent, cfg, fp32_leaf: type, integer_leaf: type, what: str):
    """The fused pre-norm attention sublayer of `parent` (a view or ray block; CPU only): its integer VNNI leaf when
    the attention's linears take integer activations, else its fp32 leaf."""
    if cfg.kernel_device(parent.attn_norm.weight.device) != "cpu":
        raise KernelNotApplicable(f"the fused {what} sublayer is CPU-only; on CUDA its attention has its own kernels")
    if isinstance(getattr(parent.attn, "q_fc", None), IntShiftLinear):
        if not vnni_available():
            raise KernelNotApplicable(f"the integer {what} sublayer runs on CPUs with AVX-512 VNNI")
        return integer_leaf(parent.attn_norm, parent.attn, cfg.int_norm_in_kernel)
    return fp32_leaf(parent.attn_norm, parent.attn)


@register_kernel_handler(PreNormViewAttention)
def _view_attention_sublayer(module, parent, cfg):
    return _attention_sublayer(parent, cfg, KernelViewAttentionSublayer, KernelIntViewAttentionSublayer,
                               "view-attention")


@register_kernel_handler(PreNormAttention)
def _ray_attention_sublayer(module, parent, cfg):
    return _attention_sublayer(parent, cfg, KernelRayAttentionSublayer, KernelIntRayAttentionSublayer,
                               "ray-attention")


@register_kernel_handler(HashedQuadraticAttention)
@register_kernel_handler(HashedLinearAttention)
def _hashed_attention(module, parent, cfg):
    return KernelHashedAttention(module)


@register_kernel_handler(PreNormFeedForward)
def _ffn_sublayer(module, parent, cfg):
    if integer_feedforward(parent.ff) and cfg.kernel_device(parent.ff_norm.weight.device) == "cpu":
        return KernelIntFFNSublayer(parent.ff_norm, parent.ff, cfg.int_norm_in_kernel)
    return KernelFFNSublayer(parent.ff_norm, parent.ff, cfg)


@register_kernel_handler(ShiftLinear)
def _shift_linear(module, parent, cfg):
    return KernelShiftLinear(module, cfg)


@register_kernel_handler(IntShiftLinear)
def _int_shift_linear(module, parent, cfg):
    return KernelIntShiftLinear(module, cfg)


def _swap(parent: nn.Module, prefix: str, cfg: KernelConfig, filter_fn, summary: dict, skipped: list,
          shift_linears: bool, covered: set[int]) -> None:
    """Depth first over `parent`. Pass 1 (shift_linears=False) swaps the composite leaves and stops at every
    kernel leaf; pass 2 swaps the ShiftLinears still called in PyTorch (e.g. the view attention's q_fc/out_fc),
    skipping those a kernel leaf already computes (`covered`, ids) and never entering a KernelShiftLinear. So a
    kernel leaf is built from the original layers, and a second use_kernels_ wraps nothing twice."""
    # children with a handler first: a fused sublayer leaf (e.g. a ray block's attn_sublayer) is built from the
    # original layers before a handler for one of its parts (the attention core) could swap that part
    children = sorted(parent.named_children(), key=lambda item: (type(item[1]) not in _SUBLAYERS,
                                                                 type(item[1]) not in _HANDLERS))
    for name, child in children:
        fqn = f"{prefix}.{name}" if prefix else name
        if isinstance(child, (KernelShiftLinear, KernelIntShiftLinear)) or id(child) in covered:
            continue
        if isinstance(child, KernelLeaf) and not shift_linears:
            continue
        handler = _HANDLERS.get(type(child))
        if handler is not None and isinstance(child, ShiftLinear) == shift_linears \
                and (filter_fn is None or filter_fn(child, fqn)):
            try:
                replacement = handler(child, parent, cfg)
            except (IntegerLayerError, KernelNotApplicable):
                pass  # not a fallback: its integer layers run on the integer kernel (swapped in pass 2), the rest
                # of the block (norms, softmax over views) is PyTorch glue between them, as in the model itself
            except (TypeError, ValueError) as error:
                warn_once(f"{fqn} ({type(child).__name__}) stays on the PyTorch reference: {error}")
                skipped.append(fqn)
            else:
                setattr(parent, name, replacement)
                summary[type(replacement).__name__] = summary.get(type(replacement).__name__, 0) + 1
                covered.update(getattr(replacement, "covered_ids", ()))
                continue
        _swap(child, fqn, cfg, filter_fn, summary, skipped, shift_linears, covered)


@torch.no_grad()
def use_kernels_(model: nn.Module, cfg: KernelConfig = KernelConfig(),
                 filter_fn: Callable[[nn.Module, str], bool] | None = None) -> dict:
    """Swap `model`'s leaves (a GNT in eval mode) to the kernels in place; see the module doc.

    Returns {"backend": "tvm" | "torch", <kernel leaf type>: count, ..., "skipped": [fqn, ...]}. With backend
    "torch" (or "tvm"/"auto" without TVM, after one warning) the model is left untouched.
    """
    backend = resolve_backend(cfg.backend)
    summary: dict = {"backend": backend}
    if backend == "torch":
        return summary
    if model.training:
        raise RuntimeError("use_kernels_ is for inference: call model.eval() first")
    skipped: list[str] = list(getattr(model, "kernel_skipped", []))
    covered = {i for m in model.modules() if isinstance(m, KernelLeaf) for i in getattr(m, "covered_ids", ())}
    for shift_linears in (False, True):
        _swap(model, "", cfg, filter_fn, summary, skipped, shift_linears, covered)
    model.kernel_skipped = sorted(set(skipped))
    summary["skipped"] = model.kernel_skipped
    return summary


def use_kernels(model: nn.Module, backend: str = "tvm", gemm: str = "auto",
                filter_fn: Callable[[nn.Module, str], bool] | None = None, device_type: str | None = None) -> dict:
    """use_kernels_ with the config given as strings (what the CLI and the config's render.kernels hold)."""
    return use_kernels_(model, KernelConfig(backend=backend, gemm=gemm, device_type=device_type), filter_fn)


def kernel_summary(model: nn.Module) -> str:
    kinds: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, KernelLeaf):
            kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    return ", ".join(f"{count} {name}" for name, count in sorted(kinds.items())) or "no kernels"
