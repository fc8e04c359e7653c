"""kernels/position_fusion.py: the points' encoding and GNT's fusion MLP in one CPU kernel, against the model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.models.encodings import PositionalEncoding
from gnt_shiftadd.models.gnt import PositionFusion
from kernels.dispatch import recording
from kernels.position_fusion import PositionFusionWeights, encoding_order, position_fusion, \
    reference_position_fusion


def _mlp(channels: int, freqs: int, dir_freqs: int = 4) -> nn.Sequential:
    inputs = channels + 3 * (1 + 2 * freqs) + 3 * (1 + 2 * dir_freqs)
    return nn.Sequential(nn.Linear(inputs, channels), nn.ReLU(), nn.Linear(channels, channels)).eval()


def _case(rays, samples, channels, freqs, scale=3.0):
    torch.manual_seed(rays * 31 + samples)
    encoding, directions = PositionalEncoding(3, freqs), PositionalEncoding(3, 4)
    mlp = _mlp(channels, freqs)
    q, points = torch.randn(rays, samples, channels), torch.randn(rays, samples, 3) * scale
    dir_code = directions(F.normalize(torch.randn(rays, 3), dim=-1))
    with torch.no_grad():
        expected = PositionFusion()(q, points, dir_code, mlp, encoding, {})
    return q, points, dir_code, mlp, expected


def test_the_kernel_code_order_is_a_permutation_of_the_model_encoding():
    encoding = PositionalEncoding(3, 5)
    points = torch.randn(4, 7, 3)
    order = encoding_order(5)
    assert sorted(order) == list(range(encoding.out_dim))
    code = encoding(points)[..., order]
    torch.testing.assert_close(code[..., :3], points)
    torch.testing.assert_close(code[..., 3:18], torch.sin(points[..., None, :] * 2.0 ** torch.arange(5.0)[:, None]).flatten(-2))


@pytest.mark.parametrize("rays,samples,channels,freqs", [(33, 24, 32, 10), (1, 7, 16, 4), (5, 24, 32, 10)])
def test_kernel_matches_the_model_position_fusion(rays, samples, channels, freqs):
    pytest.importorskip("tvm")
    q, points, dir_code, mlp, expected = _case(rays, samples, channels, freqs)
    weights = PositionFusionWeights.from_mlp(mlp, channels, freqs)
    record = {}
    with recording(record), torch.no_grad():
        got = position_fusion(q, points, dir_code, weights)
    assert record == {"position_fusion": "tvm"}
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reference_position_fusion(q, points, dir_code, weights), expected, rtol=1e-5, atol=1e-5)


def test_sines_and_cosines_hold_for_large_arguments():
    """Far scene points: 2^9 x reaches thousands of radians, where the argument reduction must stay exact."""
    pytest.importorskip("tvm")
    q, points, dir_code, mlp, expected = _case(8, 24, 32, 10, scale=12.0)
    with torch.no_grad():
        got = position_fusion(q, points, dir_code, PositionFusionWeights.from_mlp(mlp, 32, 10))
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


def test_gradients_run_the_reference_and_say_so():
    q, points, dir_code, mlp, expected = _case(3, 5, 16, 4)
    weights = PositionFusionWeights.from_mlp(mlp, 16, 4)
    record = {}
    with recording(record):
        got = position_fusion(q.requires_grad_(), points, dir_code, weights)
    assert record == {"position_fusion": "reference"} and got.requires_grad
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_and_layers_are_named():
    q, points, dir_code, mlp, _ = _case(3, 5, 16, 4)
    weights = PositionFusionWeights.from_mlp(mlp, 16, 4)
    with pytest.raises(ValueError, match=r"points must be \[3, 5, 3\]"):
        position_fusion(q, points[:, :4], dir_code, weights)
    with pytest.raises(ValueError, match=r"q must be \[rays, samples, C=16\]"):
        position_fusion(q[..., :8], points, dir_code, weights)
    with pytest.raises(ValueError, match=r"dir_code must be \[3, 27\]"):
        position_fusion(q, points, dir_code[:, :5], weights)
    with pytest.raises(TypeError, match="Linear, ReLU, Linear"):
        PositionFusionWeights.from_mlp(nn.Sequential(mlp[0], nn.GELU(), mlp[2]), 16, 4)
    with pytest.raises(ValueError, match="do not fuse 16 channels with a 63-wide point code"):
        PositionFusionWeights.from_mlp(mlp, 16, 10)


def test_the_kernel_has_a_cpu_schedule_only():
    pytest.importorskip("tvm")
    from kernels.build import cuda_target
    from kernels.position_fusion import make_position_fusion

    with pytest.raises(ValueError, match="CPU"):
        make_position_fusion(cuda_target("sm_90"), 24, 32, 32, 10)
