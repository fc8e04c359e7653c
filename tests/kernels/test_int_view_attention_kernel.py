"""kernels/int_view_attention.py: the view attention with its integer shift layers in one VNNI kernel."""
import pytest
import torch
from torch import nn

from gnt_shiftadd.models.transformers import ViewAttention
from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear, rounding_tie_distance
from gnt_shiftadd.shiftadd.reparameterize import calibrate_int_shift_linears
from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec
from kernels.dispatch import recording
from kernels.int_shift import vnni_available
from kernels.int_view_attention import IntViewWeights, int_view_attention, reference_int_view_attention

pytest.importorskip("tvm")
needs_vnni = pytest.mark.skipif(not vnni_available(), reason="AVX-512 VNNI CPU needed")


def _integer_attention(channels: int = 32, seed: int = 0, act_scale: str = "per_token") -> ViewAttention:
    """A ViewAttention whose layers are 8-bit IntShiftLinear: per token (as g and j convert them), or per tensor (k),
    calibrated on random inputs by the conversion's own calibration and the absmax then lowered to 0.8x so that the
    largest activations saturate too."""
    torch.manual_seed(seed)
    attention = ViewAttention(channels).eval()
    for name, layer in list(attention.named_children()):
        if isinstance(layer, nn.Linear):
            setattr(attention, name, IntShiftLinear.from_linear(layer, ShiftSpec(exponent_min=-6), 8,
                                                                act_scale=act_scale).eval())
    if act_scale == "per_tensor":
        qp, features, ray_diff, mask = _inputs(200, channels=channels, seed=seed + 100)
        calibrate_int_shift_linears(attention, lambda: attention(qp[:, None], features[:, None], ray_diff[:, None],
                                                                 mask[:, None, :, None]))
        for layer in attention.children():
            if isinstance(layer, IntShiftLinear):
                layer.activation_absmax.mul_(0.8)
    return attention


def _module_output(attention, qp, features, ray_diff, mask):
    """ViewAttention between q_fc and out_fc, on the modules themselves."""
    return attention.attend(qp, features, ray_diff, mask[..., None])


def _inputs(tokens, views=6, channels=32, seed=1):
    torch.manual_seed(seed)
    mask = (torch.rand(tokens, views) > 0.25).float()
    mask[: min(3, tokens)] = 0  # tokens no view sees
    return (torch.randn(tokens, channels), torch.randn(tokens, views, channels), torch.randn(tokens, views, 4) * 0.3,
            mask)


@needs_vnni
@pytest.mark.parametrize("tokens,views", [(1, 6), (65, 6), (130, 3), (300, 8)])
@pytest.mark.parametrize("act_scale", ["per_token", "per_tensor"])
def test_kernel_matches_the_integer_modules(tokens, views, act_scale):
    attention = _integer_attention(act_scale=act_scale)
    weights = IntViewWeights.from_module(attention)
    qp, features, ray_diff, mask = _inputs(tokens, views)
    with torch.no_grad():
        expected = _module_output(attention, qp, features, ray_diff, mask)
        assert torch.equal(reference_int_view_attention(qp, features, ray_diff, mask, weights), expected)
        record = {}
        with recording(record):
            got = int_view_attention(qp, features, ray_diff, mask, weights)
    assert record == {"int_view_attention": "tvm"}
    # every integer layer is bit-exact (a quantization step apart would show as ~1e-2); the softmax and the sum
    # over the views are fp32 in another order
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[: min(3, tokens)]) == 0


@needs_vnni
@pytest.mark.parametrize("views", [1, 5])
@pytest.mark.parametrize("act_scale", ["per_token", "per_tensor"])
def test_narrow_hidden_layers_and_partial_groups_of_views(views, act_scale):
    """C = 16 gives 2 hidden units (the 4-wide rows are padded within their group of four) and 1 or 5 views leave
    a group of four views part empty: still every integer layer bit-exact."""
    attention = _integer_attention(channels=16, act_scale=act_scale)
    weights = IntViewWeights.from_module(attention)
    qp, features, ray_diff, mask = _inputs(70, views, channels=16)
    with torch.no_grad():
        expected = _module_output(attention, qp, features, ray_diff, mask)
        got = int_view_attention(qp, features, ray_diff, mask, weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layers_the_kernel_does_not_compute_are_refused():
    dense = ViewAttention(32)
    with pytest.raises(ValueError, match="k_fc is not an 8-bit IntShiftLinear"):
        IntViewWeights.from_module(dense)
    attention = _integer_attention()
    attention.pos_fc1 = IntShiftLinear.from_linear(nn.Linear(4, 4), ShiftSpec(exponent_min=-6), 8,
                                                   act_scale="per_tensor")
    attention.pos_fc1.activation_absmax.fill_(1.0)
    with pytest.raises(ValueError, match=r"mix activation scales \['per_tensor', 'per_token'\]"):
        IntViewWeights.from_module(attention)
    apart = _integer_attention(act_scale="per_tensor")
    apart.v_fc.activation_absmax.mul_(1.5)  # k and v share the features' quantization: one absmax
    with pytest.raises(ValueError, match="k_fc and v_fc: .*different activation absmax"):
        IntViewWeights.from_module(apart)
    with pytest.raises(ValueError, match="C % 16 == 0"):
        IntViewWeights.from_module(_integer_attention(channels=24))


@needs_vnni
def test_bad_shapes_are_named():
    weights = IntViewWeights.from_module(_integer_attention())
    qp, features, ray_diff, mask = _inputs(5)
    with pytest.raises(ValueError, match=r"int_view_attention: expected qp \[5, 32\]"):
        int_view_attention(qp[:4], features, ray_diff, mask, weights)


@needs_vnni
def test_the_leaf_swaps_in_for_integer_view_attention_and_keeps_the_module_result():
    from kernels.apply import KernelConfig, KernelIntViewAttention, use_kernels_

    attention = _integer_attention(seed=3)
    holder = nn.ModuleDict({"attn": attention}).eval()
    qp, features, ray_diff, mask = _inputs(40)
    q = torch.randn(40, 32)
    shaped = (q.view(4, 10, 32), features.view(4, 10, 6, 32), ray_diff.view(4, 10, 6, 4), mask.view(4, 10, 6, 1))
    with torch.no_grad():
        expected = attention(*shaped)
        summary = use_kernels_(holder, KernelConfig("tvm"))
        got = holder["attn"](*shaped)
    assert isinstance(holder["attn"], KernelIntViewAttention) and summary["KernelIntViewAttention"] == 1
    assert summary["KernelIntShiftLinear"] == 2  # q_fc and out_fc on their own integer kernel
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_vnni
def test_the_leaf_runs_the_modules_when_gradients_are_needed():
    from kernels.apply import KernelIntViewAttention

    attention = _integer_attention(seed=4)
    leaf = KernelIntViewAttention(attention)
    qp, features, ray_diff, mask = _inputs(20)
    qp.requires_grad_(True)
    record = {}
    with recording(record):
        got = leaf.attend(qp, features, ray_diff, mask)
    assert record == {"int_view_attention": "reference"} and got.requires_grad
    torch.testing.assert_close(got.detach(), _module_output(attention, qp.detach(), features, ray_diff, mask))


@needs_vnni
@pytest.mark.parametrize("norm_in_kernel", [True, False])
@pytest.mark.parametrize("tokens,views", [(1, 6), (300, 6), (77, 8)])
@pytest.mark.parametrize("act_scale", ["per_token", "per_tensor"])
def test_sublayer_kernel_matches_the_modules(norm_in_kernel, tokens, views, act_scale):
    """LN + q_fc + the attention + out_fc + residual in one kernel: every token whose LN output and out_fc input are
    not within a hair of a rounding tie matches the modules to fp32 noise (a quantization step apart would show as
    ~1e-2); the others may be a step apart, no more."""
    import torch.nn.functional as F

    from kernels.int_view_attention import IntViewSublayerWeights, int_view_sublayer, reference_from_weights, \
        reference_int_view_sublayer

    attention = _integer_attention(seed=5, act_scale=act_scale)
    norm = nn.LayerNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0.0, 0.1)
    weights, sub = IntViewWeights.from_module(attention), IntViewSublayerWeights.from_modules(norm, attention)
    _, features, ray_diff, mask = _inputs(tokens, views)
    x = torch.randn(tokens, 32) * 2
    with torch.no_grad():
        expected = x + attention(norm(x)[:, None], features[:, None], ray_diff[:, None], mask[:, None, :, None])[:, 0]
        assert torch.equal(reference_int_view_sublayer(x, features, ray_diff, mask, weights, sub), expected)
        normed = F.layer_norm(x, (32,), sub.ln_w, sub.ln_b, sub.eps)
        attended = reference_int_view_attention(reference_from_weights(normed, sub.q), features, ray_diff, mask,
                                                weights)
    record = {}
    with recording(record):
        got = int_view_sublayer(x, features, ray_diff, mask, weights, sub, norm_in_kernel)
    assert record == {"int_view_sublayer": "tvm"}
    calibrated = (None, None) if sub.per_token else (sub.act_absmax[0], sub.act_absmax[1])
    clear = rounding_tie_distance(attended, absmax=calibrated[1]).amin(dim=-1) > 1e-5
    if norm_in_kernel:
        clear &= rounding_tie_distance(normed, absmax=calibrated[0]).amin(dim=-1) > 1e-5
    error = (got - expected).abs().amax(dim=-1)
    assert clear.float().mean() >= 0.9
    assert error[clear].max() <= 1e-5 and error.max() <= 0.1


@needs_vnni
def test_profiling_builds_leave_each_part_out_and_refuse_unknown_parts():
    """make_int_view_attention(leave_out=...) (benchmarks/kernel_anatomy.py's time per part): each part left out
    changes the sublayer's output (it is really not computed); a part it does not have is refused by name."""
    import tvm

    from kernels.build import cpu_target
    from kernels.int_view_attention import PARTS, IntViewSublayerWeights, make_int_view_attention

    attention = _integer_attention(seed=3, act_scale="per_tensor")
    weights = IntViewWeights.from_module(attention)
    sub = IntViewSublayerWeights.from_modules(nn.LayerNorm(32, eps=1e-6), attention)
    _, features, ray_diff, mask = _inputs(40)
    x = torch.randn(40, 1, 32)

    def run(left_out):
        main = tvm.compile(make_int_view_attention(6, 32, sublayer=True, eps=sub.eps, per_token=False,
                                                   leave_out=frozenset(left_out)),
                           target=tvm.target.Target(cpu_target()))["main"]
        out = torch.zeros(40, 1, 32)
        main(x, x, sub.ln_w, sub.ln_b, features, ray_diff.reshape(40, -1), mask, *weights.tensors(),
             *sub.tensors()[2:], out)
        return out

    full = run(())
    for part in PARTS:
        assert not torch.equal(run((part,)), full), part
    with pytest.raises(ValueError, match="hashing"):
        make_int_view_attention(6, 32, sublayer=True, eps=1e-6, per_token=False, leave_out=frozenset({"hashing"}))


@needs_vnni
def test_the_sublayer_leaf_swaps_in_for_integer_view_blocks_and_runs_the_modules_for_gradients():
    from gnt_shiftadd.models.transformers import ViewTransformerBlock
    from kernels.apply import KernelConfig, KernelIntViewAttentionSublayer, use_kernels_

    block = ViewTransformerBlock(32, 128).eval()
    block.attn = _integer_attention(seed=6)
    q, features, ray_diff, mask = (t.view(4, 10, *t.shape[1:]) for t in _inputs(40))
    mask = mask[..., None]
    with torch.no_grad():
        expected = block.attn_sublayer(q, features, ray_diff, mask, block.attn_norm, block.attn)
        summary = use_kernels_(block, KernelConfig("tvm"))
        got = block.attn_sublayer(q, features, ray_diff, mask, block.attn_norm, block.attn)
    leaf = block.attn_sublayer
    assert isinstance(leaf, KernelIntViewAttentionSublayer) and summary["KernelIntViewAttentionSublayer"] == 1
    assert "KernelIntViewAttention" not in summary and "KernelIntShiftLinear" not in summary
    assert leaf.kernels_ran == {"int_view_sublayer": "tvm"}
    torch.testing.assert_close(got, expected, rtol=0, atol=0.1)
    leaf.kernels_ran = {}
    q.requires_grad_(True)
    out = leaf(q, features, ray_diff, mask, block.attn_norm, block.attn)
    assert leaf.kernels_ran == {"int_view_sublayer": "reference"} and out.requires_grad
    torch.testing.assert_close(out.detach(), expected)


@needs_vnni
def test_a_sublayer_mixing_activation_scales_is_refused():
    """q_fc/out_fc per token around a per-tensor attention: one kernel computes one mode, so the call is refused
    with the reason, and the leaf is not applicable (the attention alone is swapped)."""
    from kernels.apply import KernelIntViewAttentionSublayer, KernelNotApplicable
    from kernels.int_view_attention import IntViewSublayerWeights, int_view_sublayer

    per_tensor, per_token = _integer_attention(seed=7, act_scale="per_tensor"), _integer_attention(seed=7)
    norm = nn.LayerNorm(32)
    weights, sub = IntViewWeights.from_module(per_tensor), IntViewSublayerWeights.from_modules(norm, per_token)
    _, features, ray_diff, mask = _inputs(5)
    with pytest.raises(ValueError, match="different activation scales"):
        int_view_sublayer(torch.randn(5, 32), features, ray_diff, mask, weights, sub)
    per_tensor.q_fc, per_tensor.out_fc = per_token.q_fc, per_token.out_fc
    with pytest.raises(KernelNotApplicable, match="different activation scales"):
        KernelIntViewAttentionSublayer(norm, per_tensor)
