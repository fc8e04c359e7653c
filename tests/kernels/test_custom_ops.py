"""The kernels as torch custom ops: registrations pass torch.library.opcheck, results equal the direct kernel
calls, a kernel-backed block traces with torch.compile(fullgraph=True), and gradients take the reference path."""
import pytest
import torch

pytest.importorskip("tvm")

from gnt_shiftadd.config import ShiftAddConfig  # noqa: E402
from gnt_shiftadd.experiment import SceneTensors, build_model, load_scene  # noqa: E402
from gnt_shiftadd.models.transformers import FeedForward, ViewAttention  # noqa: E402
from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear, export_int_shift, integer_linears_  # noqa: E402
from gnt_shiftadd.shiftadd.reparameterize import reparameterize  # noqa: E402
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec  # noqa: E402
from gnt_shiftadd.training.warm_start import calibration_forward  # noqa: E402
from kernels import ops  # noqa: E402
from kernels.apply import KernelFFNSublayer, KernelRayAttentionSublayer, KernelViewAttentionSublayer, use_kernels  # noqa: E402
from kernels.ffn import ffn_sublayer as direct_ffn, ffn_weights, reference_ffn_sublayer  # noqa: E402
from kernels.int_shift import prepare_int_shift  # noqa: E402
from kernels.mat_shift import mat_shift as direct_mat_shift  # noqa: E402
from kernels.view_attention import PreparedViewWeights, SublayerWeights, view_attention_weights  # noqa: E402
from kernels.view_attention import view_attention_sublayer as direct_view_sublayer  # noqa: E402
from kernels.view_attention import view_attention as direct_view_attention  # noqa: E402
from kernels.ray_attention import RayAttentionWeights  # noqa: E402
from kernels.ray_attention import ray_attention as direct_ray_attention  # noqa: E402
from kernels.view_blend import PreparedBlendWeights  # noqa: E402
from kernels.view_blend import view_blend as direct_view_blend  # noqa: E402
from kernels.view_features import ViewFeatureWeights  # noqa: E402

DIM, HIDDEN, VIEWS = 16, 32, 5


def _packed(seed=0):
    torch.manual_seed(seed)
    return ShiftLinear.from_linear(torch.nn.Linear(DIM, HIDDEN), ShiftSpec()).export_codes()


def _ffn():
    torch.manual_seed(1)
    norm = torch.nn.LayerNorm(DIM, eps=1e-6)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    return ffn_weights(norm, FeedForward(DIM, HIDDEN).eval())


def _view_weights():
    torch.manual_seed(2)
    return PreparedViewWeights.from_dict(view_attention_weights(ViewAttention(DIM).eval()))


def _feature_weights():
    torch.manual_seed(6)
    return ViewFeatureWeights.from_linears(torch.nn.Linear(3 + 8, DIM), torch.nn.Linear(DIM, DIM))


def _ray_weights(core):
    torch.manual_seed(8)
    linears = [torch.randn(DIM, DIM) / 4 for _ in range(4)]
    return RayAttentionWeights.from_parts(torch.ones(DIM), torch.zeros(DIM), 1e-6, *linears, torch.randn(DIM), 2, core,
                                          scale=torch.full((2,), 0.3), hash_w=torch.randn(2, DIM // 2, 16),
                                          hash_b=torch.randn(2, 16) * 0.1)


def _ray_case(core):
    w = _ray_weights(core)
    return (torch.randn(3, 7, DIM), w.ln_w, w.ln_b, w.qkv_t, w.out_t, w.out_b, w.scale, w.hash_w, w.hash_b, w.eps,
            w.heads, w.core)


def _sublayer():
    torch.manual_seed(9)
    return SublayerWeights.from_modules(torch.nn.LayerNorm(DIM, eps=1e-6), ViewAttention(DIM).eval())


def _blend_weights():
    torch.manual_seed(7)
    return PreparedBlendWeights.from_linears(torch.nn.Linear(2 * DIM + 4, HIDDEN), torch.nn.Linear(HIDDEN, 1))


def _view_inputs(tokens=13):
    torch.manual_seed(3)
    mask = (torch.rand(tokens, VIEWS) > 0.3).float()
    mask[0] = 0  # a token no view sees
    return (torch.randn(tokens, DIM), torch.randn(tokens, VIEWS, DIM), torch.randn(tokens, VIEWS, 4), mask)


def _hash_inputs(rays=3, heads=2, samples=7, head_dim=8, bits=16):
    torch.manual_seed(4)
    return (torch.randn(rays, heads, samples, head_dim), torch.randn(heads, head_dim, bits),
            torch.randn(heads, bits) * 0.1, torch.randn(rays, heads, samples, head_dim))


def _int_weights(seed=5, dims=(DIM, HIDDEN)):
    torch.manual_seed(seed)
    layer = IntShiftLinear.from_linear(torch.nn.Linear(*dims), ShiftSpec(exponent_min=-6), 8)
    return prepare_int_shift(export_int_shift(layer))


def _source_views_case():
    from gnt_shiftadd.models.projector import SourceViews
    from kernels.source_views import prepare_source_views

    torch.manual_seed(9)
    c2w = torch.eye(4).repeat(3, 1, 1)
    c2w[:, 0, 3] = torch.tensor([-0.5, 0.0, 0.5])
    K = torch.tensor([[20.0, 0.0, 9.5], [0.0, 20.0, 7.0], [0.0, 0.0, 1.0]]).repeat(3, 1, 1)
    prepared = prepare_source_views(SourceViews(torch.rand(3, 15, 20, 3), torch.randn(3, 16, 4, 5), K, c2w))
    points = torch.randn(3, 7, 3) + torch.tensor([0.0, 0.0, 3.0])
    return (points, torch.tensor([0.0, 0.0, -1.0]), *prepared.kernel_arguments(), prepared.c2w, prepared.feat_channels)


def _front_end_weights():
    torch.manual_seed(10)
    return ViewFeatureWeights.from_linears(torch.nn.Linear(3 + 16, 12), torch.nn.Linear(12, DIM))


def _position_weights():
    from torch import nn

    from kernels.position_fusion import PositionFusionWeights

    torch.manual_seed(8)
    mlp = nn.Sequential(nn.Linear(DIM + 15 + 9, DIM), nn.ReLU(), nn.Linear(DIM, DIM))
    return PositionFusionWeights.from_mlp(mlp, DIM, 2)


def _position_fusion_case():
    w = _position_weights()
    return (torch.randn(5, 7, DIM), torch.randn(5, 7, 3), torch.randn(5, 9), w.q_t, w.code_t, w.dir_w, w.b1, w.w2_t,
            w.b2, w.num_freqs)


def _int_position_weights():
    """Variant n's fusion MLP (integer query, waves and fc2 layers, calibrated) in the integer kernel's layout."""
    from torch import nn

    from gnt_shiftadd.models.gnt import PositionFusion
    from gnt_shiftadd.models.encodings import PositionalEncoding
    from gnt_shiftadd.shiftadd.int_shift import integer_fusion_mlp
    from gnt_shiftadd.shiftadd.reparameterize import calibrate_int_shift_linears
    from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec
    from kernels.int_position_fusion import IntPositionFusionWeights

    torch.manual_seed(11)
    spec, encoding = ShiftSpec(exponent_min=-6), PositionalEncoding(3, 2)
    mlp = integer_fusion_mlp(nn.Sequential(nn.Linear(DIM + 15 + 9, DIM), nn.ReLU(), nn.Linear(DIM, DIM)), DIM, DIM + 3,
                             12, spec)
    calibrate_int_shift_linears(mlp, lambda: PositionFusion()(torch.randn(5, 7, DIM), torch.randn(5, 7, 3),
                                                              torch.randn(5, 9), mlp, encoding, {}))
    return IntPositionFusionWeights.from_mlp(mlp, DIM, 2)


def _int_view_parts():
    """(a ViewAttention with 8-bit integer layers, its IntViewWeights, view inputs)."""
    from kernels.int_view_attention import IntViewWeights

    torch.manual_seed(9)
    attention = integer_linears_(ViewAttention(DIM).eval())
    return attention, IntViewWeights.from_module(attention), _view_inputs()


def _int_view_case():
    _, w, inputs = _int_view_parts()
    return (*inputs, *w.tensors(), w.channels, w.hidden, w.per_token)


def _int_view_sublayer_case():
    from torch import nn

    from kernels.int_view_attention import IntViewSublayerWeights

    attention, w, inputs = _int_view_parts()
    sub = IntViewSublayerWeights.from_modules(nn.LayerNorm(DIM), attention)
    return (*inputs, *w.tensors(), *sub.tensors(), w.channels, w.hidden, sub.eps, True, w.per_token)


def _int_ray_weights():
    from torch import nn

    from gnt_shiftadd.models.transformers import RayAttention
    from gnt_shiftadd.shiftadd.hashed_attention import HashedQuadraticAttention
    from kernels.int_ray_attention import IntRayWeights

    torch.manual_seed(10)
    attention = RayAttention(DIM, 2).eval()
    attention.core = HashedQuadraticAttention(2, DIM // 2, 16)
    integer_linears_(attention)
    return IntRayWeights.from_modules(nn.LayerNorm(DIM, eps=1e-6), attention)


def _int_ray_case():
    w = _int_ray_weights()
    return (torch.randn(3, 8, DIM), *w.tensors(), w.eps, True, w.per_token)


def _blend_head_case():
    from torch import nn

    from kernels.blend_head import BlendHeadWeights

    torch.manual_seed(11)
    w = BlendHeadWeights.from_modules(nn.LayerNorm(DIM), nn.Linear(2 * DIM + 4, HIDDEN), nn.Linear(HIDDEN, 1),
                                      nn.Linear(DIM, 1))
    rays, samples = 3, 5
    return (torch.randn(rays, samples, DIM), torch.randn(rays, samples, VIEWS, DIM),
            torch.rand(rays, samples, VIEWS, 3), torch.randn(rays, samples, VIEWS, 4),
            (torch.rand(rays, samples, VIEWS) > 0.3).float(), *w.op_tensors(), w.eps)


def _op_cases():
    p = _packed()
    w = _ffn()
    vw = _view_weights()
    x, hw, hb, v = _hash_inputs()
    words = ops.hash_pack(x, hw, hb)
    return {
        "mat_shift": (torch.randn(11, DIM), p["codes"], p["channel_exponent"], p["bias"], p["exponent_min"],
                      p["exponent_max"], "relu"),
        "ffn_sublayer": (torch.randn(3, 7, DIM), w.fc1, w.b1, w.fc2, w.b2, w.router_w, w.router_b, w.ln_w, w.ln_b,
                         float(w.eps)),
        "view_attention": (*_view_inputs(), *vw.kernel_arguments()),
        "view_attention_sublayer": (*_view_inputs(), *vw.kernel_arguments(), *_sublayer().kernel_arguments(), 1e-6),
        "view_blend": (torch.randn(13, HIDDEN), *_view_inputs()[1:2], torch.rand(13, VIEWS, 3), *_view_inputs()[2:],
                       *_blend_weights().kernel_arguments()),
        "blend_head": _blend_head_case(),
        "ray_attention": _ray_case("hashed"),
        "view_features": (torch.rand(VIEWS, 3, 37), torch.randn(VIEWS, 8, 37),
                          (torch.rand(37, VIEWS) > 0.3).float(), *_feature_weights().tensors()),
        "source_views": _source_views_case(),
        "source_front_end": (*_source_views_case()[:-1], *_front_end_weights().tensors(),
                             *_front_end_weights().second_tensors()),
        "hash_pack": (x, hw, hb),
        "hashed_quadratic": (words, words.flip(2).contiguous(), v, torch.full((2,), 0.3), 16),
        "hashed_linear": (words, words.flip(2).contiguous(), v, 16, "hashed"),
        "int_shift": (torch.randn(11, DIM) * 2, *_int_weights().tensors(), 8, True, DIM, HIDDEN, "relu"),
        "int_ffn": (torch.randn(11, DIM), torch.randn(11, DIM), *_int_weights().tensors(),
                    *_int_weights(seed=6, dims=(HIDDEN, DIM)).tensors(), 8, True, DIM, HIDDEN),
        "position_fusion": _position_fusion_case(),
        "int_position_fusion": (torch.randn(5, 7, DIM), torch.randn(5, 7, 3), torch.randn(5, 9),
                                list(_int_position_weights().tensors()), 2),
        "int_view_attention": _int_view_case(),
        "int_ray_attention": _int_ray_case(),
        "int_view_sublayer": _int_view_sublayer_case(),
        "int_ffn_sublayer": (torch.randn(11, DIM), torch.rand(DIM) + 0.5, torch.randn(DIM) * 0.1, 1e-6,
                             *_int_weights().tensors(), *_int_weights(seed=6, dims=(HIDDEN, DIM)).tensors(), 8, True,
                             DIM, HIDDEN),
    }


@pytest.mark.parametrize("name", list(ops.OPS))
def test_opcheck(name):
    """Schema, fake (shape/dtype/stride) implementation, and tracing with dynamic shapes are all consistent."""
    torch.library.opcheck(ops.OPS[name], _op_cases()[name],
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_ops_equal_the_direct_kernel_calls():
    p = _packed()
    x = torch.randn(2, 9, DIM)
    assert torch.equal(ops.mat_shift(x, p, "relu"), direct_mat_shift(x, p, "relu"))
    w = _ffn()
    assert torch.equal(ops.ffn_sublayer(x, w), direct_ffn(x, w))
    vw = _view_weights()
    inputs = _view_inputs()
    assert torch.equal(ops.view_attention(*inputs, vw), direct_view_attention(*inputs, vw))
    bw = _blend_weights()
    _, features, ray_diff, mask = inputs
    hq, colors = torch.randn(13, HIDDEN), torch.rand(13, VIEWS, 3)
    assert torch.equal(ops.view_blend(hq, features, colors, ray_diff, mask, bw),
                       direct_view_blend(hq, features, colors, ray_diff, mask, bw))
    assert torch.equal(ops.view_attention_sublayer(*inputs, vw, _sublayer()),
                       direct_view_sublayer(*inputs, vw, _sublayer()))
    from kernels.position_fusion import position_fusion as direct_position_fusion

    q, points, dir_code = _position_fusion_case()[:3]
    assert torch.equal(ops.position_fusion(q, points, dir_code, _position_weights()),
                       direct_position_fusion(q, points, dir_code, _position_weights()))
    from kernels.int_position_fusion import int_position_fusion as direct_int_position_fusion

    iw = _int_position_weights()
    assert torch.equal(ops.int_position_fusion(q, points, dir_code, iw),
                       direct_int_position_fusion(q, points, dir_code, iw))
    for core in ("dense", "hashed"):
        rw, rx = _ray_weights(core), torch.randn(5, 7, DIM)
        assert torch.equal(ops.ray_attention(rx, rw), direct_ray_attention(rx, rw))
    from kernels.int_ray_attention import int_ray_attention as direct_int_ray_attention

    iw, ix = _int_ray_weights(), torch.randn(4, 8, DIM)
    assert torch.equal(ops.int_ray_attention(ix, iw), direct_int_ray_attention(ix, iw))
    # weights that went through the op's tensor arguments rebuild the same reference weights
    rebuilt = PreparedViewWeights.from_kernel_arguments(*vw.kernel_arguments())
    for key, value in vw.source.items():
        assert torch.equal(rebuilt.source[key], value), key


def test_gradients_take_the_differentiable_reference():
    w = _ffn()
    x = torch.randn(4, 6, DIM, requires_grad=True)
    out = ops.ffn_sublayer(x, w)
    out.square().sum().backward()
    expected_x = x.detach().clone().requires_grad_(True)
    reference_ffn_sublayer(expected_x.reshape(-1, DIM), w).square().sum().backward()
    torch.testing.assert_close(x.grad, expected_x.grad)

    p = _packed()
    y = torch.randn(5, DIM, requires_grad=True)
    ops.mat_shift(y, p).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_kernel_backed_blocks_trace_without_graph_breaks(tiny_config):
    cfg = tiny_config("model.dropout=0.0")
    tensors = SceneTensors(load_scene(cfg), torch.device("cpu"))
    model = build_model(cfg, torch.device("cpu")).eval()
    run = calibration_forward(model, tensors, cfg)
    reparameterize(model, ShiftAddConfig(ray_attention="hash_quadratic", attention_linears="shift"),
                   run_calibration=run)
    model.eval()
    with torch.no_grad():
        use_kernels(model, "tvm")
        view_block, ray_block = model.transformer.view_blocks[0], model.transformer.ray_blocks[0]
        assert isinstance(view_block.attn_sublayer, KernelViewAttentionSublayer)
        assert isinstance(ray_block.attn_sublayer, KernelRayAttentionSublayer)
        assert isinstance(view_block.ffn, KernelFFNSublayer) and isinstance(ray_block.ffn, KernelFFNSublayer)
        torch.manual_seed(5)
        rays, samples, views, dim = 3, 5, cfg.data.num_source_views, cfg.model.netwidth
        q = torch.randn(rays, samples, dim)
        features = torch.randn(rays, samples, views, dim)
        ray_diff = torch.randn(rays, samples, views, 4)
        mask = (torch.rand(rays, samples, views, 1) > 0.2).float()
        torch._dynamo.reset()
        compiled_view = torch.compile(view_block, backend="aot_eager", fullgraph=True)
        compiled_ray = torch.compile(ray_block, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled_view(q, features, ray_diff, mask), view_block(q, features, ray_diff, mask))
        torch.testing.assert_close(compiled_ray(q), ray_block(q))
