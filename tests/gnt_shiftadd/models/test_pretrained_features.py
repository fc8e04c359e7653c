"""The frozen ImageNet feature extractor (models/pretrained_features.py) and its per-image backbone cache."""
import pytest
import torch

from gnt_shiftadd.config import ModelConfig
from gnt_shiftadd.evaluation.lpips import LPIPSUnavailable, load_lpips
from gnt_shiftadd.models.gnt import GNT
from gnt_shiftadd.models.pretrained_features import AlexNetFeatures


def _random_backbone(net: AlexNetFeatures) -> AlexNetFeatures:
    with torch.no_grad():
        for conv in (net.conv1, net.conv2):
            conv.weight.normal_(0, 0.05)
            conv.bias.normal_(0, 0.05)
    return net


def test_shapes_and_only_the_projection_trains():
    net = _random_backbone(AlexNetFeatures(16)).train()
    out = net(torch.rand(2, 3, 61, 83))
    assert out.shape == (2, 16, 14, 20)  # conv1: stride 4, padding 2, kernel 11
    out.square().sum().backward()
    assert net.conv1.weight.grad is None and net.conv2.weight.grad is None
    assert all(p.grad is not None for n, p in net.named_parameters() if not n.startswith(("conv1", "conv2")))


def test_cache_reuses_equal_images_and_never_serves_a_different_one():
    net = _random_backbone(AlexNetFeatures(8)).train()
    images = torch.rand(3, 3, 40, 52)
    first = net(images)
    assert (net.cache.misses, net.cache.hits) == (3, 0)
    assert torch.equal(net(images.clone()), first) and net.cache.hits == 3
    changed = images.clone()
    changed[1, 2, 39, 51] += 0.5  # one pixel that the key's probe may not look at
    net(changed)
    assert net.cache.misses == 4
    net.eval()  # inference always recomputes (op counts and timings include the backbone) and agrees exactly
    assert torch.equal(net(images), first)


def test_loading_weights_clears_the_cache():
    net = _random_backbone(AlexNetFeatures(8)).train()
    images = torch.rand(2, 3, 40, 52)
    before = net(images)
    other = _random_backbone(AlexNetFeatures(8))
    net.load_state_dict(other.state_dict())
    assert len(net.cache.entries) == 0
    assert not torch.equal(net(images), before)


def test_gnt_with_alexnet_features_leaves_frozen_weights_out_of_the_optimizer():
    model = GNT(ModelConfig(netwidth=16, trans_depth=1, num_heads=2, feature_channels=8, pos_freqs=2, dir_freqs=2,
                            feature_extractor="alexnet"))
    groups = model.parameter_groups(1e-3, 1e-3)
    cnn = {id(p) for p in groups[1]["params"]}
    assert id(model.feature_net.conv1.weight) not in cnn and id(model.feature_net.project1.weight) in cnn
    assert "feature_net.conv1.weight" in model.state_dict()  # checkpoints carry the ImageNet weights


def test_imagenet_weights_are_the_lpips_alexnet():
    try:
        lpips = load_lpips("alex")
    except LPIPSUnavailable as exc:
        pytest.skip(f"LPIPS weights not cached and not fetchable here: {exc}")
    net = AlexNetFeatures(8)
    net.load_imagenet_weights()
    assert torch.equal(net.conv1.weight, lpips.stages[0][0].weight)
    assert torch.equal(net.conv2.bias, lpips.stages[1][1].bias)
    c1, _ = net.backbone(torch.rand(1, 3, 64, 64))
    assert c1.abs().sum() > 0
