import math

import torch

from gnt_shiftadd.config import ModelConfig
from gnt_shiftadd.models.encodings import PositionalEncoding
from gnt_shiftadd.models.gnt import GNT, GNTTransformer
from gnt_shiftadd.models.transformers import RayAttention, ViewAttention

SMALL = dict(netwidth=16, trans_depth=3, num_heads=2, feature_channels=8, pos_freqs=4, dir_freqs=2,
             resnet_layers=[1, 1, 1], resnet_base_channels=8)


def _inputs(rays=5, samples=7, views=4, channels=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb_feat = torch.randn(rays, samples, views, 3 + channels, generator=g)
    ray_diff = torch.randn(rays, samples, views, 4, generator=g)
    mask = (torch.rand(rays, samples, views, 1, generator=g) > 0.3).float()
    points = torch.randn(rays, samples, 3, generator=g)
    dirs = torch.randn(rays, 3, generator=g)
    return rgb_feat, ray_diff, mask, points, dirs


def _run(model, rgb_feat, ray_diff, mask, points, dirs):
    """GNTTransformer on [R, S, V, 3 + F] samples, handed over in grid_sample's layout ([V, 3, R, S], [V, F, R, S])."""
    rgb, feat = rgb_feat[..., :3].permute(2, 3, 0, 1), rgb_feat[..., 3:].permute(2, 3, 0, 1)
    return model.forward_sampled(rgb, feat, ray_diff, mask, points, dirs)


def test_positional_encoding_matches_nerf():
    enc = PositionalEncoding(3, 4)
    x = torch.randn(2, 5, 3)
    out = enc(x)
    assert out.shape == (2, 5, enc.out_dim) and enc.out_dim == 27
    assert torch.equal(out[..., :3], x)
    k = 2  # the band 2^k: sin then cos blocks of 3
    assert torch.allclose(out[..., 3 + 6 * k: 6 + 6 * k], torch.sin(x * 2**k))
    assert torch.allclose(out[..., 6 + 6 * k: 9 + 6 * k], torch.cos(x * 2**k))


def test_transformer_shapes_and_layer_layout():
    model = GNTTransformer(ModelConfig(**SMALL))
    assert len(model.view_blocks) == len(model.ray_blocks) == 3
    assert len(model.pos_fuse) == 2  # position/direction codes injected at layers 0 and 2
    assert model.ray_blocks[0].ff.fc1.out_features == 4 * 16  # 16 -> 64 -> 16 (64 -> 256 -> 64 at width 64)
    rgb = _run(model, *_inputs())
    assert rgb.shape == (5, 3) and torch.isfinite(rgb).all()


def test_all_views_invisible_gives_finite_output_and_gradients():
    model = GNTTransformer(ModelConfig(**SMALL))
    rgb_feat, ray_diff, mask, points, dirs = _inputs()
    rgb_feat.requires_grad_(True)
    rgb = _run(model, rgb_feat, ray_diff, torch.zeros_like(mask), points, dirs)
    assert torch.isfinite(rgb).all()
    rgb.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_invisible_views_do_not_influence_the_colour():
    model = GNTTransformer(ModelConfig(**SMALL)).eval()
    rgb_feat, ray_diff, mask, points, dirs = _inputs()
    mask[..., 1, :] = 0  # view 1 sees nothing
    changed = rgb_feat.clone()
    changed[..., 1, :] = 100.0 * torch.randn_like(changed[..., 1, :])
    changed_diff = ray_diff.clone()
    changed_diff[..., 1, :] = 5.0
    assert torch.allclose(_run(model, rgb_feat, ray_diff, mask, points, dirs),
                          _run(model, changed, changed_diff, mask, points, dirs), atol=1e-5)


def test_view_attention_weights_are_a_masked_softmax_per_channel():
    attn = ViewAttention(16).eval()
    q = torch.randn(3, 4, 16)
    feats = torch.randn(3, 4, 5, 16)
    diff = torch.randn(3, 4, 5, 4)
    mask = torch.ones(3, 4, 5, 1)
    mask[:, :, 2] = 0
    # direct computation of the same math
    qq, k, v = attn.q_fc(q), attn.k_fc(feats), attn.v_fc(feats)
    pos = attn.pos_fc2(torch.relu(attn.pos_fc1(diff)))
    logits = attn.attn_fc2(torch.relu(attn.attn_fc1(k - qq[:, :, None] + pos)))
    w = torch.softmax(logits.masked_fill(mask == 0, -math.inf), dim=-2)
    assert torch.allclose(w.sum(dim=-2), torch.ones(3, 4, 16))
    expected = attn.out_fc(((v + pos) * w).sum(dim=-2))
    assert torch.allclose(attn(q, feats, diff, mask), expected, atol=1e-5)


def test_ray_attention_equals_explicit_multihead_softmax():
    attn = RayAttention(16, 4).eval()
    x = torch.randn(2, 9, 16)
    q, k, v = (fc(x).view(2, 9, 4, 4).transpose(1, 2) for fc in (attn.q_fc, attn.k_fc, attn.v_fc))
    w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = attn.out_fc((w @ v).transpose(1, 2).reshape(2, 9, 16))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_attention_core_is_swappable():
    """The ShiftAdd reparameterization swaps `attn.core`; the block must route through it."""

    class MeanCore(torch.nn.Module):
        calls = 0

        def forward(self, q, k, v):
            MeanCore.calls += 1
            return v.mean(dim=2, keepdim=True).expand_as(v)

    model = GNTTransformer(ModelConfig(**SMALL))
    for block in model.ray_blocks:
        block.attn.core = MeanCore()
    _run(model, *_inputs())
    assert MeanCore.calls == 3


def test_full_model_forward_backward_through_cnn():
    torch.manual_seed(0)
    model = GNT(ModelConfig(**SMALL))
    views, H, W = 3, 24, 32
    src_rgb = torch.rand(views, H, W, 3)
    K = torch.tensor([[30.0, 0, W / 2], [0, 30.0, H / 2], [0, 0, 1]]).expand(views, 3, 3)
    c2w = torch.eye(4).repeat(views, 1, 1)
    c2w[:, 0, 3] = torch.tensor([-0.1, 0.0, 0.1])
    points = torch.rand(6, 5, 3) * torch.tensor([0.4, 0.4, 1.0]) + torch.tensor([-0.2, -0.2, 2.0])
    rgb = model(points, torch.randn(6, 3), torch.zeros(3), src_rgb, K, c2w)
    assert rgb.shape == (6, 3)
    rgb.sum().backward()
    assert all(p.grad is not None for p in model.feature_net.parameters())
    groups = model.parameter_groups(5e-4, 1e-3)
    assert [g["name"] for g in groups] == ["transformer", "cnn"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_blend_head_outputs_a_convex_mix_of_source_colours():
    """Every blended colour lies inside the range of the colours the visible views see on that ray."""
    model = GNTTransformer(ModelConfig(**SMALL, color_head="blend"))
    rgb_feat, ray_diff, mask, points, dirs = _inputs()
    rgb_feat[..., :3] = torch.rand(rgb_feat.shape[:-1] + (3,))
    mask[0] = 0  # ray 0: no view sees any sample -> black
    rgb = _run(model, rgb_feat, ray_diff, mask, points, dirs)
    assert rgb.shape == (5, 3)
    assert torch.equal(rgb[0], torch.zeros(3))
    colors = rgb_feat[..., :3].masked_fill(mask == 0, float("nan"))
    lo = colors.flatten(1, 2).nan_to_num(2.0).amin(dim=1)
    hi = colors.flatten(1, 2).nan_to_num(-1.0).amax(dim=1)
    assert (rgb[1:] >= lo[1:] - 1e-5).all() and (rgb[1:] <= hi[1:] + 1e-5).all()
    rgb.sum().backward()  # every head parameter is reached by the gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())


def test_blend_head_ignores_invisible_views():
    """Changing what an invisible view 'sees' (zero-padded samples) never changes the colour."""
    model = GNTTransformer(ModelConfig(**SMALL, color_head="blend"))
    rgb_feat, ray_diff, mask, points, dirs = _inputs()
    mask[:, :, 1] = 0
    other = rgb_feat.clone()
    other[:, :, 1] = torch.randn_like(other[:, :, 1])
    assert torch.allclose(_run(model, rgb_feat, ray_diff, mask, points, dirs), _run(model, other, ray_diff, mask, points, dirs))


def test_split_view_linear_equals_the_concatenated_layer_and_falls_back_for_other_layers():
    """fc1 on [features, h over the views, ray_diff] computed block by block is the same function (and gradient)
    as the layer on the concatenation; a layer that is not a plain nn.Linear gets the concatenation."""
    from torch import nn

    from gnt_shiftadd.models.heads import split_view_linear

    torch.manual_seed(0)
    fc1 = nn.Linear(2 * 8 + 4, 6)
    h, features, ray_diff = torch.randn(3, 5, 8), torch.randn(3, 5, 4, 8), torch.randn(3, 5, 4, 4)
    whole = fc1(torch.cat([features, h[:, :, None, :].expand_as(features), ray_diff], dim=-1))
    split = split_view_linear(fc1, h, features, ray_diff)
    assert split.shape == (3, 5, 4, 6)
    assert torch.allclose(split, whole, atol=1e-5)
    grad_whole = torch.autograd.grad(whole.square().sum(), fc1.weight)[0]
    grad_split = torch.autograd.grad(split.square().sum(), fc1.weight)[0]
    assert torch.allclose(grad_split, grad_whole, atol=1e-4)

    class Wrapped(nn.Module):  # stands for torch.ao's dynamic int8 Linear: callable on the concatenation only
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, []

        def forward(self, x):
            self.calls.append(x.shape)
            return self.inner(x)

    wrapped = Wrapped(fc1)
    assert torch.equal(split_view_linear(wrapped, h, features, ray_diff), whole)
    assert wrapped.calls == [torch.Size([3, 5, 4, 20])]


def test_position_fusion_splits_its_first_layer_and_keeps_the_concatenation_for_other_layers():
    """pos_fuse's first layer block by block (the direction part once per ray) is the same function and gradient as
    the layer on [q, encoding(points), dir_code over the samples]; a first layer that is not a plain nn.Linear (here
    a shift layer) gets the concatenation; the points' code is made once per memo and reused."""
    from torch import nn

    from gnt_shiftadd.models.encodings import PositionalEncoding
    from gnt_shiftadd.models.gnt import PositionFusion
    from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec

    torch.manual_seed(0)
    rays, samples, dim, dirs = 3, 5, 8, 6
    encoding = PositionalEncoding(3, 2)
    mlp = nn.Sequential(nn.Linear(dim + encoding.out_dim + dirs, dim), nn.ReLU(), nn.Linear(dim, dim))
    q, points, dir_code = torch.randn(rays, samples, dim), torch.randn(rays, samples, 3), torch.randn(rays, dirs)
    point_code = encoding(points)
    whole = mlp(torch.cat([q, point_code, dir_code[:, None, :].expand(rays, samples, dirs)], dim=-1))
    memo = {}
    split = PositionFusion()(q, points, dir_code, mlp, encoding, memo)
    assert split.shape == (rays, samples, dim) and torch.equal(memo["point_code"], point_code)
    assert torch.allclose(split, whole, atol=1e-5)
    grad_whole = torch.autograd.grad(whole.square().sum(), mlp[0].weight)[0]
    grad_split = torch.autograd.grad(split.square().sum(), mlp[0].weight)[0]
    assert torch.allclose(grad_split, grad_whole, atol=1e-4)
    shifted = nn.Sequential(ShiftLinear.from_linear(mlp[0], ShiftSpec()), nn.ReLU(), mlp[2])
    expected = shifted(torch.cat([q, point_code, dir_code[:, None, :].expand(rays, samples, dirs)], dim=-1))
    assert torch.equal(PositionFusion()(q, points, dir_code, shifted, encoding, {}), expected)
    memo["point_code"] = torch.zeros_like(point_code)  # a memo's code is used as it is, not made again
    assert not torch.allclose(PositionFusion()(q, points, dir_code, mlp, encoding, memo), whole)


def test_old_checkpoint_head_keys_are_renamed():
    from gnt_shiftadd.training.checkpoint import _renamed_head_keys

    state = {"transformer.norm.weight": 1, "transformer.rgb_fc.bias": 2, "transformer.pos_fuse.0.0.weight": 3}
    assert _renamed_head_keys(state) == {"transformer.head.norm.weight": 1, "transformer.head.rgb_fc.bias": 2,
                                         "transformer.pos_fuse.0.0.weight": 3}
