"""kernels/blend_head.py: the whole blend colour head per ray in one CPU kernel."""
import pytest
import torch
from torch import nn

from gnt_shiftadd.models.heads import BlendColorHead
from kernels.apply import KernelBlendHead, use_kernels_
from kernels.blend_head import BlendHeadWeights, blend_head, reference_blend_head
from kernels.dispatch import kernel_map, recording

pytest.importorskip("tvm")


def _head(dim: int, hidden: int = 32, seed: int = 0) -> BlendColorHead:
    """A blend head with non-trivial norm and biases (a fresh LayerNorm is the identity)."""
    torch.manual_seed(seed)
    head = BlendColorHead(dim, hidden).eval()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return head


def _inputs(rays, samples, views, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(rays, samples, views, 1, generator=g) < 0.7).float()
    mask[0] = 0  # a ray none of whose samples is seen: black
    if rays > 1:
        mask[1, : samples // 2] = 0  # some samples no view sees
    return (torch.randn(rays, samples, dim, generator=g) * 2, torch.randn(rays, samples, views, dim, generator=g),
            torch.rand(rays, samples, views, 3, generator=g), torch.randn(rays, samples, views, 4, generator=g) * 0.3,
            mask)


def _assert_kernel_matches(head, rays: int, samples: int, views: int, dim: int, reference_atol: float):
    """The reference from the kernel layout and the kernel (which must run) give the modules' colours; the first
    ray (its samples seen by no view) is black. Returns the kernel layout."""
    q, features, colors, ray_diff, mask = _inputs(rays, samples, views, dim)
    weights = BlendHeadWeights.from_modules(head.norm, head.view_fc1, head.view_fc2, head.sample_fc)
    with torch.no_grad():
        expected = head(q, features, colors, ray_diff, mask)
        torch.testing.assert_close(reference_blend_head(q, features, colors, ray_diff, mask[..., 0], weights),
                                   expected, rtol=1e-5, atol=reference_atol)
        with recording(record := {}):
            got = blend_head(q, features, colors, ray_diff, mask[..., 0], weights)
    assert record == {"blend_head": "tvm"}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], torch.zeros(3))
    return weights


@pytest.mark.parametrize("rays,samples,views,dim,hidden", [
    (37, 24, 6, 32, 32), (3, 5, 1, 16, 16), (17, 40, 10, 16, 48), (1, 1, 16, 32, 16),
])
def test_kernel_matches_the_model_head(rays, samples, views, dim, hidden):
    _assert_kernel_matches(_head(dim, hidden), rays, samples, views, dim, reference_atol=1e-6)


def test_the_leaf_covers_the_whole_head_on_cpu():
    head = _head(32)
    inputs = _inputs(9, 24, 6, 32)
    with torch.no_grad():
        expected = head(*inputs)
        summary = use_kernels_(head)
        assert summary.get("KernelBlendHead") == 1 and "KernelViewColorBlend" not in summary  # covered
        assert isinstance(head.ray_blend, KernelBlendHead)
        got = head(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert kernel_map(head) == {"ray_blend": {"blend_head": "tvm"}}
    assert set(head.state_dict()) == set(_head(32).state_dict())  # the leaf has no parameters of its own


def test_gradients_take_the_reference():
    head = _head(16, 16)
    q, features, colors, ray_diff, mask = _inputs(4, 6, 3, 16)
    weights = BlendHeadWeights.from_modules(head.norm, head.view_fc1, head.view_fc2, head.sample_fc)
    q.requires_grad_(True)
    with recording(record := {}):
        out = blend_head(q, features, colors, ray_diff, mask[..., 0], weights)
    assert record == {"blend_head": "reference"}
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_layers_and_shapes_the_kernel_does_not_take_are_named(monkeypatch):
    monkeypatch.setattr("kernels.dispatch._WARNED", set())  # its one warning, without silencing other tests' own
    head = _head(24, 32)
    with pytest.raises(ValueError, match="multiples of 16"):
        BlendHeadWeights.from_modules(head.norm, head.view_fc1, head.view_fc2, head.sample_fc)
    head = _head(16, 16)
    with pytest.raises(TypeError, match="affine nn.LayerNorm"):
        BlendHeadWeights.from_modules(nn.LayerNorm(16, elementwise_affine=False), head.view_fc1, head.view_fc2,
                                      head.sample_fc)
    with pytest.warns(RuntimeWarning, match="fc1 must be a plain nn.Linear"):  # neither kernel takes it
        head.view_fc1 = nn.Sequential(head.view_fc1)
        summary = use_kernels_(head)
    assert "KernelBlendHead" not in summary and "view_blend" in summary["skipped"]
    weights = BlendHeadWeights.from_modules(_head(16, 16).norm, *[getattr(_head(16, 16), n) for n in
                                                                  ("view_fc1", "view_fc2", "sample_fc")])
    q, features, colors, ray_diff, mask = _inputs(2, 3, 4, 16)
    with pytest.raises(ValueError, match=r"blend_head: colors must be \[2, 3, 4, 3\]"):
        blend_head(q, features, colors[..., :2], ray_diff, mask[..., 0], weights)
    with pytest.raises(ValueError, match=r"blend_head: q must be \[rays, samples, C=16\]"):
        blend_head(q[..., :8], features, colors, ray_diff, mask[..., 0], weights)


def test_more_views_than_one_register_falls_back_with_one_warning(monkeypatch):
    """The kernel keeps a token's view logits in one 16-lane register: with 17 views it is not built, and the
    reference runs after one warning that names why."""
    monkeypatch.setattr("kernels.dispatch._WARNED", set())
    head = _head(16, 16)
    q, features, colors, ray_diff, mask = _inputs(3, 4, 17, 16)
    weights = BlendHeadWeights.from_modules(head.norm, head.view_fc1, head.view_fc2, head.sample_fc)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"1\.\.16 views"):
        got = blend_head(q, features, colors, ray_diff, mask[..., 0], weights)
        expected = head(q, features, colors, ray_diff, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _integer_head(dim: int, hidden: int = 32, seed: int = 0, act_scale: str = "per_tensor") -> BlendColorHead:
    """_head with shiftadd.head: shift and 8-bit activations: view_fc1 a BlockShiftLinear whose feature block is an
    IntShiftLinear, calibrated per tensor on random features (the conversion's own calibration)."""
    from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear
    from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear
    from gnt_shiftadd.shiftadd.reparameterize import calibrate_int_shift_linears
    from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec

    head = _head(dim, hidden, seed)
    fc1 = BlockShiftLinear.from_linear(head.view_fc1, dim, ShiftSpec(exponent_min=-6))
    fc1.first = IntShiftLinear.from_shift_linear(fc1.first, 8, act_scale).eval()
    head.view_fc1 = fc1.eval()
    if act_scale == "per_tensor":
        calibration = _inputs(8, 24, 6, dim, seed=7)
        calibrate_int_shift_linears(head, lambda: head(*calibration))
    return head


@pytest.mark.parametrize("rays,samples,views", [(37, 24, 6), (3, 5, 1), (5, 9, 16)])
def test_integer_feature_block_matches_the_model_head(rays, samples, views):
    """shiftadd.head: shift: the kernel quantizes each view's features with the calibrated scale and runs the
    feature block on VNNI; the head's colour matches the modules (the integer layer is exact; the fp32 parts round
    in their own order). The reference from the kernel layout is the modules' to fp32 noise."""
    from kernels.int_shift import vnni_available

    if not vnni_available():
        pytest.skip("AVX-512 VNNI CPU needed")
    weights = _assert_kernel_matches(_integer_head(32), rays, samples, views, 32, reference_atol=1e-5)
    assert weights.features_int is not None and not weights.features_int.per_token


def test_integer_head_leaf_and_refusals():
    """The leaf covers the integer head (its feature block is not swapped on its own) through the custom op; a
    feature block with per-token scales is refused with the reason, and the head keeps its other kernels."""
    from kernels.int_shift import vnni_available

    if not vnni_available():
        pytest.skip("AVX-512 VNNI CPU needed")
    head = _integer_head(32)
    inputs = _inputs(9, 24, 6, 32)
    with torch.no_grad():
        expected = head(*inputs)
        summary = use_kernels_(head)
        assert summary.get("KernelBlendHead") == 1 and "KernelIntShiftLinear" not in summary
        got = head(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert kernel_map(head) == {"ray_blend": {"blend_head": "tvm"}}
    per_token = _integer_head(32, act_scale="per_token")
    with pytest.raises(ValueError, match="per-tensor"):
        BlendHeadWeights.from_modules(per_token.norm, per_token.view_fc1, per_token.view_fc2, per_token.sample_fc)
