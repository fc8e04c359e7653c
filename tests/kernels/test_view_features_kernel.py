"""The fused per-view feature MLP + masked max-pool against its reference and against GNTTransformer itself."""
import pytest
import torch

pytest.importorskip("tvm")

from gnt_shiftadd.config import ModelConfig  # noqa: E402
from gnt_shiftadd.models.gnt import GNTTransformer, masked_max_over_views  # noqa: E402
from kernels.build import cuda_target  # noqa: E402
from kernels.view_features import TILE, ViewFeatureWeights, make_view_features, reference_view_features, \
    view_features  # noqa: E402


def _weights(feat_channels, hidden, channels, seed=0):
    torch.manual_seed(seed)
    return ViewFeatureWeights.from_linears(torch.nn.Linear(3 + feat_channels, hidden), torch.nn.Linear(hidden, channels))


def _inputs(views, feat_channels, tokens, seed=1, visible=0.7):
    torch.manual_seed(seed)
    mask = (torch.rand(tokens, views) < visible).float()
    return torch.rand(views, 3, tokens), torch.randn(views, feat_channels, tokens), mask


@pytest.mark.parametrize("views,feat_channels,hidden,channels,tokens", [
    (6, 32, 32, 32, 2 * TILE), (6, 32, 32, 32, 1000), (10, 32, 64, 64, 3 * TILE + 5), (3, 7, 12, 9, 1),
    (5, 13, 17, 16, TILE - 1), (1, 4, 8, 8, 40),
])
def test_matches_reference(views, feat_channels, hidden, channels, tokens):
    w = _weights(feat_channels, hidden, channels)
    rgb, feat, mask = _inputs(views, feat_channels, tokens)
    mask[0] = 0  # a token no view sees: q0 = 0
    features, q0 = view_features(rgb, feat, mask, w)
    expected_features, expected_q0 = reference_view_features(rgb, feat, mask, w)
    torch.testing.assert_close(features, expected_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q0, expected_q0, rtol=1e-5, atol=1e-5)
    assert torch.all(q0[0] == 0)


def test_all_views_masked_and_negative_features():
    w = _weights(8, 16, 16)
    with torch.no_grad():
        w.b2 -= 100.0  # every feature negative: the max must still come from visible views, not from 0
    rgb, feat, mask = _inputs(4, 8, 3 * TILE)
    mask[:TILE] = 0
    mask[TILE:, 1:], mask[TILE:, 0] = 0, 1  # only view 0 visible
    features, q0 = view_features(rgb, feat, mask, w)
    assert torch.all(q0[:TILE] == 0)
    torch.testing.assert_close(q0[TILE:], features[TILE:, 0])


def test_reference_is_the_transformer_front():
    """The reference reproduces GNTTransformer's rgb_feat MLP and max-pool from grid_sample's layout."""
    cfg = ModelConfig(netwidth=16, num_heads=2, feature_channels=8, trans_depth=1)
    transformer = GNTTransformer(cfg).eval()
    rays, samples, views = 3, 5, 4
    rgb, feat, mask = _inputs(views, cfg.feature_channels, rays * samples)
    rgb_feat = torch.cat([rgb, feat], dim=1).permute(2, 0, 1).reshape(rays, samples, views, -1)
    with torch.no_grad():
        expected = transformer.rgbfeat_fc2(torch.relu(transformer.rgbfeat_fc1(rgb_feat)))
        expected_q = masked_max_over_views(expected, mask.reshape(rays, samples, views, 1))
        w = ViewFeatureWeights.from_linears(transformer.rgbfeat_fc1, transformer.rgbfeat_fc2)
        features, q0 = reference_view_features(rgb, feat, mask, w)
    torch.testing.assert_close(features.reshape(rays, samples, views, -1), expected)
    torch.testing.assert_close(q0.reshape(rays, samples, -1), expected_q)


def test_bad_inputs_are_named():
    w = _weights(8, 16, 16)
    rgb, feat, mask = _inputs(4, 8, 20)
    with pytest.raises(ValueError, match="expected rgb"):
        view_features(rgb, feat[:, :5], mask, w)
    with pytest.raises(ValueError, match="do not fit"):
        ViewFeatureWeights(w.w1_rgb, w.w1_feat, w.b1[:3], w.w2, w.b2)


def test_cuda_kernel_builds_without_a_gpu():
    import tvm

    target = cuda_target("sm_90")
    assert tvm.compile(make_view_features(target, 6, 32, 32, 32), target=tvm.target.Target(target))
