"""The fused projection + bilinear-gather kernel (alone and with GNT's front end) against the model's own
sample_source_views and front end, and their leaves."""
import math

import pytest
import torch

pytest.importorskip("tvm")

from gnt_shiftadd.config import ModelConfig  # noqa: E402
from gnt_shiftadd.models.gnt import GNT  # noqa: E402
from gnt_shiftadd.models.gnt import SampledViewEmbedding  # noqa: E402
from gnt_shiftadd.models.projector import SourceViews, SourceViewSampler, sample_source_views  # noqa: E402
from kernels.apply import KernelFrontEnd, KernelSourceViews, use_kernels  # noqa: E402
from kernels.dispatch import recording  # noqa: E402
from kernels.source_views import TILE, fold_feature_block, prepare_source_views, reference_source_front_end, reference_source_views, \
    source_front_end, source_views  # noqa: E402
from kernels.view_features import ViewFeatureWeights  # noqa: E402


def _look_at(origin: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """OpenCV c2w [4, 4] at `origin` looking at `target` (x right, y down, z forward)."""
    forward = torch.nn.functional.normalize(target - origin, dim=0)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, torch.tensor([0.0, -1.0, 0.0])), dim=0)
    down = torch.linalg.cross(forward, right)
    c2w = torch.eye(4)
    c2w[:3, :3] = torch.stack([right, down, forward], dim=1)
    c2w[:3, 3] = origin
    return c2w


def _views(num_views=6, height=37, width=50, feat_channels=32, scale=4, seed=0) -> SourceViews:
    """Cameras on an arc around the origin, random images and feature maps (features at 1/scale resolution)."""
    generator = torch.Generator().manual_seed(seed)
    c2w = torch.stack([_look_at(torch.tensor([3.0 * math.sin(a), 0.3 * math.cos(3 * a), -4.0 * math.cos(a)]),
                                torch.zeros(3)) for a in torch.linspace(-0.5, 0.5, num_views).tolist()])
    focal = 0.9 * width
    K = torch.tensor([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])
    return SourceViews(rgb=torch.rand(num_views, height, width, 3, generator=generator),
                       features=torch.randn(num_views, feat_channels, -(-height // scale), -(-width // scale),
                                            generator=generator),
                       K=K.expand(num_views, 3, 3).contiguous(), c2w=c2w)


def _points(rays, samples, seed=1):
    """Samples spread over and beyond the cameras' fields of view, some behind cameras."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(rays, samples, 3, generator=generator) - 0.5) * torch.tensor([6.0, 4.0, 9.0])


@pytest.mark.parametrize("rays,samples,feat_channels,num_views", [
    (64, 24, 32, 6), (7, 5, 16, 3), (1, 1, 32, 2), (TILE, 1, 48, 4), (9, 3, 8, 2), (5, 5, 21, 3),
])
def test_matches_the_model(rays, samples, feat_channels, num_views):
    views = _views(num_views=num_views, feat_channels=feat_channels)
    points, origin = _points(rays, samples), torch.tensor([0.1, -0.2, -4.5])
    with recording(record := {}):
        got = source_views(points, origin, prepare_source_views(views))
    assert record == {"source_views": "tvm"}
    expected = sample_source_views(points, origin, views)
    names = ("rgb", "feat", "ray_diff", "mask")
    for name, a, b in zip(names, got, expected):
        assert a.shape == b.shape and a.dtype == torch.float32, name
    rgb, feat, ray_diff, mask = got
    assert torch.equal(mask, expected[3])
    if rays * samples > TILE:
        assert 0 < mask.mean() < 1  # both visible and invisible samples were exercised
    # bilinear samples: the pixel coordinates round differently (fused multiply-adds) by ~1e-5 px
    torch.testing.assert_close(rgb, expected[0], rtol=0, atol=2e-3)
    torch.testing.assert_close(feat, expected[1], rtol=0, atol=5e-3)
    torch.testing.assert_close(ray_diff, expected[2], rtol=0, atol=1e-5)


def test_prepared_views_round_trip_to_the_reference():
    views = _views()
    points, origin = _points(5, 7), torch.zeros(3)
    for a, b in zip(reference_source_views(points, origin, prepare_source_views(views)),
                    sample_source_views(points, origin, views)):
        assert torch.equal(a, b)


def test_bad_inputs_are_named():
    prepared = prepare_source_views(_views())
    with pytest.raises(ValueError, match=r"points must be \[rays, samples, 3\]"):
        source_views(torch.zeros(4, 3), torch.zeros(3), prepared)
    with pytest.raises(ValueError, match=r"target_origin must be \[3\]"):
        source_views(torch.zeros(2, 4, 3), torch.zeros(4), prepared)
    views = _views()
    with pytest.raises(ValueError, match=r"rgb must be \[V, H, W, 3\]"):
        prepare_source_views(SourceViews(views.rgb[..., :2], views.features, views.K, views.c2w))


def test_the_sampler_leaf_is_swapped_on_cpu_and_reuses_the_prepared_views():
    """Where the fused front end does not apply (here: 8 channels, not a multiple of 16), the sampler gets its own
    kernel."""
    model = GNT(ModelConfig(netwidth=8, num_heads=2, feature_channels=32, trans_depth=1)).eval()
    assert type(model.transformer.source_sampler) is SourceViewSampler
    with torch.no_grad():
        summary = use_kernels(model, "tvm")
    assert "KernelFrontEnd" not in summary
    assert summary["KernelSourceViews"] == 1 and isinstance(model.transformer.source_sampler, KernelSourceViews)
    views, origin = _views(), torch.zeros(3)
    leaf = model.transformer.source_sampler
    first = leaf.prepared_for(views)
    assert leaf.prepared_for(views) is first  # every chunk of a frame: no second channels-last copy
    views.features.add_(1.0)  # changed in place: prepared again
    assert leaf.prepared_for(views) is not first
    got = leaf(_points(9, 4), origin, views)
    for a, b in zip(got, sample_source_views(_points(9, 4), origin, views)):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3)
    assert leaf.kernels_ran == {"source_views": "tvm"}


def test_the_leaves_stay_on_grid_sample_on_cuda():
    model = GNT(ModelConfig(netwidth=16, num_heads=2, feature_channels=32, trans_depth=1)).eval()
    with torch.no_grad():
        summary = use_kernels(model, "tvm", device_type="cuda")
    assert "KernelSourceViews" not in summary and "KernelFrontEnd" not in summary
    assert type(model.transformer.source_sampler) is SourceViewSampler
    assert type(model.transformer.front_end) is SampledViewEmbedding
    assert summary["KernelViewEmbedding"] == 1  # the front end's own (CUDA) kernel
    assert summary["skipped"] == []  # not a fallback: grid_sample is a native CUDA kernel


@pytest.mark.parametrize("rays,samples,feat_channels,num_views,hidden,channels", [
    (64, 24, 32, 6, 32, 32), (7, 5, 8, 3, 12, 16), (1, 1, 21, 2, 16, 32),
])
def test_fused_front_end_matches_the_model(rays, samples, feat_channels, num_views, hidden, channels):
    """Sampling + the per-view MLP + the max-pool over views in one kernel equals the model's sample_source_views
    followed by its front end; a sample no view sees gets q0 = 0."""
    torch.manual_seed(2)
    weights = ViewFeatureWeights.from_linears(torch.nn.Linear(3 + feat_channels, hidden),
                                              torch.nn.Linear(hidden, channels))
    views = _views(num_views=num_views, feat_channels=feat_channels)
    points, origin = _points(rays, samples), torch.tensor([0.1, -0.2, -4.5])
    prepared = prepare_source_views(views)
    with recording(record := {}):
        got = source_front_end(points, origin, prepared, weights)
    assert record == {"source_front_end": "tvm"}
    expected = reference_source_front_end(points, origin, prepared, weights)
    for name, a, b in zip(("features", "q0", "colors", "ray_diff", "mask"), got, expected):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3 if name != "ray_diff" else 1e-5, msg=name)
    hidden_nowhere = got[4].sum(dim=(2, 3)) == 0
    assert torch.all(got[1][hidden_nowhere] == 0)


@pytest.mark.parametrize("rays,samples,feat_channels,num_views,hidden,channels", [
    (64, 24, 32, 6, 32, 32), (7, 5, 8, 3, 12, 16), (1, 1, 21, 2, 16, 32),
])
def test_the_feature_block_folded_into_the_maps_keeps_the_front_end(rays, samples, feat_channels, num_views, hidden,
                                                                    channels):
    """W1f applied to the source feature maps once (fold_feature_block) gives the model's front end: the folded
    kernel and the folded reference against the unfolded reference."""
    torch.manual_seed(3)
    weights = ViewFeatureWeights.from_linears(torch.nn.Linear(3 + feat_channels, hidden),
                                              torch.nn.Linear(hidden, channels))
    prepared = prepare_source_views(_views(num_views=num_views, feat_channels=feat_channels))
    points, origin = _points(rays, samples), torch.tensor([0.1, -0.2, -4.5])
    folded_views, folded_weights = fold_feature_block(prepared, weights)
    assert folded_weights.folded and not weights.folded and folded_views.feat_channels == hidden
    expected = reference_source_front_end(points, origin, prepared, weights)
    with recording(record := {}):
        got = source_front_end(points, origin, folded_views, folded_weights)
    assert record == {"source_front_end": "tvm"}
    folded_reference = reference_source_front_end(points, origin, folded_views, folded_weights)
    for name, a, b, c in zip(("features", "q0", "colors", "ray_diff", "mask"), got, expected, folded_reference):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3 if name != "ray_diff" else 1e-5, msg=name)
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-4, msg=name)
    with pytest.raises(ValueError, match="fold_feature_block: weights for 0 feature channels \\(folded already\\)"):
        fold_feature_block(folded_views, folded_weights)


@pytest.mark.parametrize("front_end_last", [False, True])
def test_the_fused_front_end_is_swapped_on_cpu_and_runs_the_model(front_end_last):
    model = GNT(ModelConfig(netwidth=16, num_heads=2, feature_channels=32, trans_depth=1)).eval()
    if front_end_last:  # the fused leaf wins over its parts whatever order the transformer defines them in
        model.transformer._modules["front_end"] = model.transformer._modules.pop("front_end")
    with torch.no_grad():
        summary = use_kernels(model, "tvm")
    assert summary["KernelFrontEnd"] == 1 and summary["skipped"] == []
    assert "KernelSourceViews" not in summary and "KernelViewEmbedding" not in summary  # covered by the fused leaf
    assert isinstance(model.transformer.front_end, KernelFrontEnd)
    with pytest.raises(ValueError, match=r"front end takes 32 feature channels, the source views have 16"):
        source_front_end(_points(2, 3), torch.zeros(3), prepare_source_views(_views(feat_channels=16)),
                         model.transformer.front_end.weights)


def _integer_front_end(feat_channels, hidden, channels, views, points, origin, saturate=0.8):
    """fp32 first layer, 8-bit integer second layer whose per-tensor absmax is `saturate` x the largest hidden unit
    the reference computes here (so the largest ones clip); -> (folded views, folded weights, the reference's hidden
    units [R, S, V, H] on the folded maps)."""
    from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear
    from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec

    fc1 = torch.nn.Linear(3 + feat_channels, hidden)
    fc2 = IntShiftLinear.from_linear(torch.nn.Linear(hidden, channels), ShiftSpec(exponent_min=-6), 8, "per_tensor")
    prepared = prepare_source_views(views)
    folded_views, folded_weights = fold_feature_block(prepared, ViewFeatureWeights.from_linears(
        fc1, torch.nn.Linear(hidden, channels)))
    rgb, feat, _, _ = reference_source_views(points, origin, folded_views)
    hidden_units = torch.relu(rgb.permute(2, 3, 0, 1) @ folded_weights.w1_rgb + feat.permute(2, 3, 0, 1)
                              + folded_weights.b1)
    fc2.activation_absmax.fill_(saturate * float(hidden_units.max()))
    return (*fold_feature_block(prepared, ViewFeatureWeights.from_linears(fc1, fc2)), hidden_units,
            fc2.activation_absmax)


@pytest.mark.parametrize("rays,samples,feat_channels,num_views,hidden,channels", [
    (64, 24, 32, 6, 32, 32), (7, 5, 32, 3, 16, 32), (1, 1, 40, 2, 32, 16), (33, 7, 16, 4, 16, 64),
])
def test_integer_second_layer_matches_its_reference(rays, samples, feat_channels, num_views, hidden, channels):
    """rgbfeat_fc2 as an 8-bit integer shift layer (per-tensor scale) inside the fused front end: bit-exact against
    the integer reference wherever the fp32 first layer's units are not at a rounding tie (the kernel sums them in
    its own order), and within one quantization step elsewhere."""
    from gnt_shiftadd.shiftadd.int_shift import rounding_tie_distance
    from kernels.int_shift import vnni_available

    if not vnni_available():
        pytest.skip("the integer kernels need AVX-512 VNNI")
    torch.manual_seed(4)
    points, origin = _points(rays, samples), torch.tensor([0.1, -0.2, -4.5])
    views, weights, hidden_units, absmax = _integer_front_end(feat_channels, hidden, channels,
                                                              _views(num_views=num_views, feat_channels=feat_channels),
                                                              points, origin)
    assert weights.second is not None and weights.folded
    with recording(record := {}):
        got = source_front_end(points, origin, views, weights)
    assert record == {"source_front_end": "tvm"}
    expected = reference_source_front_end(points, origin, views, weights)
    for name, a, b in zip(("colors", "ray_diff", "mask"), got[2:], expected[2:]):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3 if name != "ray_diff" else 1e-5, msg=name)
    features, q0 = got[0], got[1]
    safe = rounding_tie_distance(hidden_units, 8, absmax).amin(dim=-1) > 0.002  # [R, S, V]
    assert safe.numel() < 100 or safe.float().mean() > 0.75  # most rows are compared bit for bit
    assert torch.equal(features[safe], expected[0][safe])
    step = float(absmax) / 127 * float(weights.w2.abs().max())  # one step of one hidden unit, on one output
    assert (features - expected[0]).abs().max() <= 2 * step + 1e-5
    visible = got[4] > 0
    assert torch.equal(q0[safe.all(dim=-1)], expected[1][safe.all(dim=-1)])
    assert torch.all(q0[~visible.any(dim=2).any(dim=-1)] == 0)
    assert (hidden_units * 127 / absmax > 127).any()  # the calibration clips the largest units


def test_integer_second_layer_refusals():
    """Per-token integer layers and unfolded integer weights are refused with the reason."""
    from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear
    from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec

    fc1 = torch.nn.Linear(35, 32)
    per_token = IntShiftLinear.from_linear(torch.nn.Linear(32, 32), ShiftSpec(exponent_min=-6), 8, "per_token")
    with pytest.raises(ValueError, match="per-tensor scale"):
        ViewFeatureWeights.from_linears(fc1, per_token)
    per_tensor = IntShiftLinear.from_linear(torch.nn.Linear(32, 32), ShiftSpec(exponent_min=-6), 8, "per_tensor")
    per_tensor.activation_absmax.fill_(2.0)
    weights = ViewFeatureWeights.from_linears(fc1, per_tensor)
    with pytest.raises(ValueError, match="needs folded weights"):
        source_front_end(_points(2, 3), torch.zeros(3), prepare_source_views(_views()), weights)


def test_an_unfoldable_integer_front_end_runs_its_parts_on_their_kernels():
    """Hidden units wider than the feature maps cannot be folded, so the fused integer front end does not apply: the
    sampler gets its own kernel and the integer layer the int_shift kernel (not a fallback: nothing is skipped)."""
    from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear
    from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec
    from kernels.apply import KernelIntShiftLinear
    from kernels.int_shift import vnni_available

    if not vnni_available():
        pytest.skip("the integer kernels need AVX-512 VNNI")
    model = GNT(ModelConfig(netwidth=16, num_heads=2, feature_channels=8, trans_depth=1)).eval()
    transformer = model.transformer
    transformer.rgbfeat_fc2 = IntShiftLinear.from_linear(transformer.rgbfeat_fc2, ShiftSpec(exponent_min=-6), 8,
                                                         "per_tensor")
    transformer.rgbfeat_fc2.activation_absmax.fill_(2.0)
    with torch.no_grad():
        summary = use_kernels(model, "tvm")
    assert "KernelFrontEnd" not in summary and summary["KernelSourceViews"] == 1 and summary["skipped"] == []
    assert type(transformer.front_end) is SampledViewEmbedding
    assert isinstance(transformer.rgbfeat_fc2, KernelIntShiftLinear)
