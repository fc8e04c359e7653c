"""kernels/int_ray_attention.py: a ray block's attention half with integer shift layers and the hashed core in one
VNNI kernel per ray."""
import pytest
import torch
from torch import nn

from gnt_shiftadd.models.transformers import RayAttention, RayTransformerBlock
from gnt_shiftadd.shiftadd.hashed_attention import HashedQuadraticAttention
from gnt_shiftadd.shiftadd.int_shift import IntShiftLinear
from gnt_shiftadd.shiftadd.reparameterize import calibrate_int_shift_linears
from gnt_shiftadd.shiftadd.shift_linear import ShiftSpec
from kernels.dispatch import recording
from kernels.int_ray_attention import IntRayWeights, int_ray_attention, quantization_margins, \
    reference_int_ray_attention
from kernels.int_shift import vnni_available

pytest.importorskip("tvm")
needs_vnni = pytest.mark.skipif(not vnni_available(), reason="AVX-512 VNNI CPU needed")


def _integer(layer: nn.Linear, act_scale: str = "per_token") -> IntShiftLinear:
    return IntShiftLinear.from_linear(layer, ShiftSpec(exponent_min=-6), 8, act_scale=act_scale).eval()


def _block(channels: int = 32, heads: int = 4, n_bits: int = 16, seed: int = 0,
           act_scale: str = "per_token") -> RayTransformerBlock:
    """A ray block as j converts it: integer q/k/v/out layers, the hashed quadratic core (its hasher fitted on the
    block's own queries and keys), a LayerNorm with non-trivial gain and bias. act_scale per_tensor (k): calibrated
    on random rays by the conversion's own calibration, then the absmax lowered to 0.8x so that the largest
    activations saturate too."""
    torch.manual_seed(seed)
    block = RayTransformerBlock(channels, heads, 4 * channels).eval()
    attention = block.attn
    attention.core = HashedQuadraticAttention(heads, channels // heads, n_bits)
    with torch.no_grad():
        block.attn_norm.weight.uniform_(0.5, 1.5)
        block.attn_norm.bias.normal_(0.0, 0.1)
        normed = block.attn_norm(torch.randn(64, 24, channels))
        split = lambda t: attention._split_heads(t)  # noqa: E731
        attention.core.calibrate(split(attention.q_fc(normed)), split(attention.k_fc(normed)), None)
    for name in ("q_fc", "k_fc", "v_fc", "out_fc"):
        setattr(attention, name, _integer(getattr(attention, name), act_scale))
    if act_scale == "per_tensor":
        calibrate_int_shift_linears(block, lambda: block.attn(block.attn_norm(torch.randn(16, 24, channels) * 2)))
        for name in ("q_fc", "k_fc", "v_fc", "out_fc"):
            getattr(attention, name).activation_absmax.mul_(0.8)
    return block


def _modules(block, x):
    with torch.no_grad():
        return x + block.attn(block.attn_norm(x))


def test_reference_is_the_modules_forward():
    block = _block()
    x = torch.randn(7, 24, 32) * 2
    weights = IntRayWeights.from_modules(block.attn_norm, block.attn)
    assert torch.equal(reference_int_ray_attention(x, weights), _modules(block, x))


@needs_vnni
@pytest.mark.parametrize("rays,samples,channels,heads,n_bits", [(1, 24, 32, 4, 16), (37, 24, 32, 4, 16),
                                                                (9, 16, 32, 4, 32), (5, 12, 64, 4, 16),
                                                                (3, 7, 16, 2, 16)])
@pytest.mark.parametrize("norm_in_kernel", [True, False])
@pytest.mark.parametrize("act_scale", ["per_token", "per_tensor"])
def test_kernel_matches_the_modules(rays, samples, channels, heads, n_bits, norm_in_kernel, act_scale):
    """Every ray whose roundings are not within a hair of a tie (`quantization_margins`) matches the modules to fp32
    summation-order noise: a quantization step apart in any integer layer or a flipped code bit would show as
    ~1e-2. The others may differ by such a step, and no more. Per token (j) and with calibrated per-tensor scales
    (k)."""
    block = _block(channels, heads, n_bits, act_scale=act_scale)
    weights = IntRayWeights.from_modules(block.attn_norm, block.attn)
    torch.manual_seed(1)
    x = torch.randn(rays, samples, channels) * 2 + 0.3
    record = {}
    with recording(record):
        got = int_ray_attention(x, weights, norm_in_kernel)
    assert record == {"int_ray_attention": "tvm"}
    expected = _modules(block, x)
    error = (got - expected).abs().amax(dim=(1, 2))
    clear = quantization_margins(x, weights) > 1e-5
    assert clear.float().mean() >= 0.5
    assert error[clear].max() <= 1e-5
    assert error.max() <= 0.1


@needs_vnni
def test_one_rounding_per_token_serves_q_k_and_v():
    """The LN from PyTorch and the core made trivial (every key the same code: uniform weights; v = the mean of
    identical rows when all tokens of a ray are equal): the whole sublayer then matches the modules bit for bit,
    which needs q|k|v from one quantization to equal the three layers' own."""
    block = _block(seed=2)
    with torch.no_grad():
        block.attn.core.hasher.weight.zero_()  # every projection = the bias: one code for all tokens
    weights = IntRayWeights.from_modules(block.attn_norm, block.attn)
    x = torch.randn(6, 1, 32).expand(6, 8, 32).contiguous()  # 8 equal tokens per ray
    got = int_ray_attention(x, weights, norm_in_kernel=False)
    assert torch.equal(got, _modules(block, x))


def test_layers_the_kernel_does_not_compute_are_refused():
    block = _block()
    dense_core = _block()
    dense_core.attn.core = RayAttention(32, 4).core
    with pytest.raises(ValueError, match="HashedQuadraticAttention core"):
        IntRayWeights.from_modules(dense_core.attn_norm, dense_core.attn)
    dense_linear = _block()
    dense_linear.attn.q_fc = nn.Linear(32, 32)
    with pytest.raises(ValueError, match="q_fc is not an 8-bit IntShiftLinear"):
        IntRayWeights.from_modules(dense_linear.attn_norm, dense_linear.attn)
    mixed = _block()
    mixed.attn.v_fc = _integer(nn.Linear(32, 32, bias=False), act_scale="per_tensor")
    mixed.attn.v_fc.activation_absmax.fill_(1.0)
    with pytest.raises(ValueError, match=r"mix activation scales \['per_tensor', 'per_token'\]"):
        IntRayWeights.from_modules(mixed.attn_norm, mixed.attn)
    apart = _block(act_scale="per_tensor")
    apart.attn.k_fc.activation_absmax.mul_(1.5)  # q, k and v share one quantization: one absmax
    with pytest.raises(ValueError, match="q_fc, k_fc, v_fc: .*different activation absmax"):
        IntRayWeights.from_modules(apart.attn_norm, apart.attn)
    with pytest.raises(ValueError, match="16 or 32 hash bits"):
        narrow = _block(n_bits=8)
        IntRayWeights.from_modules(narrow.attn_norm, narrow.attn)
    with pytest.raises(ValueError, match="affine nn.LayerNorm"):
        IntRayWeights.from_modules(nn.Identity(), block.attn)


@needs_vnni
def test_bad_inputs_are_named():
    block = _block()
    weights = IntRayWeights.from_modules(block.attn_norm, block.attn)
    with pytest.raises(ValueError, match=r"int_ray_attention: x must be \[rays, samples, C=32\], got \(4, 32\)"):
        int_ray_attention(torch.randn(4, 32), weights)


@needs_vnni
def test_the_leaf_swaps_in_and_runs_the_modules_when_gradients_are_needed():
    from kernels.apply import KernelConfig, KernelIntRayAttentionSublayer, use_kernels_

    block = _block(seed=3)
    x = torch.randn(5, 24, 32)
    expected = _modules(block, x)
    with torch.no_grad():
        summary = use_kernels_(block, KernelConfig("tvm"))
        got = block.attn_sublayer(x, block.attn_norm, block.attn)
    assert isinstance(block.attn_sublayer, KernelIntRayAttentionSublayer)
    assert summary["KernelIntRayAttentionSublayer"] == 1 and "KernelIntShiftLinear" not in summary
    torch.testing.assert_close(got, expected, rtol=0, atol=0.1)
    assert block.attn_sublayer.kernels_ran == {"int_ray_attention": "tvm"}
    block.attn_sublayer.kernels_ran = {}
    x.requires_grad_(True)
    out = block.attn_sublayer(x, block.attn_norm, block.attn)
    assert block.attn_sublayer.kernels_ran == {"int_ray_attention": "reference"} and out.requires_grad
    torch.testing.assert_close(out.detach(), expected)


@needs_vnni
def test_a_head_with_a_negative_scale_gets_its_query_codes_flipped():
    """The softmax by table assumes the largest logit comes with the fewest differing bits; a head whose learned
    scale went negative has its query codes flipped (IntRayWeights.flip), so its weights still match the modules."""
    block = _block(seed=7)
    with torch.no_grad():
        block.attn.core.scale[1] = -0.4
        block.attn.core.scale[3] = -1.3
    weights = IntRayWeights.from_modules(block.attn_norm, block.attn)
    assert weights.flip.tolist() == [0, 0xFFFF, 0, 0xFFFF]
    torch.manual_seed(8)
    x = torch.randn(23, 24, 32) * 2
    got = int_ray_attention(x, weights, norm_in_kernel=False)
    expected = _modules(block, x)
    clear = quantization_margins(x, weights) > 1e-5
    assert clear.float().mean() >= 0.5
    assert (got - expected).abs().amax(dim=(1, 2))[clear].max() <= 1e-5
