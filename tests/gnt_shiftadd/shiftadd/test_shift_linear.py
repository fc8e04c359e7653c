"""ShiftLinear: power-of-two weights, log-domain rounding, STE gradients, packed codes and serialization."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec, decode_shift_codes


def _linear_with(weight: list[list[float]] | torch.Tensor, bias: bool = True) -> nn.Linear:
    weight = torch.as_tensor(weight, dtype=torch.float32)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of an fp32 tensor, so that equality is bitwise (-0.0 != +0.0, NaN == NaN)."""
    return t.detach().contiguous().view(torch.int32)


def _log_uniform_weight(out_features: int, in_features: int, low: float, high: float, seed: int) -> torch.Tensor:
    """Random signs, magnitudes 2^U(low, high), so no weight falls near zero."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.exp2(low + (high - low) * torch.rand(out_features, in_features, generator=gen))
    sign = torch.where(torch.rand(out_features, in_features, generator=gen) < 0.5, -1.0, 1.0)
    return sign * magnitude


def test_effective_weights_are_signed_powers_of_two_within_range():
    torch.manual_seed(0)
    weight = torch.randn(9, 13) * torch.exp2(torch.randint(-6, 5, (9, 1)).float())
    weight[2] = 0.0  # all-zero row
    weight[3, :5] = 1e-9  # tiny weights -> zero
    spec = ShiftSpec()
    shift = ShiftLinear.from_linear(_linear_with(weight), spec)
    w_eff = shift.effective_weight()
    assert w_eff.dtype == torch.float32 and w_eff.shape == (9, 13)

    nonzero = w_eff != 0
    mantissa, exponent = torch.frexp(w_eff[nonzero])
    assert torch.all(mantissa.abs() == 0.5)  # exactly +-2^k
    power = (exponent - 1)  # w = +-2^(exponent - 1)
    channel = shift.channel_exponent[:, None].expand_as(w_eff)[nonzero]
    assert torch.all(power >= spec.exponent_min + channel)
    assert torch.all(power <= spec.exponent_max + channel)
    assert not nonzero[2].any() and not nonzero[3, :5].any()
    assert shift.channel_exponent[2] == 0
    # The largest weight of each nonzero row lands on the top exponent (max|w| is rounded up by ceil, not clipped).
    row_max = weight.abs().amax(dim=1)
    expected_channel = torch.where(row_max > 0, torch.ceil(torch.log2(row_max.double())), 0.0) - spec.exponent_max
    assert torch.equal(shift.channel_exponent, expected_channel.to(torch.int32))
    assert shift.nonzero_weights() == int(nonzero.sum())


def test_from_linear_rounds_log2_of_hand_picked_weights():
    tiny_below = 2.0 ** -14.6  # rounds to exponent -15 < exponent_min -> 0
    tiny_above = 2.0 ** -14.4  # rounds to exponent -14 -> kept
    weight = [[0.3, -0.7, 0.75, 1e-6, 0.0, 1.0, 2.0 ** -14, tiny_below, -tiny_above, 5.0]]
    expected = [[0.25, -0.5, 1.0, 0.0, 0.0, 1.0, 2.0 ** -14, 0.0, -(2.0 ** -14), 1.0]]  # 5.0 clipped: no channel scale
    shift = ShiftLinear.from_linear(_linear_with(weight), ShiftSpec(channel_scale=False))
    assert torch.equal(_bits(shift.effective_weight()), _bits(torch.tensor(expected)))
    assert torch.equal(shift.channel_exponent, torch.zeros(1, dtype=torch.int32))
    assert shift.nonzero_weights() == 7


def test_channel_scale_keeps_weights_above_one():
    weight = [[3.0, 0.3], [-6.0, 0.01], [2.0, -0.5]]
    scaled = ShiftLinear.from_linear(_linear_with(weight), ShiftSpec(channel_scale=True))
    assert scaled.channel_exponent.tolist() == [2, 3, 1]  # ceil(log2 3) = 2, ceil(log2 6) = 3, ceil(log2 2) = 1
    assert scaled.effective_weight().tolist() == [[4.0, 0.25], [-8.0, 2.0 ** -7], [2.0, -0.5]]  # 0.01 -> 2^-7
    clipped = ShiftLinear.from_linear(_linear_with(weight), ShiftSpec(channel_scale=False))
    assert clipped.effective_weight().tolist() == [[1.0, 0.25], [-1.0, 2.0 ** -7], [1.0, -0.5]]


def test_wide_range_conversion_matches_original_linear():
    weight = _log_uniform_weight(24, 40, low=-12.0, high=3.0, seed=1)
    linear = _linear_with(weight)
    shift = ShiftLinear.from_linear(linear, ShiftSpec(exponent_min=-30, exponent_max=0, channel_scale=True))
    w_eff = shift.effective_weight()

    # Independent reference: sign(w) * 2^round(log2|w|), in float64.
    reference = torch.sign(weight.double()) * torch.exp2(torch.round(torch.log2(weight.double().abs())))
    assert torch.equal(w_eff.double(), reference)
    relative_error = (w_eff.double() / weight.double() - 1.0).abs()
    assert relative_error.max() <= 2.0 ** 0.5 - 1.0 + 1e-12
    assert relative_error.max() > 0.2  # the bound is nearly reached: rounding really happens

    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(2))
    y_dense, y_shift = linear(x), shift(x)
    bound = (x.abs() @ weight.abs().T) * (2.0 ** 0.5 - 1.0) + 1e-4  # triangle inequality on per-weight errors
    assert torch.all((y_shift - y_dense).abs() <= bound)
    assert torch.allclose(y_shift, F.linear(x, w_eff, linear.bias), atol=1e-6, rtol=1e-6)
    cosine = F.cosine_similarity(y_shift.flatten(), y_dense.flatten(), dim=0)
    assert cosine > 0.95


def test_ste_gradients_follow_the_documented_chain_rule():
    spec = ShiftSpec(exponent_min=-4, exponent_max=0, channel_scale=True)
    shift = ShiftLinear(3, 2, bias=True, spec=spec)
    with torch.no_grad():
        # 1e8: the STE must give exactly 1 (1e8 + (1 - 1e8) would give 0 in fp32).
        shift.sign_param.copy_(torch.tensor([[0.7, -1.3, 0.2], [-0.6, 2.5, 1e8]]))
        shift.exponent_param.copy_(torch.tensor([[-1.4, 0.3, -2.0], [-20.0, -2.6, 3.0]]))
        shift.channel_exponent.copy_(torch.tensor([1, -2], dtype=torch.int32))
        shift.bias.copy_(torch.tensor([0.5, -0.25]))

    # Hand-computed forward: sign in {-1,0,1}, exponent rounded then clamped to [-4, 0], plus c.
    sign = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0]])
    power = torch.tensor([[-1.0, 0.0, -2.0], [-4.0, -3.0, 0.0]]) + torch.tensor([[1.0], [-2.0]])
    expected_weight = sign * 2.0 ** power
    assert torch.equal(shift.effective_weight(), expected_weight)

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    upstream = torch.randn(5, 2, generator=torch.Generator().manual_seed(4))
    (shift(x) * upstream).sum().backward()

    grad_weight = upstream.T @ x  # dL/dW for y = x W^T + b
    assert torch.allclose(shift.sign_param.grad, grad_weight * 2.0 ** power, rtol=1e-6, atol=1e-7)
    assert torch.allclose(shift.exponent_param.grad, grad_weight * expected_weight * math.log(2.0),
                          rtol=1e-6, atol=1e-7)
    assert torch.allclose(shift.bias.grad, upstream.sum(dim=0))


def test_codes_layout_by_hand():
    weight = [[-0.25, 0.0, 1.0, 2.0 ** -14, -(2.0 ** -14)]]
    shift = ShiftLinear.from_linear(_linear_with(weight, bias=False), ShiftSpec(channel_scale=False))
    exported = shift.export_codes()
    # 5 bits: sign bit 16; field = p + 14; 15 = zero.
    assert exported["codes"].tolist() == [[16 + 12, 15, 14, 0, 16 + 0]]
    assert exported["codes"].dtype == torch.uint8
    assert exported["bias"] is None
    assert (exported["exponent_min"], exported["exponent_max"], exported["code_bits"]) == (-14, 0, 5)


@pytest.mark.parametrize("spec", [ShiftSpec(), ShiftSpec(exponent_min=-3, exponent_max=2, channel_scale=False),
                                  ShiftSpec(exponent_min=-126, exponent_max=0),
                                  ShiftSpec(exponent_min=1, exponent_max=1)])
@pytest.mark.parametrize("bias", [True, False])
def test_export_codes_round_trip_is_bitwise(spec: ShiftSpec, bias: bool):
    weight = _log_uniform_weight(6, 11, low=-20.0, high=2.0, seed=5)
    weight[0, :4] = 0.0
    weight[1] = 0.0
    shift = ShiftLinear.from_linear(_linear_with(weight, bias=bias), spec)
    with torch.no_grad():  # a "trained" state: signs that round to 0 from either side, exponents off range
        shift.sign_param[2, :3] = torch.tensor([-0.3, 0.4, -1.7])
        shift.exponent_param[3, :2] = torch.tensor([-500.0, 500.0])
    w_eff = shift.effective_weight()
    assert (w_eff < 0).any() and (w_eff == 0).any()

    exported = shift.export_codes()
    codes = exported["codes"]
    assert codes.dtype == torch.uint8 and codes.shape == (6, 11)
    assert int(codes.max()) < 2 ** spec.code_bits
    assert exported["channel_exponent"].dtype == torch.int32
    assert (exported["bias"] is None) == (not bias)

    decoded = decode_shift_codes(exported)
    assert decoded.dtype == torch.float32
    assert torch.equal(_bits(decoded), _bits(w_eff))
    rebuilt = ShiftLinear.from_codes(exported)
    assert rebuilt.spec == spec
    assert torch.equal(_bits(rebuilt.effective_weight()), _bits(w_eff))
    assert torch.equal(_bits(decode_shift_codes(rebuilt.export_codes())), _bits(w_eff))
    x = torch.randn(4, 11)
    assert torch.equal(_bits(rebuilt(x)), _bits(shift(x)))
    assert rebuilt.nonzero_weights() == shift.nonzero_weights()


def test_decode_rejects_invalid_codes():
    exported = ShiftLinear.from_linear(nn.Linear(3, 2), ShiftSpec(exponent_min=-3, exponent_max=2)).export_codes()
    # Field 6 is neither an exponent (0..5) nor the zero code (7).
    bad = dict(exported, codes=torch.full((2, 3), 6, dtype=torch.uint8))
    with pytest.raises(ValueError):
        decode_shift_codes(bad)
    with pytest.raises(ValueError):
        decode_shift_codes(dict(exported, code_bits=5))


def test_state_dict_round_trip_reproduces_outputs_bitwise():
    torch.manual_seed(6)
    shift = ShiftLinear.from_linear(nn.Linear(10, 7), ShiftSpec(fixed_point_bits=16))
    buffer = io.BytesIO()
    torch.save(shift.state_dict(), buffer)
    buffer.seek(0)
    restored = ShiftLinear(10, 7, spec=ShiftSpec(fixed_point_bits=16))
    restored.load_state_dict(torch.load(buffer))
    assert set(shift.state_dict()) == {"sign_param", "exponent_param", "bias", "channel_exponent"}
    assert restored.channel_exponent.dtype == torch.int32
    x = torch.randn(3, 5, 10)
    assert torch.equal(_bits(restored(x)), _bits(shift(x)))


def test_fixed_point_activations_are_multiples_of_two_to_minus_16():
    identity = ShiftLinear.from_linear(_linear_with([[1.0]], bias=False), ShiftSpec(fixed_point_bits=16))
    assert identity.effective_weight().item() == 1.0
    x = (torch.randn(200, 1, generator=torch.Generator().manual_seed(7)) * 3).requires_grad_()
    y = identity(x)
    scaled = y.detach().double() * 2 ** 16
    assert torch.equal(scaled, torch.round(scaled))
    assert torch.equal(y.detach().double(), torch.round(x.detach().double() * 2 ** 16) / 2 ** 16)
    assert (y - x).abs().max() <= 2.0 ** -17
    assert (y != x).any()
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through

    float_layer = ShiftLinear.from_linear(_linear_with([[1.0]], bias=False), ShiftSpec(fixed_point_bits=0))
    assert torch.equal(float_layer(x.detach()), x.detach())


def test_spec_validation_and_code_bits():
    assert ShiftSpec().code_bits == 5
    assert ShiftSpec(exponent_min=0, exponent_max=0).code_bits == 2  # 1 exponent + zero -> 1 field bit
    assert ShiftSpec(exponent_min=-3, exponent_max=2).code_bits == 4  # 6 exponents + zero -> 3 field bits
    assert ShiftSpec(exponent_min=-15, exponent_max=0).code_bits == 6  # 16 exponents + zero -> 5 field bits
    assert ShiftSpec(exponent_min=-126, exponent_max=0).code_bits == 8
    with pytest.raises(ValueError, match="exponent_min"):
        ShiftSpec(exponent_min=1, exponent_max=0)
    with pytest.raises(ValueError, match="8 bits"):
        ShiftSpec(exponent_min=-127, exponent_max=0)
    with pytest.raises(ValueError, match="8 bits"):
        ShiftSpec(exponent_min=-200, exponent_max=0)


@pytest.mark.parametrize("in_features,out_features,shape", [(1, 7, (2, 3, 1)), (5, 1, (4, 5)), (3, 2, (3,))])
def test_odd_shapes(in_features: int, out_features: int, shape: tuple[int, ...]):
    torch.manual_seed(8)
    shift = ShiftLinear.from_linear(nn.Linear(in_features, out_features))
    x = torch.randn(*shape)
    y = shift(x)
    assert y.shape == (*shape[:-1], out_features)
    w_eff = shift.effective_weight()
    expected = (x.unsqueeze(-2) * w_eff).sum(-1) + shift.bias
    assert torch.allclose(y, expected, atol=1e-6)


def test_dtype_follows_linear_and_repr():
    linear = nn.Linear(4, 3).double()
    shift = ShiftLinear.from_linear(linear)
    assert shift.sign_param.dtype == torch.float64 and shift.bias.dtype == torch.float64
    assert shift.effective_weight().dtype == torch.float32
    x = torch.randn(2, 4, dtype=torch.float64)
    y = shift(x)
    assert y.dtype == torch.float64
    assert torch.equal(y, F.linear(x, shift.effective_weight().double(), linear.bias))
    text = repr(shift)
    assert "in_features=4" in text and "code_bits=5" in text and "exponents=[-14, 0]" in text
