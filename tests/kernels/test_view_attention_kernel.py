"""Fused view-attention kernel vs its PyTorch reference, and the reference vs ViewAttention (dense and shift)."""
import pytest
import torch

tvm = pytest.importorskip("tvm")

from gnt_shiftadd.models.transformers import ViewAttention  # noqa: E402
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear  # noqa: E402
from kernels import view_attention as va  # noqa: E402
from kernels.build import cuda_target  # noqa: E402
from kernels.view_attention import (PreparedViewWeights, make_view_attention, reference_view_attention,  # noqa: E402
                                    view_attention, view_attention_weights)

_LINEARS = ("q_fc", "k_fc", "v_fc", "pos_fc1", "pos_fc2", "attn_fc1", "attn_fc2", "out_fc")


def _inputs(tokens, views, channels, seed=0, visible=0.6):
    """qp [T, C], features [T, V, C], ray_diff [T, V, 4], random 0/1 mask [T, V]."""
    generator = torch.Generator().manual_seed(seed)
    qp = torch.randn(tokens, channels, generator=generator)
    features = torch.randn(tokens, views, channels, generator=generator)
    ray_diff = torch.randn(tokens, views, 4, generator=generator)
    mask = (torch.rand(tokens, views, generator=generator) < visible).float()
    return qp, features, ray_diff, mask


def _module(channels, seed=0, shift=False):
    torch.manual_seed(seed)
    module = ViewAttention(channels).eval()
    if shift:
        for name in _LINEARS:
            setattr(module, name, ShiftLinear.from_linear(getattr(module, name)))
    return module


def _module_inputs(rays, samples, views, channels, seed=1):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(rays, samples, channels, generator=generator)
    features = torch.randn(rays, samples, views, channels, generator=generator)
    ray_diff = torch.randn(rays, samples, views, 4, generator=generator)
    mask = (torch.rand(rays, samples, views, 1, generator=generator) < 0.7).float()
    mask[0, 0] = 0  # a point no view sees
    return q, features, ray_diff, mask


@pytest.mark.parametrize("shift", [False, True], ids=["linear", "shift_linear"])
def test_reference_matches_module(shift):
    module = _module(32, shift=shift)
    q, features, ray_diff, mask = _module_inputs(3, 5, 6, 32)
    weights = view_attention_weights(module)
    if shift:  # decoded shift weights are exact signed powers of two (or 0)
        magnitude = weights["k"].abs()[weights["k"] != 0]
        assert torch.equal(torch.exp2(torch.round(torch.log2(magnitude))), magnitude)
    with torch.no_grad():
        expected = module(q, features, ray_diff, mask)
        mixed = reference_view_attention(module.q_fc(q), features, ray_diff, mask, weights)
        got = module.out_fc(mixed)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(mixed[0, 0]) == 0


@pytest.mark.parametrize("tokens", [1, 7, 13, 200])
@pytest.mark.parametrize("views", [1, 6, 10])
@pytest.mark.parametrize("channels", [16, 32, 64])
def test_kernel_matches_reference(tokens, views, channels):
    weights = view_attention_weights(_module(channels, seed=channels + views))
    qp, features, ray_diff, mask = _inputs(tokens, views, channels, seed=tokens)
    mask[0] = 0  # token 0: no view sees it
    out = view_attention(qp, features, ray_diff, mask, weights)
    assert out.shape == (tokens, channels) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_view_attention(qp, features, ray_diff, mask, weights),
                               rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(out[0]) == 0


def test_profiling_build_with_kv_from_memory_matches_reference():
    """make_view_attention(kv_input=True) (benchmarks/int_shift_options.py's "without k|v" row) computes the same
    output from a precomputed k|v as the full kernel does from the features."""
    from kernels.build import cpu_target, kernel_ready

    tokens, views, channels = 2 * va.TILE, 6, 32
    weights = view_attention_weights(_module(channels, seed=5))
    prepared = PreparedViewWeights.from_dict(weights)
    qp, features, ray_diff, mask = _inputs(tokens, views, channels, seed=3)
    kv = kernel_ready(torch.cat([features @ weights["k"].t(), features @ weights["v"].t()], dim=-1))
    kernel = tvm.compile(make_view_attention(cpu_target(), views, channels, prepared.hidden, kv_input=True),
                         target=tvm.target.Target(cpu_target()))["main"]
    out = torch.empty(tokens, channels)
    tile = va.TILE
    kernel(kernel_ready(qp).view(-1, tile, channels), kernel_ready(features).view(-1, tile, views, channels),
           kernel_ready(ray_diff).view(-1, tile, views, 4), kernel_ready(mask).view(-1, tile, views),
           kv.view(-1, tile, views, 2 * channels), *prepared.kernel_arguments()[1:], out.view(-1, tile, channels))
    torch.testing.assert_close(out, reference_view_attention(qp, features, ray_diff, mask, weights), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no CUDA schedule"):
        make_view_attention(cuda_target("sm_90"), views, channels, prepared.hidden, kv_input=True)


def test_odd_hidden_and_shift_weights():
    """C = 24 gives hidden = 3 (odd vector widths); ShiftLinear weights go through unchanged."""
    module = _module(24, shift=True)
    assert module.attn_fc1.out_features == 3
    weights = view_attention_weights(module)
    qp, features, ray_diff, mask = _inputs(45, 7, 24)
    out = view_attention(qp, features, ray_diff, mask, weights)
    torch.testing.assert_close(out, reference_view_attention(qp, features, ray_diff, mask, weights),
                               rtol=1e-5, atol=1e-5)


def test_all_masked_tokens_are_exactly_zero():
    weights = view_attention_weights(_module(32))
    qp, features, ray_diff, mask = _inputs(40, 6, 32)
    mask[::3] = 0
    out = view_attention(qp, features, ray_diff, mask, weights)
    assert torch.all(out[::3] == 0)
    assert torch.count_nonzero(out[1::3].abs().sum(-1)) == len(out[1::3])
    torch.testing.assert_close(out, reference_view_attention(qp, features, ray_diff, mask, weights),
                               rtol=1e-5, atol=1e-5)


def test_large_logits_stay_finite():
    """Logits in the thousands: the max-subtracted softmax must neither overflow nor lose the masked views."""
    weights = view_attention_weights(_module(32))
    weights["attn2_w"] = weights["attn2_w"] * 300.0
    weights["attn2_b"] = weights["attn2_b"] * 300.0
    qp, features, ray_diff, mask = _inputs(96, 6, 32)
    mask[5] = 0
    expected = reference_view_attention(qp, features, ray_diff, mask, weights)
    out = view_attention(qp, features, ray_diff, mask, weights)
    assert torch.isfinite(out).all() and torch.all(out[5] == 0)
    # a logit rounding error of eps * |logit| moves a weight by that much relative: allow for |logit| ~ 1e3
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_leading_dims_mask_layouts_dtypes_and_prepared_weights():
    weights = view_attention_weights(_module(16))
    prepared = PreparedViewWeights.from_dict(weights)
    qp, features, ray_diff, mask = _inputs(2 * 9, 6, 16)
    expected = reference_view_attention(qp, features, ray_diff, mask, weights).view(2, 9, 16)
    shaped = (qp.view(2, 9, 16), features.view(2, 9, 6, 16), ray_diff.view(2, 9, 6, 4))
    for mask_variant in (mask.view(2, 9, 6), mask.view(2, 9, 6, 1), mask.view(2, 9, 6).bool()):
        out = view_attention(*shaped, mask_variant, prepared)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    half = view_attention(*(x.half() for x in shaped), mask.view(2, 9, 6), prepared)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), expected, rtol=2e-2, atol=2e-2)
    assert view_attention(qp[:0], features[:0], ray_diff[:0], mask[:0], prepared).shape == (0, 16)


def test_misaligned_and_strided_inputs():
    """Views at odd offsets (TVM assumes 64-byte aligned buffers) and non-contiguous inputs are copied first."""
    weights = view_attention_weights(_module(32))
    qp, features, ray_diff, mask = _inputs(33, 6, 32)
    storage = torch.empty(features.numel() + 1)
    shifted = storage[1:].view_as(features)
    shifted.copy_(features)
    assert shifted.data_ptr() % 64
    strided_qp = torch.stack([qp, -qp], dim=-1)[..., 0]
    assert not strided_qp.is_contiguous()
    out = view_attention(strided_qp, shifted, ray_diff, mask, weights)
    torch.testing.assert_close(out, reference_view_attention(qp, features, ray_diff, mask, weights),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,message", [
    ("qp", "qp must be"), ("ray_diff", "ray_diff must be"), ("mask", "mask must be"), ("features", "features must be"),
])
def test_shape_errors_name_the_tensor(bad, message):
    weights = view_attention_weights(_module(16))
    tensors = dict(zip(("qp", "features", "ray_diff", "mask"), _inputs(8, 6, 16)))
    tensors[bad] = tensors[bad][..., :-1]
    with pytest.raises(ValueError, match=message):
        view_attention(tensors["qp"], tensors["features"], tensors["ray_diff"], tensors["mask"], weights)


def test_weight_shape_error():
    weights = view_attention_weights(_module(16))
    weights["attn1_w"] = weights["attn1_w"][:, :-1]
    with pytest.raises(ValueError, match="attn1_w"):
        PreparedViewWeights.from_dict(weights)


def test_autograd_uses_reference():
    weights = view_attention_weights(_module(16))
    qp, features, ray_diff, mask = _inputs(10, 6, 16)
    features.requires_grad_(True)
    out = view_attention(qp, features, ray_diff, mask, weights)
    out.sum().backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()


def test_failed_build_falls_back_with_one_warning(failing_kernel_builds):
    failing_kernel_builds("simulated for the view attention test")
    weights = view_attention_weights(_module(16))
    qp, features, ray_diff, mask = _inputs(9, 3, 16)
    with pytest.warns(RuntimeWarning, match="simulated for the view attention test"):
        out = view_attention(qp, features, ray_diff, mask, weights)
    torch.testing.assert_close(out, reference_view_attention(qp, features, ray_diff, mask, weights))


@pytest.mark.parametrize("views,channels,hidden", [(6, 32, 4), (10, 64, 8), (8, 24, 3)])
def test_cuda_build_sm90(views, channels, hidden, tmp_path):
    """Builds (and exports) for sm_90 without a GPU: shared-memory stages, barriers, one block per tile."""
    target = cuda_target("sm_90")
    library = tvm.compile(make_view_attention(target, views, channels, hidden), target=tvm.target.Target(target))
    source = library.mod.imports[0].inspect_source("cuda")
    assert "__shared__" in source and "__syncthreads" in source and "blockIdx.x" in source
    library.export_library(str(tmp_path / "view_attention_cuda.so"))


def test_fixed_point_shift_layers_are_refused():
    from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec

    module = _module(16)
    module.attn_fc1 = ShiftLinear.from_linear(module.attn_fc1, ShiftSpec(fixed_point_bits=16))
    with pytest.raises(ValueError, match="fixed point"):
        view_attention_weights(module)


@pytest.mark.parametrize("shift", [False, True], ids=["linear", "shift_linear"])
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_fused_sublayer_equals_the_model_block_half(shift, tokens):
    """x + out_fc(attention(q_fc(LN(x)))) in one kernel == PreNormViewAttention with the module's own layers."""
    from torch import nn

    from gnt_shiftadd.models.transformers import PreNormViewAttention
    from kernels.apply import KernelViewAttentionSublayer

    module = _module(32, seed=tokens, shift=shift)
    norm = nn.LayerNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.1)
    x, features, ray_diff, mask = _inputs(tokens, 6, 32, seed=tokens)
    mask[0] = 0
    leaf = KernelViewAttentionSublayer(norm, module)
    shaped = (x.view(1, tokens, 32), features.view(1, tokens, 6, 32), ray_diff.view(1, tokens, 6, 4),
              mask.view(1, tokens, 6, 1))
    with torch.no_grad():
        expected = PreNormViewAttention()(*shaped, norm, module)
        got = leaf(*shaped, norm, module)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert leaf.kernels_ran == {"view_attention_sublayer": "tvm"}


def test_sublayer_refusals():
    from torch import nn

    from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec
    from kernels.dispatch import KernelNotApplicable
    from kernels.apply import KernelViewAttentionSublayer
    from kernels.view_attention import make_view_attention_sublayer

    module = _module(16)
    module.k_fc = ShiftLinear.from_linear(module.k_fc, ShiftSpec(fixed_point_bits=8))
    with pytest.raises(KernelNotApplicable, match="fixed point"):
        KernelViewAttentionSublayer(nn.LayerNorm(16), module)
    with pytest.raises(ValueError, match="CPU \\(llvm\\) schedule only"):
        make_view_attention_sublayer(cuda_target("sm_90"), 6, 32, 4, 1e-6)
