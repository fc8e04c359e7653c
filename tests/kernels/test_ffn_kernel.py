"""Fused FFN sublayer kernel (LN + FFN + residual, MoE routing in-kernel) vs its reference and the modules."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

tvm = pytest.importorskip("tvm")

from gnt_shiftadd.models.transformers import FeedForward  # noqa: E402
from gnt_shiftadd.shiftadd.moe import MoEFeedForward  # noqa: E402
from gnt_shiftadd.shiftadd.reparameterize import shift_feedforward  # noqa: E402
from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec  # noqa: E402
from gnt_shiftadd.experiment import build_model  # noqa: E402
from kernels import build  # noqa: E402
from kernels.apply import use_kernels  # noqa: E402
from kernels.ffn import ffn_sublayer, ffn_weights, make_ffn_sublayer, reference_ffn_sublayer, route_tokens  # noqa: E402


def _norm(dim, seed=0):
    torch.manual_seed(seed)
    norm = nn.LayerNorm(dim, eps=1e-6)
    nn.init.normal_(norm.weight, 1.0, 0.3)
    nn.init.normal_(norm.bias, 0.0, 0.3)
    return norm


def _moe(dim, hidden, router_std=1.0, seed=0):
    torch.manual_seed(seed)
    dense = FeedForward(dim, hidden)
    moe = MoEFeedForward([dense, shift_feedforward(dense, ShiftSpec())], dim=dim, dispatch="gather")
    nn.init.normal_(moe.router.weight, 0.0, router_std)
    return moe.eval()


def _module_output(norm, ff, x):
    with torch.no_grad():
        return x + ff(norm(x))


@pytest.mark.parametrize("dim,hidden,tokens", [(32, 128, 1000), (32, 128, 1), (16, 64, 13), (24, 40, 9),
                                               (64, 256, 33), (12, 12, 8)])
@pytest.mark.parametrize("kind", ["dense", "shift", "moe"])
def test_matches_reference_and_modules(dim, hidden, tokens, kind):
    norm = _norm(dim)
    torch.manual_seed(1)
    dense = FeedForward(dim, hidden).eval()
    ff = {"dense": dense, "shift": shift_feedforward(dense, ShiftSpec()).eval(), "moe": _moe(dim, hidden)}[kind]
    weights = ffn_weights(norm, ff)
    x = torch.randn(tokens, dim) * 2
    out = ffn_sublayer(x, weights)
    torch.testing.assert_close(out, reference_ffn_sublayer(x, weights), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out, _module_output(norm, ff, x), rtol=1e-5, atol=2e-5)


def test_moe_routes_both_ways_and_handles_an_empty_expert():
    dim, hidden = 32, 128
    norm, moe = _norm(dim), _moe(dim, hidden)
    x = torch.randn(400, dim)
    weights = ffn_weights(norm, moe)
    chosen = route_tokens(x, weights)
    assert 0 < int(chosen.sum()) < x.shape[0]  # both experts used
    torch.testing.assert_close(ffn_sublayer(x, weights), _module_output(norm, moe, x), rtol=1e-5, atol=2e-5)
    for bias in (-100.0, 100.0):  # every token to one expert: the other one is empty
        with torch.no_grad():
            moe.router.bias.copy_(torch.tensor([0.0, bias]))
        weights = ffn_weights(norm, moe)
        assert int(route_tokens(x, weights).sum()) in (0, x.shape[0])
        torch.testing.assert_close(ffn_sublayer(x, weights), _module_output(norm, moe, x), rtol=1e-5, atol=2e-5)


def test_leading_dims_and_empty_input():
    norm, ff = _norm(16), FeedForward(16, 32).eval()
    weights = ffn_weights(norm, ff)
    x = torch.randn(2, 3, 16)
    out = ffn_sublayer(x, weights)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out, _module_output(norm, ff, x), rtol=1e-5, atol=2e-5)
    assert ffn_sublayer(torch.randn(0, 16), weights).shape == (0, 16)


def test_bad_inputs_and_unsupported_modules():
    norm, ff = _norm(16), FeedForward(16, 32).eval()
    weights = ffn_weights(norm, ff)
    with pytest.raises(ValueError, match="16"):
        ffn_sublayer(torch.randn(4, 15), weights)
    with pytest.raises(ValueError, match="float32"):
        ffn_sublayer(torch.randn(4, 16).half(), weights)
    with pytest.raises(TypeError, match="unsupported FFN"):
        ffn_weights(norm, nn.Linear(16, 16))
    moe = _moe(16, 32)
    moe.gate_scaling = "probability"
    with pytest.raises(TypeError, match="straight-through"):
        ffn_weights(norm, moe)


@pytest.mark.parametrize("experts", [1, 2])
def test_cuda_kernel_builds_without_a_gpu(experts):
    target = build.cuda_target("sm_90")
    assert tvm.compile(make_ffn_sublayer(target, 32, 128, experts, 1e-6), target=tvm.target.Target(target))


def test_gemm_path_matches_reference_and_refuses_moe():
    from kernels.ffn import gemm_ffn_sublayer

    dim, hidden = 24, 40
    norm = _norm(dim)
    dense = FeedForward(dim, hidden).eval()
    x = torch.randn(3, 11, dim)
    for ff in (dense, shift_feedforward(dense, ShiftSpec()).eval()):
        w = ffn_weights(norm, ff)
        torch.testing.assert_close(gemm_ffn_sublayer(x, w), reference_ffn_sublayer(x.reshape(-1, dim), w).reshape(x.shape),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one expert"):
        gemm_ffn_sublayer(x, ffn_weights(norm, _moe(dim, hidden)))


@pytest.mark.parametrize("gemm", ["tvm", "blas"])
def test_fixed_point_shift_ffn_keeps_its_input_rounding(tiny_config, gemm, monkeypatch):
    """A 16-bit fixed-point shift FFN rounds its activations before each shift layer; the fused kernel (and the
    BLAS path) compute in float, so the swap must keep such a block on the reference, not drop the rounding."""
    monkeypatch.setattr("kernels.dispatch._WARNED", set())  # each case warns afresh
    cfg = tiny_config("model.dropout=0.0")
    model = build_model(cfg, torch.device("cpu")).eval()
    spec = ShiftSpec(fixed_point_bits=16)
    block = model.transformer.ray_blocks[0]
    block.ff = shift_feedforward(block.ff, spec).eval()
    with torch.no_grad():
        block.ff_norm.weight.mul_(1e-3)  # FFN inputs ~1e-3: 16.16 rounding (steps of 2^-16) changes them by ~1%
        block.attn.out_fc.weight.zero_()  # the block's output is then exactly x + FFN(LN(x))
        block.attn.out_fc.bias.zero_()
    x = torch.randn(3, 5, cfg.model.netwidth) * 1e-2
    with torch.no_grad():
        expected = block.ff(block.ff_norm(x))
        fc1, fc2 = block.ff.fc1, block.ff.fc2
        unrounded = F.linear(F.relu(F.linear(block.ff_norm(x), fc1.effective_weight(), fc1.bias)),
                             fc2.effective_weight(), fc2.bias)
        assert (expected - unrounded).abs().max() > 1e-6  # the rounding matters for this input
        with pytest.warns(RuntimeWarning, match="fixed point"):
            use_kernels(model, "tvm", gemm=gemm)
        got = model.transformer.ray_blocks[0](x) - x
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-8)
