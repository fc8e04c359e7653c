"""Operation counts and a unit-energy estimate, measured from the modules themselves during a real forward pass.

Forward hooks on every module of a known type count the arithmetic that module performs on the tensors it
actually sees (so MoE experts count only the tokens routed to them, and shift layers only their nonzero
weights). Ops are keyed by (kind, precision): kind in mult | add | shift | special (exp, division, sin/cos,
rsqrt), precision in fp32 | int32 | int8 | int16.

Counted: feature CNN (convolutions, norms), every linear / shift linear, both attentions (including the
view attention's subtraction, softmax and weighted sum), hashing and Hamming similarity, layer norms,
positional encodings, the MoE router and gate. Not counted (identical across variants, or negligible):
projecting samples into the source views and bilinear gathering, comparisons (ReLU, max-pooling, sign),
sampling and the mean over samples.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gnt_shiftadd.models.encodings import PositionalEncoding
from gnt_shiftadd.models.gnt import PositionFusion
from gnt_shiftadd.models.heads import ViewColorBlend
from gnt_shiftadd.models.transformers import DotProductAttention, FeedForward, RayAttention, ViewAttention
from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear
from gnt_shiftadd.shiftadd.hashed_attention import HashedLinearAttention, HashedQuadraticAttention, SeedLinearAttention
from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear
from gnt_shiftadd.shiftadd.moe import MoEFeedForward
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear
from renderer.rays import camera_rays
from renderer.render import Renderer, RenderSettings

# Energy per operation in pJ at 45 nm (Horowitz, ISSCC 2014, as used by ShiftAddViT / DeepShift).
# The table: FP32 mult 3.7, FP32 add 0.9, 32-bit shift 0.13. INT32 add 0.1 is Horowitz's value (used for
# XOR/popcount and fixed-point accumulation). "special" ops (exp, div, sin/cos, rsqrt) are costed as one FP32
# mult each, a lower bound that is the same for every variant.
UNIT_ENERGY_PJ = {
    ("mult", "fp32"): 3.7,
    ("add", "fp32"): 0.9,
    ("shift", "int32"): 0.13,
    ("add", "int32"): 0.1,
    ("special", "fp32"): 3.7,
    # integer shift layers (IntShiftLinear): the shift is at the activation's width, the accumulation int32;
    # INT8 mult 0.2 / add 0.03 are Horowitz's, 8/16-bit shift 0.024/0.057 ShiftAddNet's (You et al. 2020) table
    ("shift", "int8"): 0.024,
    ("shift", "int16"): 0.057,
    ("mult", "int8"): 0.2,
    ("add", "int8"): 0.03,
}
ENERGY_TABLE_NOTE = ("45 nm unit energies (pJ): FP32 mult 3.7, FP32 add 0.9, 32-bit shift 0.13, INT32 add 0.1 "
                     "(Horowitz 2014); exp/div/sin/rsqrt counted as one FP32 mult each; integer shift layers: "
                     "8/16-bit shift 0.024/0.057 (ShiftAddNet), INT8 mult 0.2, INT8 add 0.03")


@dataclass
class OpCounts:
    """Op counts split by model component, each a Counter over (kind, precision)."""

    by_component: dict[str, Counter] = field(default_factory=dict)

    def add(self, component: str, kind: str, precision: str, count: float) -> None:
        if count:
            self.by_component.setdefault(component, Counter())[(kind, precision)] += float(count)

    def total(self) -> Counter:
        out: Counter = Counter()
        for counter in self.by_component.values():
            out.update(counter)
        return out

    def scaled(self, factor: float) -> "OpCounts":
        return OpCounts({c: Counter({k: v * factor for k, v in cnt.items()}) for c, cnt in self.by_component.items()})

    @staticmethod
    def energy_pj(counter: Counter) -> float:
        missing = set(counter) - set(UNIT_ENERGY_PJ)
        if missing:
            raise KeyError(f"no unit energy for {sorted(missing)}")
        return sum(UNIT_ENERGY_PJ[key] * count for key, count in counter.items())

    def to_dict(self) -> dict:
        def flat(counter: Counter) -> dict:
            return {f"{kind}_{precision}": count for (kind, precision), count in sorted(counter.items())}

        total = self.total()
        return {
            "total": flat(total),
            "mults": sum(v for (k, _), v in total.items() if k == "mult"),
            "adds": sum(v for (k, _), v in total.items() if k == "add"),
            "shifts": sum(v for (k, _), v in total.items() if k == "shift"),
            "special": sum(v for (k, _), v in total.items() if k == "special"),
            "energy_pj": self.energy_pj(total),
            "by_component": {c: flat(cnt) | {"energy_pj": self.energy_pj(cnt)} for c, cnt in sorted(self.by_component.items())},
        }


def component_of(name: str) -> str:
    """Which part of GNT a module belongs to, from its qualified name."""
    if name.startswith("feature_net") or ".feature_net" in name:
        return "cnn"
    for block, label in (("view_blocks", "view"), ("ray_blocks", "ray")):
        if f"{block}." in name:
            return "ffn" if ".ff" in name.split(block, 1)[1] else f"{label}_transformer"
    return "other"


def _tokens(x: torch.Tensor, features: int) -> int:
    return x.numel() // features


def _count_linear(ops, comp, module: nn.Linear, inputs, _out):
    t = _tokens(inputs[0], module.in_features)
    ops.add(comp, "mult", "fp32", t * module.in_features * module.out_features)
    ops.add(comp, "add", "fp32", t * (module.in_features - 1) * module.out_features + (t * module.out_features if module.bias is not None else 0))


def _count_shift_linear(ops, comp, module: ShiftLinear, inputs, _out):
    """One shift + one accumulate per nonzero weight and token; fixed-point activations accumulate in int32."""
    t = _tokens(inputs[0], module.in_features)
    nonzero = module.nonzero_weights()
    precision = "int32" if module.spec.fixed_point_bits else "fp32"
    ops.add(comp, "shift", "int32", t * nonzero)
    ops.add(comp, "add", precision, t * max(nonzero - module.out_features, 0))
    if module.bias is not None:
        ops.add(comp, "add", "fp32", t * module.out_features)
    if module.spec.channel_scale:
        ops.add(comp, "shift", "int32", t * module.out_features)  # the per-channel power-of-two scale


def _count_quantized_io(ops, comp, tokens: int, module: nn.Module, per_token_scale: bool) -> None:
    """What every integer linear layer pays around its products: rounding each input (one fp32 mult; round/clamp
    are comparisons), two divisions per token for a dynamic scale, and per output one fp32 rescale and the fp32
    bias. One function for the integer shift layers and the dense int8 reference, so they differ only in their
    products."""
    ops.add(comp, "mult", "fp32", tokens * module.in_features)
    if per_token_scale:
        ops.add(comp, "special", "fp32", 2 * tokens)
    ops.add(comp, "mult", "fp32", tokens * module.out_features)
    if module.bias is not None:
        ops.add(comp, "add", "fp32", tokens * module.out_features)


def _count_int_shift_linear(ops, comp, module: IntShiftLinear, inputs, _out):
    """Integer activations: the quantization around the products, one shift at the activation width per nonzero
    weight, int32 accumulation, and per output the channel's power-of-two (a shift)."""
    t = _tokens(inputs[0], module.in_features)
    nonzero = module.nonzero_weights()
    _count_quantized_io(ops, comp, t, module, module.act_scale == "per_token")
    ops.add(comp, "shift", f"int{module.activation_bits}", t * nonzero)
    ops.add(comp, "add", "int32", t * max(nonzero - module.out_features, 0))
    ops.add(comp, "shift", "int32", t * module.out_features)


def _count_int8_linear(ops, comp, module: nn.Linear, inputs, _out):
    """A dense nn.Linear as a CPU user would quantize it (dynamic int8: torch.ao's quantize_dynamic): the same
    quantization around the products as an IntShiftLinear with a per-token scale, and int8 x int8 products with
    int32 accumulation (the weight's scale folds into the rescale)."""
    t = _tokens(inputs[0], module.in_features)
    _count_quantized_io(ops, comp, t, module, per_token_scale=True)
    ops.add(comp, "mult", "int8", t * module.in_features * module.out_features)
    ops.add(comp, "add", "int32", t * (module.in_features - 1) * module.out_features)


def _count_conv(ops, comp, module: nn.Conv2d, _inputs, out):
    per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
    ops.add(comp, "mult", "fp32", out.numel() * per_output)
    ops.add(comp, "add", "fp32", out.numel() * (per_output - 1 + (module.bias is not None)))


def _count_norm(ops, comp, module, inputs, _out):
    """Mean, variance, normalise, affine: ~3 adds and 3 mults per element, one rsqrt per normalised group."""
    x = inputs[0]
    groups = x.shape[0] * x.shape[1] if isinstance(module, nn.modules.instancenorm._InstanceNorm) else x.numel() // x.shape[-1]
    ops.add(comp, "add", "fp32", 3 * x.numel())
    ops.add(comp, "mult", "fp32", 3 * x.numel())
    ops.add(comp, "special", "fp32", groups)


def _softmax(ops, comp, rows: int, length: int, width: int = 1):
    ops.add(comp, "special", "fp32", 2 * rows * length * width)  # exp and division
    ops.add(comp, "add", "fp32", rows * (length - 1) * width)


def _count_dot_product(ops, comp, _module, inputs, _out):
    q, k, v = inputs[:3]
    r_h, s_q, d = q.numel() // (q.shape[-2] * q.shape[-1]), q.shape[-2], q.shape[-1]
    s_k = k.shape[-2]
    ops.add(comp, "mult", "fp32", r_h * s_q * s_k * (2 * d + 1))  # q k^T, 1/sqrt(d), weights @ v
    ops.add(comp, "add", "fp32", r_h * s_q * (s_k * (d - 1) + (s_k - 1) * d))
    _softmax(ops, comp, r_h * s_q, s_k)


def _count_hash_projection(ops, comp, hasher, q, k):
    """Codes of q and k: a real d -> n projection per head, then a sign (a comparison, not counted)."""
    d, n = hasher.weight.shape[-2], hasher.weight.shape[-1]
    tokens = (q.numel() + k.numel()) // d
    ops.add(comp, "mult", "fp32", tokens * d * n)
    ops.add(comp, "add", "fp32", tokens * d * n)


def _count_hash_quadratic(ops, comp, module, inputs, _out):
    q, k, v = inputs[:3]
    _count_hash_projection(ops, comp, module.hasher, q, k)
    n, d = module.hasher.weight.shape[-1], q.shape[-1]
    r_h, s = q.numel() // (q.shape[-2] * d), q.shape[-2]
    words = math.ceil(n / 32)
    ops.add(comp, "add", "int32", r_h * s * s * (2 * words + 1))  # XOR + popcount per word, n - 2h
    ops.add(comp, "mult", "fp32", r_h * s * s * (d + 1))  # temperature, weights @ v
    ops.add(comp, "add", "fp32", r_h * s * (s - 1) * d)
    _softmax(ops, comp, r_h * s, s)


def _count_hash_linear(ops, comp, module, inputs, _out):
    """{0,1} codes: K_b^T V, K_b^T 1, Q_b (.), Q_b (.) are conditional accumulations (additions)."""
    q, k, v = inputs[:3]
    _count_hash_projection(ops, comp, module.hasher, q, k)
    n, d = module.hasher.weight.shape[-1], q.shape[-1]
    r_h, s = q.numel() // (q.shape[-2] * d), q.shape[-2]
    ops.add(comp, "add", "fp32", 2 * r_h * s * n * d)
    ops.add(comp, "add", "int32", 2 * r_h * s * n)
    ops.add(comp, "special", "fp32", r_h * s * d)  # the normalising division
    if isinstance(module, SeedLinearAttention):
        kernel = module.conv.kernel_size[0] if hasattr(module, "conv") else 3
        ops.add(comp, "mult", "fp32", r_h * s * d * (2 + kernel))  # 0.5 v, 1/pi scaling, depthwise conv
        ops.add(comp, "add", "fp32", r_h * s * d * (1 + kernel))


def _count_view_attention(ops, comp, _module, inputs, _out):
    """The arithmetic between the linears: k - q + pos, masked softmax over views, (v + pos) * w, sum over views."""
    q, features = inputs[0], inputs[1]
    n = features.numel() // features.shape[-1] * q.shape[-1]  # [R, S, V, C] elements at the model width
    rows, views = q.numel() // q.shape[-1], features.shape[-2]
    ops.add(comp, "add", "fp32", 3 * n + (n - q.numel()))
    ops.add(comp, "mult", "fp32", 2 * n)
    _softmax(ops, comp, rows * q.shape[-1], views)


def _count_view_color_blend(ops, comp, _module, inputs, _out):
    """BlendColorHead's per-view blend: fc1 split by input block (models.heads.split_view_linear; a fc1 that is not a
    plain nn.Linear is called whole and counted by its own hook), the masked softmax over views and the colour
    blend. fc2 is a module call and counts itself."""
    h, features, fc1 = inputs[0], inputs[1], inputs[5]
    channels, views = features.shape[-1], features.shape[-2]
    per_view = features.numel() // channels  # (sample, view) pairs
    samples = h.numel() // h.shape[-1]
    if type(fc1) is nn.Linear:
        hidden, ray_dims = fc1.out_features, fc1.in_features - 2 * channels
        ops.add(comp, "mult", "fp32", per_view * (channels + ray_dims) * hidden + samples * channels * hidden)
        ops.add(comp, "add", "fp32", per_view * (channels + ray_dims) * hidden  # both blocks' sums, + per sample
                + samples * channels * hidden)  # (C - 1) sums and the bias per hidden unit
    elif isinstance(fc1, BlockShiftLinear):  # its shift feature block is a module call (counts itself); the dense
        hidden, ray_dims = fc1.out_features, fc1.rest.in_features - channels  # h and ray_diff blocks are not
        ops.add(comp, "mult", "fp32", per_view * ray_dims * hidden + samples * channels * hidden)
        ops.add(comp, "add", "fp32", per_view * (ray_dims + 1) * hidden  # sums, + the feature block's outputs,
                + samples * channels * hidden)  # + per sample
    _softmax(ops, comp, samples, views)
    ops.add(comp, "mult", "fp32", per_view * 4)  # weight x mask, weight x rgb
    ops.add(comp, "add", "fp32", samples * (views - 1) * 3)


def _count_position_fusion(ops, comp, _module, inputs, _out):
    """GNT's position fusion with its first layer split by input block (models.gnt.PositionFusion): the q and
    point-code blocks per sample, the direction block once per ray, the broadcast add. A BlockShiftLinear first layer
    (shiftadd.position_fusion: shift) splits the same way, its shift blocks module calls that count themselves;
    any other first layer that is not a plain nn.Linear is called whole and counted by its own hook; ReLU and fc2
    are module calls that count themselves."""
    q, _points, dir_code, mlp, encoding, _memo = inputs  # the encoding is a module call that counts itself
    fc1 = mlp[0]
    samples, rays = q.numel() // q.shape[-1], dir_code.numel() // dir_code.shape[-1]
    if type(fc1) is nn.Linear:
        per_sample, extra_adds = q.shape[-1] + encoding.out_dim, 0
    elif getattr(fc1, "block", None) == q.shape[-1]:  # only the dense code inputs per sample, + the shift blocks'
        shifted = fc1.second.in_features if fc1.has_second else 0  # outputs
        per_sample, extra_adds = encoding.out_dim - shifted, samples * fc1.out_features * (1 + fc1.has_second)
    else:
        return
    per_ray = dir_code.shape[-1]
    ops.add(comp, "mult", "fp32", (samples * per_sample + rays * per_ray) * fc1.out_features)
    ops.add(comp, "add", "fp32", (samples * per_sample + rays * per_ray) * fc1.out_features  # sums, bias, broadcast
            + extra_adds)


def _count_positional_encoding(ops, comp, module, inputs, _out):
    x = inputs[0]
    freqs = (module.out_dim - x.shape[-1]) // (2 * x.shape[-1])
    ops.add(comp, "mult", "fp32", x.numel() * freqs)
    ops.add(comp, "special", "fp32", 2 * x.numel() * freqs)


def _count_moe_gate(ops, comp, module, inputs, out):
    ops.add(comp, "mult", "fp32", out.numel())  # gate value times the expert output


_COUNTERS = [  # most specific first: the first matching type counts a module
    (IntShiftLinear, _count_int_shift_linear),
    (ShiftLinear, _count_shift_linear),
    (nn.Linear, _count_linear),
    (nn.Conv2d, _count_conv),
    ((nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm), _count_norm),
    (DotProductAttention, _count_dot_product),
    (HashedQuadraticAttention, _count_hash_quadratic),
    ((HashedLinearAttention, SeedLinearAttention), _count_hash_linear),
    (ViewAttention, _count_view_attention),
    (ViewColorBlend, _count_view_color_blend),
    (PositionFusion, _count_position_fusion),
    (PositionalEncoding, _count_positional_encoding),
    (MoEFeedForward, _count_moe_gate),
]


class OpCounter:
    """Context manager: counts the ops of every forward pass of `model` while active.

    MoE layers switch to per-expert ("gather") dispatch while counting, so each expert is charged only for the
    tokens routed to it, as a fused kernel would.
    """

    def __init__(self, model: nn.Module, int8_linears: bool = False):
        self.model = model
        self.ops = OpCounts()
        self.int8_linears = int8_linears  # count the reparameterizable nn.Linear layers as dynamic int8
        self._handles: list = []
        self._dispatch: list = []

    def __enter__(self) -> "OpCounter":
        int8 = _reparameterizable_linears(self.model) if self.int8_linears else set()
        for name, module in self.model.named_modules():
            if name in int8:
                self._handles.append(module.register_forward_hook(
                    lambda m, i, o, comp=component_of(name): _count_int8_linear(self.ops, comp, m, i, o)))
                continue
            for types, fn in _COUNTERS:
                if isinstance(module, types):
                    comp = component_of(name)
                    self._handles.append(module.register_forward_hook(
                        lambda m, i, o, fn=fn, comp=comp: fn(self.ops, comp, m, i, o)))
                    break
            if isinstance(module, MoEFeedForward):
                self._dispatch.append((module, module.dispatch))
                module.dispatch = "gather"
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for module, dispatch in self._dispatch:
            module.dispatch = dispatch


def _reparameterizable_linears(model: nn.Module) -> set[str]:
    """Names of the plain nn.Linear layers ShiftAddViT reparameterizes: inside the attentions and the FFNs."""
    names = set()
    for parent_name, parent in model.named_modules():
        if isinstance(parent, (RayAttention, ViewAttention, FeedForward)):
            names.update(f"{parent_name}.{child}" for child, m in parent.named_children() if type(m) is nn.Linear)
    return names


@torch.no_grad()
def count_frame_ops(model, tensors, cfg, view: int | None = None, n_rays: int = 256, seed: int = 0,
                    int8_linears: bool = False) -> dict:
    """Ops and energy per rendered ray and per frame of a held-out view, measured on `n_rays` random pixels.

    Per frame = per-ray ops x H x W + the feature CNN on the source views (run once per frame). int8_linears:
    count the dense nn.Linear layers of the attentions and FFNs as dynamic int8 layers (the dense model at the
    integer variants' precision: the "saving vs dense int8" reference); every other op as it runs.
    """
    scene = tensors.scene
    view = int(scene.test_ids[0] if len(scene.test_ids) else scene.train_ids[0]) if view is None else view
    model.eval()
    source_ids = tensors.nearest_sources(scene.c2w[view], cfg.data.num_source_views, exclude_view=view)
    with OpCounter(model) as cnn_counter:
        views = model.encode_sources(*tensors.source_inputs(source_ids))
    K = torch.as_tensor(scene.intrinsics[view], dtype=torch.float32)
    c2w = torch.as_tensor(scene.c2w[view], dtype=torch.float32)
    origins, directions = (t.reshape(-1, 3) for t in camera_rays(K, c2w, scene.height, scene.width))
    pick = torch.from_numpy(np.random.default_rng(seed).choice(origins.shape[0], min(n_rays, origins.shape[0]), replace=False))
    origins, directions = origins[pick].to(tensors.device), directions[pick].to(tensors.device)
    near, far = scene.depth_range(view)
    renderer = Renderer(RenderSettings.from_config(cfg).with_(autocast="none"), kind=scene.kind)  # fp32 counts
    with OpCounter(model, int8_linears=int8_linears) as ray_counter:
        renderer.render_rays(lambda p, d, o: model.render_points(p, d, o[0], views), origins, directions, near, far)
    per_ray = ray_counter.ops.scaled(1.0 / len(pick))
    pixels = scene.height * scene.width
    per_frame = per_ray.scaled(pixels)
    for comp, counter in cnn_counter.ops.by_component.items():
        per_frame.by_component.setdefault(comp, Counter()).update(counter)
    return {
        "view": view, "rays_measured": len(pick), "resolution": [scene.height, scene.width],
        "n_samples": cfg.render.n_samples, "num_source_views": cfg.data.num_source_views,
        "per_ray": per_ray.to_dict(), "per_frame": per_frame.to_dict(), "energy_table": ENERGY_TABLE_NOTE,
    }
