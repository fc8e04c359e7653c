"""The fused projection + bilinear-gather kernel against the model's own sample_source_views, and its leaf."""
import math

import pytest
import torch

pytest.importorskip("tvm")

from gnt_shiftadd.config import ModelConfig  # noqa: E402
from gnt_shiftadd.models.gnt import GNT  # noqa: E402
from gnt_shiftadd.models.projector import SourceViews, SourceViewSampler, sample_source_views  # noqa: E402
from kernels.apply import KernelSourceViews, use_kernels  # noqa: E402
from kernels.dispatch import recording  # noqa: E402
from kernels.source_views import TILE, prepare_source_views, reference_source_views, source_views  # noqa: E402


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


def test_the_leaf_is_swapped_on_cpu_and_reuses_the_prepared_views():
    model = GNT(ModelConfig(netwidth=16, num_heads=2, feature_channels=32, trans_depth=1)).eval()
    assert type(model.source_sampler) is SourceViewSampler
    with torch.no_grad():
        summary = use_kernels(model, "tvm")
    assert summary["KernelSourceViews"] == 1 and isinstance(model.source_sampler, KernelSourceViews)
    views, origin = _views(), torch.zeros(3)
    leaf = model.source_sampler
    first = leaf.prepared_for(views)
    assert leaf.prepared_for(views) is first  # every chunk of a frame: no second channels-last copy
    views.features.add_(1.0)  # changed in place: prepared again
    assert leaf.prepared_for(views) is not first
    got = leaf(_points(9, 4), origin, views)
    for a, b in zip(got, sample_source_views(_points(9, 4), origin, views)):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3)
    assert leaf.kernels_ran == {"source_views": "tvm"}


def test_the_leaf_stays_on_grid_sample_on_cuda():
    model = GNT(ModelConfig(netwidth=16, num_heads=2, feature_channels=32, trans_depth=1)).eval()
    with torch.no_grad():
        summary = use_kernels(model, "tvm", device_type="cuda")
    assert "KernelSourceViews" not in summary and type(model.source_sampler) is SourceViewSampler
    assert summary["skipped"] == []  # not a fallback: grid_sample is a native CUDA kernel
