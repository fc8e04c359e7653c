"""Op counting from the modules themselves, and the unit-energy model."""
from collections import Counter

import pytest
import torch
from torch import nn

from gnt_shiftadd.config import ShiftAddConfig
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene
from gnt_shiftadd.models.transformers import DotProductAttention
from gnt_shiftadd.evaluation.opcount import UNIT_ENERGY_PJ, OpCounter, OpCounts, component_of, count_frame_ops
from gnt_shiftadd.shiftadd.reparameterize import reparameterize
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec
from gnt_shiftadd.training.warm_start import calibration_forward


def test_linear_and_shift_linear_counts_by_hand():
    linear = nn.Linear(4, 3)
    with OpCounter(linear) as counter:
        linear(torch.randn(5, 4))
    assert counter.ops.total() == Counter({("mult", "fp32"): 5 * 4 * 3, ("add", "fp32"): 5 * 3 * 3 + 5 * 3})

    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0, -0.5, 0.25], [0.0, 0.0, 0.0, 2.0 ** -3], [1.0, 1.0, 1.0, 1.0]]))
    shift = ShiftLinear.from_linear(linear, ShiftSpec(channel_scale=False))
    assert shift.nonzero_weights() == 8
    with OpCounter(shift) as counter:
        shift(torch.randn(2, 7, 4))  # 14 tokens
    assert counter.ops.total() == Counter({("shift", "int32"): 14 * 8, ("add", "fp32"): 14 * (8 - 3) + 14 * 3})


def test_dense_attention_counts_by_hand():
    core = DotProductAttention()
    q = torch.randn(2, 3, 5, 4)  # R=2, H=3, S=5, d=4
    with OpCounter(core) as counter:
        core(q, q, q)
    total = counter.ops.total()
    assert total[("mult", "fp32")] == 2 * 3 * 5 * 5 * (2 * 4 + 1)
    assert total[("special", "fp32")] == 2 * 2 * 3 * 5 * 5


def _head_inputs(rays=2, samples=5, views=3, dim=8):
    """q, features, colors, ray_diff, mask for a BlendColorHead of width dim (every view sees every sample)."""
    return (torch.randn(rays, samples, dim), torch.randn(rays, samples, views, dim),
            torch.rand(rays, samples, views, 3), torch.randn(rays, samples, views, 4),
            torch.ones(rays, samples, views, 1))


def test_blend_head_counts_its_split_first_layer_by_hand():
    """BlendColorHead: fc1 split by input block (C + 4 inputs per sample and view, C once per sample), fc2 per
    (sample, view), sample_fc per sample, the LayerNorm; softmaxes over views and samples."""
    from gnt_shiftadd.models.heads import BlendColorHead

    head = BlendColorHead(dim=8, hidden=6)
    with OpCounter(head) as counter:
        head(*_head_inputs())
    pairs, tokens, views = 2 * 5 * 3, 2 * 5, 3
    fc1 = pairs * (8 + 4) * 6 + tokens * 8 * 6
    fc2 = pairs * 6 * 1
    sample_fc = tokens * 8 * 1
    norm = 3 * tokens * 8
    blend = pairs * 4
    assert counter.ops.total()[("mult", "fp32")] == fc1 + fc2 + sample_fc + norm + blend
    assert counter.ops.total()[("special", "fp32")] == 2 * tokens * views + tokens  # view softmax + LN rsqrt


def test_blend_head_with_a_shift_feature_block_counts_both_kinds():
    """m's head (shiftadd.head: shift): the feature block is a shift layer (shifts, counted by its own module call);
    the h and ray_diff blocks stay fp32 multiplies, the feature block's outputs one more add each."""
    from gnt_shiftadd.models.heads import BlendColorHead
    from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear

    head = BlendColorHead(dim=8, hidden=6)
    head.view_fc1 = BlockShiftLinear.from_linear(head.view_fc1, 8, ShiftSpec())
    inputs = _head_inputs()
    with OpCounter(head) as counter:
        head(*inputs)
    features, pairs, tokens = inputs[1], 2 * 5 * 3, 2 * 5
    dense_fc1 = pairs * 4 * 6 + tokens * 8 * 6
    assert counter.ops.total()[("mult", "fp32")] == dense_fc1 + pairs * 6 + tokens * 8 + 3 * tokens * 8 + pairs * 4
    with OpCounter(head.view_fc1.first) as alone:  # the feature block's shifts: as the layer counts them alone
        head.view_fc1.first(features)
    assert counter.ops.total()[("shift", "int32")] == alone.ops.total()[("shift", "int32")] > 0


def test_position_fusion_counts_its_split_first_layer_by_hand():
    """pos_fuse: the q and point-code blocks of fc1 per sample, the direction block once per ray, fc2 per sample."""
    from gnt_shiftadd.models.gnt import PositionFusion

    from gnt_shiftadd.models.encodings import PositionalEncoding

    rays, samples, dim, freqs, dirs = 2, 5, 8, 2, 6
    encoding = PositionalEncoding(3, freqs)
    mlp = nn.Sequential(nn.Linear(dim + encoding.out_dim + dirs, dim), nn.ReLU(), nn.Linear(dim, dim))
    fusion = PositionFusion()
    holder = nn.ModuleDict({"fusion": fusion, "mlp": mlp, "encoding": encoding})
    with OpCounter(holder) as counter:
        fusion(torch.randn(rays, samples, dim), torch.randn(rays, samples, 3), torch.randn(rays, dirs), mlp,
               encoding, {})
    tokens = rays * samples
    fc1 = tokens * (dim + encoding.out_dim) * dim + rays * dirs * dim
    scaling = tokens * 3 * freqs  # the encoding's 2^k x, counted by its own hook
    assert counter.ops.total()[("mult", "fp32")] == fc1 + tokens * dim * dim + scaling


def test_position_fusion_with_shift_blocks_counts_only_its_dense_blocks_by_hand():
    """n's pos_fuse (shiftadd.position_fusion: shift): the query and the code's sines/cosines are shift layers
    (counted by their own module calls), the 3 coordinates per sample and the direction once per ray stay fp32
    multiplies; each shift block's outputs are one more add per sample and hidden unit."""
    from gnt_shiftadd.models.encodings import PositionalEncoding
    from gnt_shiftadd.models.gnt import PositionFusion
    from gnt_shiftadd.shiftadd.block_linear import BlockShiftLinear

    rays, samples, dim, freqs, dirs = 2, 5, 8, 2, 6
    encoding = PositionalEncoding(3, freqs)
    dense = nn.Linear(dim + encoding.out_dim + dirs, dim)
    fc1 = BlockShiftLinear.from_linear(dense, dim, ShiftSpec(), second=(dim + 3, 6 * freqs))
    mlp = nn.Sequential(fc1, nn.ReLU(), nn.Linear(dim, dim))
    fusion = PositionFusion()
    holder = nn.ModuleDict({"fusion": fusion, "mlp": mlp, "encoding": encoding})
    q = torch.randn(rays, samples, dim)
    with OpCounter(holder) as counter:
        fusion(q, torch.randn(rays, samples, 3), torch.randn(rays, dirs), mlp, encoding, {})
    tokens = rays * samples
    scaling = tokens * 3 * freqs  # the encoding's 2^k x, counted by its own hook
    assert counter.ops.total()[("mult", "fp32")] == tokens * 3 * dim + rays * dirs * dim + tokens * dim * dim + scaling
    with OpCounter(fc1.first) as alone:
        fc1.first(q)
    assert counter.ops.total()[("shift", "int32")] > alone.ops.total()[("shift", "int32")] > 0


def test_energy_uses_the_stated_table():
    counts = Counter({("mult", "fp32"): 10, ("add", "fp32"): 100, ("shift", "int32"): 1000})
    assert OpCounts.energy_pj(counts) == pytest.approx(10 * 3.7 + 100 * 0.9 + 1000 * 0.13)
    assert UNIT_ENERGY_PJ[("mult", "fp32")] == 3.7
    with pytest.raises(KeyError, match="no unit energy"):
        OpCounts.energy_pj(Counter({("mult", "int4"): 1}))


def test_component_names():
    assert component_of("feature_net.layer1.0.conv1") == "cnn"
    assert component_of("transformer.view_blocks.1.attn.k_fc") == "view_transformer"
    assert component_of("transformer.ray_blocks.0.attn.core") == "ray_transformer"
    assert component_of("transformer.ray_blocks.0.ff.experts.1.fc2") == "ffn"
    assert component_of("transformer.rgb_fc") == "other"


def test_frame_ops_of_dense_and_shiftadd_variants(tiny_config):
    cfg = tiny_config("model.dropout=0.0")
    tensors = SceneTensors(load_scene(cfg), torch.device("cpu"))
    dense = build_model(cfg, torch.device("cpu")).eval()
    base = count_frame_ops(dense, tensors, cfg, n_rays=32)
    per_ray, per_frame = base["per_ray"], base["per_frame"]
    assert per_ray["shifts"] == 0 and per_ray["mults"] > 0
    pixels = base["resolution"][0] * base["resolution"][1]
    cnn = per_frame["by_component"]["cnn"]
    assert per_frame["mults"] == pytest.approx(per_ray["mults"] * pixels + cnn["mult_fp32"])
    assert {"view_transformer", "ray_transformer", "ffn", "other"} <= set(per_ray["by_component"])

    variant = build_model(cfg, torch.device("cpu")).eval()
    reparameterize(variant, ShiftAddConfig(ray_attention="hash_linear", hash_bits=8, attention_linears="shift", ffn="shift"),
                   run_calibration=calibration_forward(variant, tensors, cfg))
    converted = count_frame_ops(variant, tensors, cfg, n_rays=32)["per_ray"]
    assert converted["shifts"] > 0
    norm_mults = 2 * cfg.model.trans_depth * 3 * cfg.model.netwidth * cfg.render.n_samples  # the FFNs' LayerNorms
    assert converted["by_component"]["ffn"]["mult_fp32"] == pytest.approx(norm_mults)  # every FFN weight is a shift
    assert converted["mults"] < per_ray["mults"] and converted["energy_pj"] < per_ray["energy_pj"]


def test_moe_charges_each_expert_only_for_its_tokens(tiny_config):
    cfg = tiny_config("model.dropout=0.0")
    tensors = SceneTensors(load_scene(cfg), torch.device("cpu"))
    model = build_model(cfg, torch.device("cpu")).eval()
    dense_ffn = count_frame_ops(model, tensors, cfg, n_rays=16)["per_ray"]["by_component"]["ffn"]
    reparameterize(model, ShiftAddConfig(ffn="moe", moe_noisy=False))
    moes = [m for m in model.modules() if m.__class__.__name__ == "MoEFeedForward"]
    with torch.no_grad():
        for moe in moes:  # everything to the shift expert
            moe.router.bias.copy_(torch.tensor([-10.0, 10.0]))
    dispatch = [m.dispatch for m in moes]
    ffn = count_frame_ops(model, tensors, cfg, n_rays=16)["per_ray"]["by_component"]["ffn"]
    assert [m.dispatch for m in moes] == dispatch  # restored after counting
    router_mults = sum(m.router.in_features * m.router.out_features for m in moes) * cfg.render.n_samples
    gate_mults = sum(m.router.in_features for m in moes) * cfg.render.n_samples
    norm_mults = 2 * cfg.model.trans_depth * 3 * cfg.model.netwidth * cfg.render.n_samples
    assert ffn["mult_fp32"] == pytest.approx(router_mults + gate_mults + norm_mults)  # no dense-expert multiplies
    assert ffn["shift_int32"] > 0 and dense_ffn.get("shift_int32", 0) == 0


def test_dense_int8_counterfactual_counts_the_block_linears_as_int8_by_hand():
    """int8_linears: only the attention/FFN linears become int8 (with the same quantization overheads an
    IntShiftLinear is charged); anything else (here a head) stays fp32."""
    from gnt_shiftadd.models.transformers import FeedForward

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = FeedForward(4, 8)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.ff(x))

    model = Tiny().eval()
    with OpCounter(model, int8_linears=True) as counter:
        model(torch.randn(5, 4))
    t = 5
    expected = Counter()
    for fin, fout in ((4, 8), (8, 4)):
        expected.update({("mult", "fp32"): t * fin + t * fout, ("special", "fp32"): 2 * t, ("mult", "int8"): t * fin * fout,
                         ("add", "int32"): t * (fin - 1) * fout, ("add", "fp32"): t * fout})
    expected.update({("mult", "fp32"): t * 4 * 3, ("add", "fp32"): t * 3 * 3 + t * 3})
    assert counter.ops.total() == expected
    with OpCounter(model) as plain:
        model(torch.randn(5, 4))
    assert OpCounts.energy_pj(counter.ops.total()) < OpCounts.energy_pj(plain.ops.total())
