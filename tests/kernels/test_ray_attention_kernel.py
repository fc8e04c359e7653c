"""The fused ray-attention sublayer kernel vs its PyTorch reference, and the reference vs the model's own
PreNormAttention(LayerNorm, RayAttention) with a dense or hashed-quadratic core (nn.Linear or shift layers)."""
import math

import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from gnt_shiftadd.models.transformers import PreNormAttention, RayAttention  # noqa: E402
from gnt_shiftadd.shiftadd.hashed_attention import HashedQuadraticAttention  # noqa: E402
from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear  # noqa: E402
from kernels.apply import KernelConfig, KernelHashedAttention, KernelRayAttentionSublayer, use_kernels_  # noqa: E402
from kernels.build import cpu_target, cuda_target  # noqa: E402
from kernels.dispatch import KernelNotApplicable  # noqa: E402
from kernels.ray_attention import RayAttentionWeights, make_ray_attention, ray_attention, \
    reference_ray_attention  # noqa: E402


def _weights(core, channels=32, heads=4, n_bits=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    linears = [torch.randn(channels, channels, generator=g) / math.sqrt(channels) for _ in range(4)]
    return RayAttentionWeights.from_parts(
        1 + 0.2 * torch.randn(channels, generator=g), 0.1 * torch.randn(channels, generator=g), 1e-6, *linears,
        0.1 * torch.randn(channels, generator=g), heads, core, scale=0.2 + torch.rand(heads, generator=g),
        hash_w=torch.randn(heads, channels // heads, n_bits, generator=g),
        hash_b=0.1 * torch.randn(heads, n_bits, generator=g))


def _assert_matches(x, w):
    """Rays whose hash projections come within 1e-5 of zero are left out: their code bits may differ under another
    summation order (the kernel's), which is not an error."""
    got = ray_attention(x, w)
    expected, margin = reference_ray_attention(x, w, return_codes_margin=True)
    clear = margin > 1e-5
    assert clear.any() and clear.float().mean() > 0.5
    torch.testing.assert_close(got[clear], expected[clear], rtol=1e-5, atol=1e-5)
    return got


@pytest.mark.parametrize("core", ["dense", "hashed"])
@pytest.mark.parametrize("rays,samples,channels,heads,n_bits", [(1, 24, 32, 4, 16), (37, 24, 32, 4, 16),
                                                                (300, 7, 16, 2, 40), (5, 13, 24, 3, 8)])
def test_kernel_matches_reference(core, rays, samples, channels, heads, n_bits):
    w = _weights(core, channels, heads, n_bits, seed=rays)
    x = torch.randn(rays, samples, channels, generator=torch.Generator().manual_seed(1))
    _assert_matches(x, w)


def _model_parts(core, shift, seed=0):
    torch.manual_seed(seed)
    norm, attn = nn.LayerNorm(32, eps=1e-6), RayAttention(32, num_heads=4)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.1)
    if core == "hashed":
        attn.core = HashedQuadraticAttention(4, 8, 16)
        with torch.no_grad():
            attn.core.hasher.bias.normal_(0.0, 0.1)
    if shift:
        for name in ("q_fc", "k_fc", "v_fc", "out_fc"):
            setattr(attn, name, ShiftLinear.from_linear(getattr(attn, name)))
    return norm.eval(), attn.eval()


@pytest.mark.parametrize("core", ["dense", "hashed"])
@pytest.mark.parametrize("shift", [False, True], ids=["linear", "shift_linear"])
def test_the_leaf_equals_the_model_sublayer(core, shift):
    norm, attn = _model_parts(core, shift)
    x = torch.randn(64, 24, 32, generator=torch.Generator().manual_seed(2))
    leaf = KernelRayAttentionSublayer(norm, attn)
    with torch.no_grad():
        expected = PreNormAttention()(x, norm, attn)
        reference, margin = reference_ray_attention(x, leaf.weights, return_codes_margin=True)
        got = leaf(x, norm, attn)
    clear = margin > 1e-5
    torch.testing.assert_close(reference[clear], expected[clear], rtol=1e-4, atol=1e-4)  # the reference is the model
    torch.testing.assert_close(got[clear], expected[clear], rtol=1e-4, atol=1e-4)
    assert leaf.kernels_ran == {"ray_attention": "tvm"}


class _Block(nn.Module):
    def __init__(self, core):
        super().__init__()
        self.attn_norm, self.attn = _model_parts(core, shift=False)
        self.attn_sublayer = PreNormAttention()

    def forward(self, x):
        return self.attn_sublayer(x, self.attn_norm, self.attn)


def test_swapped_on_cpu_not_for_cuda_and_not_for_other_cores():
    block = _Block("hashed").eval()
    assert use_kernels_(block, KernelConfig("tvm", device_type="cuda")).get("KernelRayAttentionSublayer") is None
    assert type(block.attn_sublayer) is PreNormAttention  # declined for CUDA: the core gets its own kernel instead
    assert type(block.attn.core) is KernelHashedAttention
    block = _Block("hashed").eval()
    assert use_kernels_(block, KernelConfig("tvm"))["KernelRayAttentionSublayer"] == 1
    assert type(block.attn.core) is HashedQuadraticAttention  # covered by the fused leaf, not swapped itself
    other = _Block("dense").eval()
    other.attn.core = nn.Identity()
    with pytest.raises(KernelNotApplicable, match="no Identity core"):
        KernelRayAttentionSublayer(other.attn_norm, other.attn)


def test_bad_inputs_are_named():
    w = _weights("dense")
    with pytest.raises(ValueError, match="x must be \\[rays, samples, C=32\\]"):
        ray_attention(torch.randn(3, 24, 31), w)
    with pytest.raises(ValueError, match="wk must be \\[32, 32\\]"):
        RayAttentionWeights.from_parts(torch.ones(32), torch.zeros(32), 1e-6, torch.eye(32), torch.eye(31),
                                       torch.eye(32), torch.eye(32), None, 4, "dense")
    with pytest.raises(ValueError, match="core must be one of"):
        RayAttentionWeights.from_parts(torch.ones(32), torch.zeros(32), 1e-6, *[torch.eye(32)] * 4, None, 4, "sparse")
    with pytest.raises(ValueError, match="hash_w must be"):
        RayAttentionWeights.from_parts(torch.ones(32), torch.zeros(32), 1e-6, *[torch.eye(32)] * 4, None, 4,
                                       "hashed", scale=torch.ones(4), hash_w=torch.randn(4, 7, 16),
                                       hash_b=torch.zeros(4, 16))
    with pytest.raises(ValueError, match="CPU \\(llvm\\) schedule only"):
        make_ray_attention(cuda_target("sm_90"), 24, 32, 4, "dense", 0, 1e-6)


def test_autograd_uses_reference_and_empty_input():
    w = _weights("hashed")
    x = torch.randn(4, 24, 32, requires_grad=True)
    ray_attention(x, w).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert ray_attention(torch.randn(0, 24, 32), w).shape == (0, 24, 32)


def test_builds_for_the_cpu_target():
    assert make_ray_attention(cpu_target(), 24, 32, 4, "hashed", 16, 1e-6) is not None
