"""kernels/int_position_fusion.py: variant n's position fusion (integer query, waves and fc2 layers) in one VNNI
kernel, against its reference and the model's PositionFusion leaf."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.models.encodings import PositionalEncoding
from gnt_shiftadd.models.gnt import PositionFusion
from gnt_shiftadd.shiftadd.int_shift import integer_fusion_mlp
from gnt_shiftadd.shiftadd.reparameterize import calibrate_int_shift_linears
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec
from kernels.dispatch import recording
from kernels.int_position_fusion import IntPositionFusionWeights, int_position_fusion, \
    reference_int_position_fusion, wave_order
from kernels.int_shift import vnni_available

needs_vnni = pytest.mark.skipif(not vnni_available(), reason="the integer kernel needs AVX-512 VNNI")


def _integer_mlp(channels: int, freqs: int, dir_freqs: int = 4, seed: int = 0, act_scale: str = "per_tensor"):
    """A fusion MLP converted as shiftadd.position_fusion: shift with 8-bit activations, calibrated on random
    queries and points; with its encodings."""
    torch.manual_seed(seed)
    code, directions = PositionalEncoding(3, freqs), PositionalEncoding(3, dir_freqs)
    dense = nn.Sequential(nn.Linear(channels + code.out_dim + directions.out_dim, channels), nn.ReLU(),
                          nn.Linear(channels, channels)).eval()
    mlp = integer_fusion_mlp(dense, channels, channels + 3, 6 * freqs, act_scale=act_scale)
    if act_scale == "per_tensor":
        q, points, dir_code = _inputs(16, 24, channels, directions)
        calibrate_int_shift_linears(mlp, lambda: PositionFusion()(q, points, dir_code, mlp, code, {}))
    return mlp, code, directions


def _inputs(rays, samples, channels, directions, scale=2.0):
    q, points = torch.randn(rays, samples, channels), torch.randn(rays, samples, 3) * scale
    return q, points, directions(F.normalize(torch.randn(rays, 3), dim=-1))


def test_the_wave_slots_are_the_model_code_without_its_coordinates():
    """Slot j < 3F holds sin(2^(j//3) x_(j%3)), slot 32 + j its cosine; the rest are unused (-1)."""
    encoding, freqs = PositionalEncoding(3, 5), 5
    points = torch.randn(4, 7, 3)
    waves = encoding(points)[..., 3:]
    order = wave_order(freqs)
    assert len(order) == 64 and sorted(i for i in order if i >= 0) == list(range(30))
    for j in range(15):
        k, d = divmod(j, 3)
        torch.testing.assert_close(waves[..., order[j]], torch.sin(points[..., d] * 2.0 ** k))
        torch.testing.assert_close(waves[..., order[32 + j]], torch.cos(points[..., d] * 2.0 ** k))
    assert order[15:32] == [-1] * 17 and order[47:] == [-1] * 17


def test_the_reference_is_the_model_leaf():
    """The reference (kernel layout, the kernel's order of sums) gives the model's PositionFusion output."""
    mlp, code, directions = _integer_mlp(32, 10)
    q, points, dir_code = _inputs(6, 24, 32, directions)
    weights = IntPositionFusionWeights.from_mlp(mlp, 32, 10)
    with torch.no_grad():
        expected = PositionFusion()(q, points, dir_code, mlp, code, {})
        torch.testing.assert_close(reference_int_position_fusion(q, points, dir_code, weights), expected,
                                   rtol=1e-5, atol=1e-5)


@needs_vnni
@pytest.mark.parametrize("rays,samples,channels,freqs", [(33, 24, 32, 10), (3, 5, 16, 4), (1, 7, 32, 10),
                                                        (3, 1, 16, 4), (5, 2, 32, 10)])
def test_the_kernel_is_bit_exact_given_the_same_waves(rays, samples, channels, freqs):
    """Points at 0 give exact waves (sin 0, cos 0) on both sides: every integer layer must then match bit for bit,
    for whole and padded tiles of samples (and per-ray direction terms with several rays per tile, also where the
    padding rows of a short ray count fall several rays past the last)."""
    pytest.importorskip("tvm")
    mlp, _, directions = _integer_mlp(channels, freqs, seed=rays)
    q, points, dir_code = _inputs(rays, samples, channels, directions)
    points = torch.zeros_like(points)
    weights = IntPositionFusionWeights.from_mlp(mlp, channels, freqs)
    record = {}
    with recording(record), torch.no_grad():
        got = int_position_fusion(q, points, dir_code, weights)
    assert record == {"int_position_fusion": "tvm"}
    assert torch.equal(got, reference_int_position_fusion(q, points, dir_code, weights))


@needs_vnni
def test_the_kernel_matches_the_model_on_real_waves():
    """With sines and cosines of far points (thousands of radians) the kernel's polynomials may put a wave one
    fixed-point step from torch's; the outputs stay within a few such steps of the model's."""
    pytest.importorskip("tvm")
    mlp, code, directions = _integer_mlp(32, 10)
    q, points, dir_code = _inputs(40, 24, 32, directions, scale=12.0)
    weights = IntPositionFusionWeights.from_mlp(mlp, 32, 10)
    with torch.no_grad():
        got = int_position_fusion(q, points, dir_code, weights)
        expected = PositionFusion()(q, points, dir_code, mlp, code, {})
    assert (got == expected).float().mean() > 0.99
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05 * expected.abs().max().item())


def test_weights_survive_the_custom_op_layout():
    mlp, _, _ = _integer_mlp(32, 10)
    weights = IntPositionFusionWeights.from_mlp(mlp, 32, 10)
    again = IntPositionFusionWeights.from_tensors(weights.tensors(), 10)
    assert all(a is b for a, b in zip(weights.tensors(), again.tensors()))
    assert (again.channels, again.hidden, again.waves.in_features) == (32, 32, 64)


def test_layers_the_kernel_does_not_compute_are_refused_with_the_reason():
    mlp, _, _ = _integer_mlp(32, 10, act_scale="per_token")
    with pytest.raises(ValueError, match="calibrated per-tensor"):
        IntPositionFusionWeights.from_mlp(mlp, 32, 10)
    mlp, _, _ = _integer_mlp(32, 10)
    with pytest.raises(ValueError, match="16-wide query and the 60 sines"):
        IntPositionFusionWeights.from_mlp(mlp, 16, 10)
    with pytest.raises(TypeError, match="BlockShiftLinear, ReLU, IntShiftLinear"):
        IntPositionFusionWeights.from_mlp(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), 4, 1)
    mlp[2] = ShiftLinear.from_linear(nn.Linear(32, 32), ShiftSpec(exponent_min=-6))
    with pytest.raises(ValueError, match="fc2 is not an 8-bit IntShiftLinear"):
        IntPositionFusionWeights.from_mlp(mlp, 32, 10)


def test_bad_inputs_are_named():
    mlp, _, directions = _integer_mlp(16, 4)
    q, points, dir_code = _inputs(3, 5, 16, directions)
    weights = IntPositionFusionWeights.from_mlp(mlp, 16, 4)
    with pytest.raises(ValueError, match=r"points must be \[3, 5, 3\]"):
        int_position_fusion(q, points[:, :4], dir_code, weights)
    with pytest.raises(ValueError, match=r"q must be \[rays, samples, C=16\]"):
        int_position_fusion(q[..., :8], points, dir_code, weights)
    with pytest.raises(ValueError, match=r"dir_code must be \[3, 27\]"):
        int_position_fusion(q, points, dir_code[:, :5], weights)
    with pytest.raises(ValueError, match="runs on CPU"):
        int_position_fusion(q.to("meta"), points.to("meta"), dir_code.to("meta"), weights)
