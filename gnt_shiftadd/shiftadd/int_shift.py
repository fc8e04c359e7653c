"""Integer shift layers: fixed-point activations x power-of-two integer weights, int32 accumulation, one rescale.

A ShiftLinear weight W[o, i] = s * 2^(p + c_o) with p in [exponent_min, exponent_max] is, per output channel,
an exact small integer times one power of two:

    W[o, i] = w_int[o, i] * 2^(c_o + exponent_min),   w_int = s * 2^(p - exponent_min)  (|w_int| <= 2^span)

with span = exponent_max - exponent_min, so w_int fits int8 for span <= 6 and int16 for span <= 14: the
weights need no rounding to run on integer dot-product units (AVX-512 VNNI `vpdpbusd` / `vpdpwssd`). The
activations are rounded to B-bit fixed point (B = 8 or 16) with a scale per token (dynamic: the token's absmax)
or per tensor (calibrated: the absmax observed on the scene's rays, kept in the `activation_absmax` buffer):

    q[t, i] = clamp(round_half_even(x[t, i] * inv_t), -Q, Q),   Q = 2^(B-1) - 1
    inv_t   = Q / a_t,  s_t = a_t / Q,   a_t = max(absmax, 2^-100)    (fp32; the floor keeps inv_t finite)
    acc     = sum_i q[t, i] * w_int[o, i]                              (exact integer, int32)
    y[t, o] = act((fp32(acc) * s_t) * 2^(c_o + exponent_min) + b_o)    (fp32, in this order)

`int_shift_reference` is the ground truth a kernel must match bit for bit; `IntShiftLinear.forward` computes
exactly the same values (the products and partial sums of integer-valued floats are exact below 2^24, or in
fp64 below 2^53) with straight-through gradients, so quantization-aware fine-tuning trains the model that runs.
The layer is overflow-free by construction: in_features * Q * 2^span < 2^31 is checked when it is built.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec

__all__ = ["IntegerLayerError", "ACTIVATION_BITS", "ACT_SCALES", "ABSMAX_FLOOR", "IntShiftLinear", "integer_linears_",
           "integer_fusion_mlp",
           "rounding_tie_distance",
           "integer_weights", "int_shift_reference",
           "quantize_activations", "activation_scales", "export_int_shift", "exponent_span_histogram"]

ACTIVATION_BITS = (8, 16)
ACT_SCALES = ("per_token", "per_tensor")
ABSMAX_FLOOR = 2.0 ** -100  # keeps Q / absmax finite in fp32 for all-zero (or subnormal) tokens
_INT32_LIMIT = 2 ** 31


class IntegerLayerError(ValueError):
    """A fused fp32 kernel was asked to compute an IntShiftLinear: the layer runs on its own integer kernel."""


def _max_level(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def check_int_shift_fits(in_features: int, spec: ShiftSpec, bits: int, where: str = "IntShiftLinear") -> None:
    """Raise ValueError when the layer's int32 accumulation could overflow (or the bit width is unsupported)."""
    if bits not in ACTIVATION_BITS:
        raise ValueError(f"{where}: activation_bits must be one of {ACTIVATION_BITS}, got {bits}")
    span = spec.exponent_max - spec.exponent_min
    worst = in_features * _max_level(bits) * (1 << span)
    if worst >= _INT32_LIMIT:
        raise ValueError(f"{where}: {in_features} inputs x {bits}-bit activations x weights up to 2^{span} "
                         f"(shift exponents [{spec.exponent_min}, {spec.exponent_max}]) can overflow int32 "
                         f"({worst} >= 2^31); narrow the exponent range (shiftadd.shift_exponent_min) or use 8 bits")


def activation_scales(x: torch.Tensor, bits: int, absmax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv [..., 1], scale [..., 1]) in fp32: per token from x's own absmax when `absmax` is None, else from the
    calibrated per-tensor absmax (a 0-d or 1-element tensor). Never differentiated (the scale is data, not a
    parameter)."""
    level = float(_max_level(bits))
    if absmax is None:
        amax = x.detach().abs().amax(dim=-1, keepdim=True)
    else:
        amax = absmax.detach().reshape(()).to(device=x.device, dtype=torch.float32).expand(*x.shape[:-1], 1)
    amax = amax.clamp_min(ABSMAX_FLOOR)
    # Full-size tensor divisions: torch evaluates `scalar / tensor` and `tensor / scalar` as a multiplication by a
    # rounded reciprocal, which can differ from the IEEE quotient a kernel computes by one ulp.
    levels = torch.full_like(amax, level)
    return torch.div(levels, amax), torch.div(amax, levels)


def quantize_activations(x: torch.Tensor, inv: torch.Tensor, bits: int) -> torch.Tensor:
    """round_half_even(x * inv) clamped to +-(2^(bits-1) - 1), as integer-valued fp32 (no gradient)."""
    level = float(_max_level(bits))
    return torch.round(x.detach().float() * inv).clamp_(-level, level)


def rounding_tie_distance(x: torch.Tensor, bits: int = 8, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """How far, in quantization steps, each scaled value x * inv (the token's own absmax scale, or the calibrated
    per-tensor `absmax`) lies from a rounding tie (a .5 step): fp32 inputs computed in another order can round one
    step apart only near 0. Same shape as x."""
    inv, _ = activation_scales(x.float(), bits, absmax)
    scaled = x.float() * inv
    return ((scaled - scaled.floor()) - 0.5).abs()


def integer_weights(module: ShiftLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_int fp32 [out, in], integer-valued with straight-through gradients; out_scale fp32 [out] = 2^(c_o +
    exponent_min), exact). effective_weight == w_int * out_scale[:, None] bitwise."""
    exponent = module.channel_exponent.to(torch.float32) + float(module.spec.exponent_min)
    out_scale = torch.ldexp(torch.ones_like(exponent), exponent)
    total = module.quantized_exponent() - float(module.spec.exponent_min)  # in [0, span], integer-valued
    return module.quantized_sign() * torch.exp2(total), out_scale


def _exact_dtype(in_features: int, bits: int, span: int) -> torch.dtype:
    """fp32 when every partial sum is an integer below 2^24 (then any summation order is exact), else fp64."""
    return torch.float32 if in_features * _max_level(bits) * (1 << span) < 2 ** 24 else torch.float64


def _rescale(acc: torch.Tensor, scale: torch.Tensor, out_scale: torch.Tensor, bias: torch.Tensor | None,
             activation: str) -> torch.Tensor:
    y = (acc.float() * scale) * out_scale
    if bias is not None:
        y = y + bias
    return F.relu(y) if activation == "relu" else y


def int_shift_reference(x: torch.Tensor, packed: dict, activation: str = "none") -> torch.Tensor:
    """Ground truth of the integer kernel, in integer arithmetic. x [..., in] float -> [..., out] fp32.

    packed = `export_int_shift(module)`: {"weight_int" int8/int16 [out, in], "out_scale" fp32 [out], "bias" fp32
    [out] or None, "bits", "absmax" (fp32 [1]; per-tensor) or None (per token)}.
    """
    bits = int(packed["bits"])
    inv, scale = activation_scales(x.float(), bits, packed["absmax"])
    q = quantize_activations(x, inv, bits).to(torch.int64)
    acc = torch.matmul(q, packed["weight_int"].to(torch.int64).t())
    if bool((acc.abs() >= _INT32_LIMIT).any()):
        raise AssertionError("int_shift_reference: accumulation left int32 (the fit check should prevent this)")
    acc = acc.to(torch.int32)
    bias = packed["bias"].float() if packed["bias"] is not None else None
    return _rescale(acc, scale, packed["out_scale"].float(), bias, activation)


class IntShiftLinear(ShiftLinear):
    """A ShiftLinear whose inputs are B-bit fixed point (module docstring); same parameters as ShiftLinear plus
    buffer `activation_absmax` fp32 [1] (per-tensor scale; 0 until calibrated). x [..., in] -> [..., out] fp32.

    Training: straight-through rounding of x (gradient passes where |x * inv| <= Q, zero where it saturates),
    the weight STEs of ShiftLinear; the forward values are bitwise those of `int_shift_reference`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, spec: ShiftSpec = ShiftSpec(),
                 activation_bits: int = 8, act_scale: str = "per_token", *, device=None, dtype=None) -> None:
        check_int_shift_fits(in_features, spec, activation_bits)
        if act_scale not in ACT_SCALES:
            raise ValueError(f"IntShiftLinear: act_scale must be one of {ACT_SCALES}, got {act_scale!r}")
        if spec.fixed_point_bits:
            raise ValueError("IntShiftLinear: fixed_point_bits must be 0 (the integer path has its own activation "
                             "format)")
        super().__init__(in_features, out_features, bias, spec, device=device, dtype=dtype)
        self.activation_bits = activation_bits
        self.act_scale = act_scale
        self.register_buffer("activation_absmax", torch.zeros(1, dtype=torch.float32, device=device))
        self.observing = False  # while True (calibration), forward records the running absmax of its inputs

    @classmethod
    def from_shift_linear(cls, source: ShiftLinear, activation_bits: int = 8,
                          act_scale: str = "per_token") -> "IntShiftLinear":
        """The same (trained) shift weights with integer activations; device follows source."""
        device = source.sign_param.device
        module = cls(source.in_features, source.out_features, source.bias is not None, source.spec, activation_bits,
                     act_scale, device=device, dtype=source.sign_param.dtype)
        module.load_state_dict(source.state_dict(), strict=False)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: ShiftSpec = ShiftSpec(), activation_bits: int = 8,
                    act_scale: str = "per_token") -> "IntShiftLinear":
        return cls.from_shift_linear(ShiftLinear.from_linear(linear, spec), activation_bits, act_scale)

    @property
    def calibrated(self) -> bool:
        return bool(self.activation_absmax.item() > 0)

    def _absmax_or_none(self) -> torch.Tensor | None:
        if self.act_scale == "per_token":
            return None
        if not self.calibrated:
            raise RuntimeError("IntShiftLinear (act_scale=per_tensor) has no calibrated activation_absmax: run "
                               "calibration rays through it (shiftadd conversion does) or load a converted checkpoint")
        return self.activation_absmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            with torch.no_grad():
                seen = x.detach().abs().amax().float().reshape(1)
                self.activation_absmax.copy_(torch.maximum(self.activation_absmax, seen))
        bits = self.activation_bits
        inv, scale = activation_scales(x.float(), bits, self._absmax_or_none())
        work = x.float()
        q = quantize_activations(work, inv, bits)
        level = float(_max_level(bits))
        inside = (work.detach() * inv).abs() <= level
        # Straight-through: forward value q, gradient d q / d x = inv where not saturated (0 where clipped).
        q = q + torch.where(inside, work * inv - (work * inv).detach(), torch.zeros_like(work))
        w_int, out_scale = integer_weights(self)
        span = self.spec.exponent_max - self.spec.exponent_min
        exact = _exact_dtype(self.in_features, bits, span)
        acc = F.linear(q.to(exact), w_int.to(exact))
        if exact is torch.float64:  # round through int32's value set exactly as the kernel does
            acc = acc.float()
        bias = self.bias.float() if self.bias is not None else None
        return _rescale(acc, scale, out_scale, bias, "none")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation_bits={self.activation_bits}, act_scale={self.act_scale}"


def integer_linears_(module: nn.Module, spec: ShiftSpec = ShiftSpec(exponent_min=-6), bits: int = 8,
                     act_scale: str = "per_token") -> nn.Module:
    """Every direct nn.Linear child of `module` replaced in place by an IntShiftLinear of its weights (no calibration,
    no fine-tuning: a quick integer block for kernel tests and benchmarks; the variants convert through
    shiftadd.reparameterize). Defaults: g's and j's format (int8 weights, 8-bit per-token activations). Returns
    module."""
    for name, layer in list(module.named_children()):
        if type(layer) is nn.Linear:
            setattr(module, name, IntShiftLinear.from_linear(layer, spec, bits, act_scale).train(layer.training))
    return module


def integer_fusion_mlp(dense: nn.Sequential, channels: int, waves_start: int, waves: int,
                       spec: ShiftSpec = ShiftSpec(exponent_min=-6), bits: int = 8,
                       act_scale: str = "per_tensor") -> nn.Sequential:
    """A dense position fusion MLP (Linear, ReLU, Linear) in variant n's integer form, uncalibrated: its first layer a
    BlockShiftLinear whose query block (inputs 0..channels) and point-code waves block (waves_start.., `waves` wide)
    are IntShiftLinears, the rest dense; its second layer an IntShiftLinear (shiftadd.reparameterize's conversion,
    then integer_linears_'s, for kernel tests and benchmarks)."""
    first = BlockShiftLinear.from_linear(dense[0], channels, spec, second=(waves_start, waves))
    first.first, first.second = (IntShiftLinear.from_shift_linear(block, bits, act_scale)
                                 for block in (first.first, first.second))
    return nn.Sequential(first, nn.ReLU(), IntShiftLinear.from_linear(dense[2], spec, bits, act_scale)).eval()


@torch.no_grad()
def export_int_shift(module: IntShiftLinear) -> dict:
    """What the integer kernel consumes (CPU tensors): weight_int int8 (span <= 6) or int16 [out, in], out_scale
    fp32 [out], bias fp32 [out] or None, bits, absmax fp32 [1] (per_tensor) or None (per_token)."""
    w_int, out_scale = integer_weights(module)
    span = module.spec.exponent_max - module.spec.exponent_min
    dtype = torch.int8 if span <= 6 else torch.int16
    return {
        "weight_int": w_int.detach().cpu().round().to(dtype),
        "out_scale": out_scale.detach().cpu().float().clone(),
        "bias": module.bias.detach().cpu().float().clone() if module.bias is not None else None,
        "bits": module.activation_bits,
        "absmax": module._absmax_or_none().detach().cpu().float().reshape(1).clone()
        if module.act_scale == "per_tensor" else None,
    }


@torch.no_grad()
def exponent_span_histogram(module: ShiftLinear) -> dict:
    """How many output channels of a converted layer have nonzero weights spanning <= 6 exponents (exact in int8)
    and <= 14 (exact in int16), and how many weights an int8 range [p_max - 6, p_max] per channel would drop."""
    sign = module.quantized_sign()
    exponent = module.quantized_exponent()
    nonzero = sign != 0
    high = torch.where(nonzero, exponent, torch.full_like(exponent, -math.inf)).amax(dim=1)
    low = torch.where(nonzero, exponent, torch.full_like(exponent, math.inf)).amin(dim=1)
    span = torch.where(nonzero.any(dim=1), high - low, torch.zeros_like(high))
    dropped = nonzero & (exponent < (high[:, None] - 6))
    return {"channels": int(span.numel()), "span_le_6": int((span <= 6).sum()), "span_le_14": int((span <= 14).sum()),
            "nonzero_weights": int(nonzero.sum()), "weights_below_int8_range": int(dropped.sum())}
