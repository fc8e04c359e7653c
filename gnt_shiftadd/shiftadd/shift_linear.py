"""Shift linear layers (DeepShift-PS style, as reparameterized by ShiftAddViT).

Every weight is W[o, i] = s[o, i] * 2^(p[o, i] + c[o]) with s in {-1, 0, +1}, p an integer in
[exponent_min, exponent_max] and c[o] an optional per-output-channel integer exponent, so a multiply becomes a
bit shift (plus one more shift per output channel for c).

Conversion of a trained weight (`ShiftLinear.from_linear`):
  * c[o] = ceil(log2(max_i |w[o, i]|)) - exponent_max when `channel_scale` (0 for an all-zero row), so the
    largest weight of each row lands inside the exponent range instead of being clipped at 2^exponent_max;
  * p is rounded in the log domain: p = round(log2(|w| / 2^c)) (round to nearest; e.g. 0.3 -> 0.25, 0.7 -> 0.5,
    0.75 -> 1.0), so the relative error of every weight is at most 2^0.5 - 1;
  * zero rule: a weight becomes exactly 0 (s = 0) when its rounded exponent falls below the range, i.e. when
    round(log2(|w| / 2^c)) < exponent_min (equivalently |w| / 2^c < 2^(exponent_min - 0.5), up to ties).
    Rounded exponents above exponent_max (only possible without channel_scale) are clamped to exponent_max.

Packed codes (`export_codes`, consumed by the TVM kernel; `decode_shift_codes` is the reference decoder), one
uint8 per weight with B = code_bits:
  * bit B-1: sign, 1 = negative;
  * bits 0..B-2: e = p - exponent_min in [0, exponent_max - exponent_min];
  * the all-ones low field (2^(B-1) - 1) means weight 0 (whatever the sign bit; exported zeros have sign bit 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ShiftSpec", "ShiftLinear", "decode_shift_codes"]

_MAX_CODE_BITS = 8  # codes are exported as uint8


@dataclass(frozen=True)
class ShiftSpec:
    """How weights are quantized to signed powers of two, and how activations enter the layer.

    exponent_min/exponent_max: the integer range of p. The default [-14, 0] gives 5-bit codes: one sign bit and a
    4-bit exponent field whose 16th value is reserved for zero.
    channel_scale: per-output-channel power-of-two scale 2^c_o so large trained weights are not clipped.
    fixed_point_bits: 0 = float activations; F > 0 = activations rounded to multiples of 2^-F (16 -> 16.16 fixed
    point), with a straight-through gradient and no saturation.
    """

    exponent_min: int = -14
    exponent_max: int = 0
    channel_scale: bool = True
    fixed_point_bits: int = 0

    def __post_init__(self) -> None:
        if self.exponent_min > self.exponent_max:
            raise ValueError(f"ShiftSpec: exponent_min ({self.exponent_min}) must be <= exponent_max "
                             f"({self.exponent_max})")
        if self.code_bits > _MAX_CODE_BITS:
            raise ValueError(f"ShiftSpec: exponent range [{self.exponent_min}, {self.exponent_max}] has "
                             f"{self.num_exponents} exponents and needs {self.code_bits}-bit codes "
                             f"(sign + exponent field + zero code); at most {_MAX_CODE_BITS} bits are supported")
        if self.fixed_point_bits < 0:
            raise ValueError(f"ShiftSpec: fixed_point_bits must be >= 0, got {self.fixed_point_bits}")

    @property
    def num_exponents(self) -> int:
        return self.exponent_max - self.exponent_min + 1

    @property
    def code_bits(self) -> int:
        """1 sign bit + ceil(log2(num_exponents + 1)) exponent bits (the extra value encodes zero)."""
        # For n >= 1, ceil(log2(n + 1)) == n.bit_length(), exactly and without floating point.
        return 1 + self.num_exponents.bit_length()

    @property
    def zero_field(self) -> int:
        """The all-ones low field, reserved for weight 0."""
        return (1 << (self.code_bits - 1)) - 1


def _straight_through(forward_value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """forward_value in the forward pass, identity gradient into source.

    Written as value + (source - source) rather than source + (value - source) so the forward result is bitwise
    equal to forward_value (source - source is exactly +0, which also turns -0.0 into +0.0).
    """
    return forward_value.detach() + (source - source.detach())


def _fixed_point(x: torch.Tensor, fraction_bits: int) -> torch.Tensor:
    """round(x * 2^F) / 2^F with a straight-through gradient; half-precision inputs are rounded in fp32."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    scale = float(2 ** fraction_bits)
    rounded = torch.round(work.detach() * scale) / scale
    return _straight_through(rounded, work).to(x.dtype)


def _ceil_log2(magnitude: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(m)) for m > 0 via frexp (m = f * 2^e, f in [0.5, 1)); int32, same shape."""
    mantissa, exponent = torch.frexp(magnitude)
    return torch.where(mantissa == 0.5, exponent - 1, exponent).to(torch.int32)


class ShiftLinear(nn.Module):
    """y = x W^T + b with W[o, i] = s[o,i] * 2^(p[o,i] + c[o]), s in {-1, 0, +1}.

    Trainable DeepShift-PS parameters, both float [out, in]: `sign_param` (forward: clamp(round(.), -1, 1)) and
    `exponent_param` (forward: clamp(round(.), exponent_min, exponent_max)); both use a straight-through
    estimator whose gradient is the identity everywhere, including outside the clamp range. `bias` [out] or None.
    Buffer `channel_exponent` int32 [out] holds c (zeros when channel_scale=False).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, spec: ShiftSpec = ShiftSpec(),
                 *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        factory = {"device": device, "dtype": dtype}
        self.sign_param = nn.Parameter(torch.zeros(out_features, in_features, **factory))
        self.exponent_param = nn.Parameter(torch.full((out_features, in_features), float(spec.exponent_min),
                                                      **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.register_buffer("channel_exponent", torch.zeros(out_features, dtype=torch.int32, device=device))
        self._initialize_like_linear()

    def _initialize_like_linear(self) -> None:
        """Start from nn.Linear's default init, rounded to shifts (a trainable starting point)."""
        dense = torch.empty_like(self.sign_param)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        self._load_dense_weight(dense)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    @torch.no_grad()
    def _load_dense_weight(self, weight: torch.Tensor) -> None:
        """Set sign_param / exponent_param / channel_exponent from a dense weight [out, in] (module docstring rules)."""
        spec = self.spec
        magnitude = weight.detach().abs().to(torch.float64)
        if spec.channel_scale and magnitude.numel() > 0:
            row_max = magnitude.amax(dim=1)
            channel = torch.where(row_max > 0, _ceil_log2(row_max) - spec.exponent_max, 0).to(torch.int32)
        else:
            channel = torch.zeros(self.out_features, dtype=torch.int32, device=weight.device)
        # log2(|w| / 2^c) kept as a float; -inf for zero weights.
        log_magnitude = torch.log2(magnitude) - channel.to(torch.float64)[:, None]
        rounded = torch.round(log_magnitude)
        survives = (magnitude > 0) & (rounded >= spec.exponent_min)
        sign = torch.where(survives, torch.sign(weight.detach()).to(torch.float64), 0.0)
        # Clamping before the forward's rounding gives the same rounded exponent (integer bounds), and keeps
        # zero / tiny weights at a finite, trainable value.
        exponent = torch.where(survives, log_magnitude.clamp(spec.exponent_min, spec.exponent_max),
                               float(spec.exponent_min))
        self.sign_param.copy_(sign.to(self.sign_param.dtype))
        self.exponent_param.copy_(exponent.to(self.exponent_param.dtype))
        self.channel_exponent.copy_(channel)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: ShiftSpec = ShiftSpec()) -> "ShiftLinear":
        """Round a (trained) nn.Linear to shifts; device and dtype follow linear.weight."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, spec=spec,
                     device=weight.device, dtype=weight.dtype)
        module._load_dense_weight(weight)
        if linear.bias is not None:
            with torch.no_grad():
                module.bias.copy_(linear.bias)
        return module

    def quantized_sign(self) -> torch.Tensor:
        """s in {-1, 0, +1}, fp32 [out, in], straight-through into sign_param."""
        source = self.sign_param.float()
        return _straight_through(torch.round(source).clamp(-1.0, 1.0), source)

    def quantized_exponent(self) -> torch.Tensor:
        """Integer-valued p in [exponent_min, exponent_max], fp32 [out, in], straight-through into exponent_param."""
        source = self.exponent_param.float()
        return _straight_through(torch.round(source).clamp(self.spec.exponent_min, self.spec.exponent_max), source)

    def effective_weight(self) -> torch.Tensor:
        """W [out, in] in fp32; every entry exactly 0 or +-2^k (exp2 of an integer-valued float is exact).

        Gradients (chain rule through the STEs): dL/dsign_param = dL/dW * 2^(p+c);
        dL/dexponent_param = dL/dW * W * ln 2.
        """
        total_exponent = self.quantized_exponent() + self.channel_exponent.to(torch.float32)[:, None]
        return self.quantized_sign() * torch.exp2(total_exponent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if self.spec.fixed_point_bits:
            x = _fixed_point(x, self.spec.fixed_point_bits)
        weight = self.effective_weight().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def export_codes(self) -> dict:
        """Packed weights for a kernel (layout in the module docstring); CPU tensors.

        Returns {"codes": uint8 [out, in], "channel_exponent": int32 [out], "bias": float32 [out] or None,
        "exponent_min", "exponent_max", "code_bits"} plus "channel_scale" and "fixed_point_bits" so that
        `from_codes` can rebuild the full spec.
        """
        spec = self.spec
        sign = self.quantized_sign().cpu()
        field = (self.quantized_exponent().cpu() - spec.exponent_min).to(torch.int32)
        field = torch.where(sign == 0, spec.zero_field, field)
        sign_bit = (sign < 0).to(torch.int32) << (spec.code_bits - 1)
        return {
            "codes": (sign_bit | field).to(torch.uint8),
            "channel_exponent": self.channel_exponent.detach().cpu().to(torch.int32).clone(),
            "bias": self.bias.detach().cpu().to(torch.float32).clone() if self.bias is not None else None,
            "exponent_min": spec.exponent_min,
            "exponent_max": spec.exponent_max,
            "code_bits": spec.code_bits,
            "channel_scale": spec.channel_scale,
            "fixed_point_bits": spec.fixed_point_bits,
        }

    @classmethod
    def from_codes(cls, codes: dict) -> "ShiftLinear":
        """Inverse of `export_codes` (fp32, CPU): the effective weight is reproduced bitwise."""
        spec = ShiftSpec(exponent_min=int(codes["exponent_min"]), exponent_max=int(codes["exponent_max"]),
                         channel_scale=bool(codes.get("channel_scale", True)),
                         fixed_point_bits=int(codes.get("fixed_point_bits", 0)))
        sign, field = _unpack_codes(codes, spec)
        out_features, in_features = sign.shape
        module = cls(in_features, out_features, bias=codes["bias"] is not None, spec=spec)
        with torch.no_grad():
            module.sign_param.copy_(sign.to(torch.float32))
            exponent = torch.where(sign == 0, 0, field) + spec.exponent_min
            module.exponent_param.copy_(exponent.to(torch.float32))
            module.channel_exponent.copy_(codes["channel_exponent"].to(torch.int32))
            if module.bias is not None:
                module.bias.copy_(codes["bias"].to(torch.float32))
        return module

    @torch.no_grad()
    def nonzero_weights(self) -> int:
        """Number of nonzero effective weights (one shift + one add each, per token)."""
        return int(torch.count_nonzero(self.effective_weight()))

    def extra_repr(self) -> str:
        spec = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"exponents=[{spec.exponent_min}, {spec.exponent_max}], code_bits={spec.code_bits}, "
                f"channel_scale={spec.channel_scale}, fixed_point_bits={spec.fixed_point_bits}")


def _unpack_codes(codes: dict, spec: ShiftSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate packed codes; return (sign int32 [out, in] in {-1, 0, 1}, exponent field int32 [out, in])."""
    if int(codes["code_bits"]) != spec.code_bits:
        raise ValueError(f"code_bits {codes['code_bits']} does not match exponent range "
                         f"[{spec.exponent_min}, {spec.exponent_max}] ({spec.code_bits} bits)")
    packed = codes["codes"]
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"codes must be a uint8 [out, in] tensor, got {packed.dtype} {tuple(packed.shape)}")
    packed = packed.to(torch.int32)
    if packed.numel() and int(packed.max()) >= (1 << spec.code_bits):
        raise ValueError(f"codes must be < 2**{spec.code_bits}")
    field = packed & spec.zero_field
    is_zero = field == spec.zero_field
    if bool((~is_zero & (field >= spec.num_exponents)).any()):
        raise ValueError(f"exponent field out of range [0, {spec.num_exponents - 1}] (zero code {spec.zero_field})")
    negative = (packed >> (spec.code_bits - 1)) & 1
    sign = torch.where(is_zero, 0, 1 - 2 * negative)
    return sign, field


def decode_shift_codes(codes: dict) -> torch.Tensor:
    """Reference decoder: the fp32 [out, in] weight a kernel must reproduce from `export_codes` output."""
    spec = ShiftSpec(exponent_min=int(codes["exponent_min"]), exponent_max=int(codes["exponent_max"]))
    sign, field = _unpack_codes(codes, spec)
    channel = codes["channel_exponent"].to(torch.int32)[:, None]
    magnitude = torch.exp2((field + spec.exponent_min + channel).to(torch.float32))
    return torch.where(sign == 0, torch.zeros((), dtype=torch.float32), sign.to(torch.float32) * magnitude)
