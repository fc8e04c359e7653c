"""The hashed-attention (MatAdd) TVM kernels against their PyTorch references, and the references against the
gnt_shiftadd modules they stand in for. CUDA kernels are only built (sm_90), never run, so CI needs no GPU."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

pytest.importorskip("tvm")

import kernels.hashed_attention as ha  # noqa: E402
from gnt_shiftadd.shiftadd.hashed_attention import (BinaryHasher, HashedLinearAttention,  # noqa: E402
                                                    HashedQuadraticAttention, SeedLinearAttention,
                                                    hamming_distance_packed, pack_bits)
from kernels.build import KernelBuildError, cuda_target  # noqa: E402

# a kernel that fails to build warns (RuntimeWarning) and runs the reference: here that must fail the test instead
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

# (rays, heads, samples, head_dim, n_bits): one ray, odd sample counts, one or several heads, one to two code words
SHAPES = [(1, 1, 7, 8, 8), (3, 4, 24, 16, 16), (2, 4, 33, 8, 48), (2, 1, 24, 8, 32), (4, 4, 7, 16, 48)]


@pytest.fixture(scope="module", autouse=True)
def hashed_attention_kernel_cache(tmp_path_factory):
    """Builds go to a cache made for this module, so a stale binary from elsewhere can never be loaded."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHIFTADD_GNT_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernel_cache")))
        yield


def random_words(rays: int, heads: int, samples: int, n_bits: int, generator: torch.Generator) -> torch.Tensor:
    """Uniformly random packed codes [rays, heads, samples, W] with the bits past n_bits cleared (as pack_bits does)."""
    codes = torch.randint(0, 2, (rays, heads, samples, n_bits), generator=generator)
    return pack_bits(codes)


def dyadic(shape, generator: torch.Generator, scale: int = 8) -> torch.Tensor:
    """Multiples of 1/scale in [-1, 1): every sum of a few products is exact in float32, whatever the order, so
    projections that are exactly 0 (the sign threshold) occur and must hash identically everywhere."""
    return torch.randint(-scale, scale, shape, generator=generator).float() / scale


# ------------------------------------------------------------------------------------ references vs modules


@pytest.mark.parametrize("n_bits", [8, 16, 32, 48])
def test_reference_hash_pack_equals_packed_module_codes(n_bits):
    generator = torch.Generator().manual_seed(n_bits)
    hasher = BinaryHasher(num_heads=3, head_dim=8, n_bits=n_bits)
    with torch.no_grad():
        hasher.weight.copy_(dyadic(hasher.weight.shape, generator))
        hasher.bias.copy_(dyadic(hasher.bias.shape, generator))
    x = dyadic((4, 3, 9, 8), generator)
    expected = pack_bits(hasher.codes(x))
    got = ha.reference_hash_pack(x, hasher.weight, hasher.bias)
    assert got.dtype == torch.int32 and got.shape == (4, 3, 9, ha.num_words(n_bits))
    assert torch.equal(got, expected)
    projection = hasher.project(x)
    assert (projection == 0).any(), "the test should exercise the >= 0 threshold"


def test_reference_quadratic_matches_module_forward():
    torch.manual_seed(0)
    heads, head_dim, n_bits = 4, 8, 16
    module = HashedQuadraticAttention(heads, head_dim, n_bits)
    with torch.no_grad():
        module.scale.copy_(torch.tensor([0.3, 1.0, 2.5, 0.05]))
    q, k, v = (torch.randn(5, heads, 24, head_dim) for _ in range(3))
    weight, bias = module.hasher.weight, module.hasher.bias
    with torch.no_grad():
        expected = module(q, k, v)
        got = ha.reference_quadratic(ha.reference_hash_pack(q, weight, bias), ha.reference_hash_pack(k, weight, bias),
                                     v, module.scale, n_bits)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_bits", [8, 48])
def test_reference_quadratic_uses_n_minus_twice_the_hamming_distance(n_bits):
    generator = torch.Generator().manual_seed(2)
    q_words, k_words = random_words(2, 3, 9, n_bits, generator), random_words(2, 3, 11, n_bits, generator)
    v, scale = torch.randn(2, 3, 11, 8, generator=generator), torch.tensor([0.1, 1.0, 3.0])
    logits = (n_bits - 2 * hamming_distance_packed(q_words, k_words)).float() * scale[None, :, None, None]
    expected = torch.softmax(logits, dim=-1) @ v
    torch.testing.assert_close(ha.reference_quadratic(q_words, k_words, v, scale, n_bits), expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module_class, form", [(HashedLinearAttention, "hashed"), (SeedLinearAttention, "seed")])
def test_reference_linear_matches_module_forward(module_class, form):
    torch.manual_seed(1)
    heads, head_dim, n_bits = 4, 16, 48
    module = module_class(heads, head_dim, n_bits)  # the seed form's conv starts at zero: a no-op branch
    q, k, v = (torch.randn(3, heads, 33, head_dim) for _ in range(3))
    weight, bias = module.hasher.weight, module.hasher.bias
    with torch.no_grad():
        expected = module(q, k, v)
        got = ha.reference_linear(ha.reference_hash_pack(q, weight, bias), ha.reference_hash_pack(k, weight, bias),
                                  v, n_bits, form)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ CPU kernels


def test_cpu_kernels_build_and_are_used():
    """The wrappers below must exercise compiled kernels, not the fallback."""
    key = {"heads": 2, "queries": 7, "keys": 7, "head_dim": 8, "n_bits": 16}
    device = torch.device("cpu")
    assert callable(ha._compiled("hash_pack", {"heads": 2, "samples": 7, "head_dim": 8, "n_bits": 16}, device,
                                 ha.make_hash_pack))
    assert callable(ha._compiled("hashed_quadratic", key, device, ha.make_quadratic))
    assert callable(ha._compiled("hashed_linear", {**key, "form": "hashed"}, device, ha.make_linear))


@pytest.mark.parametrize("rays, heads, samples, head_dim, n_bits", SHAPES)
def test_hash_pack_kernel_is_exact_on_exact_arithmetic(rays, heads, samples, head_dim, n_bits):
    generator = torch.Generator().manual_seed(rays * 1000 + n_bits)
    x = dyadic((rays, heads, samples, head_dim), generator)
    weight = dyadic((heads, head_dim, n_bits), generator)
    bias = dyadic((heads, n_bits), generator)
    assert torch.equal(ha.hash_pack(x, weight, bias), ha.reference_hash_pack(x, weight, bias))


def test_hash_pack_kernel_on_random_floats_differs_only_at_rounding_ties():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(64, 4, 24, 16, generator=generator)
    weight, bias = torch.randn(4, 16, 48, generator=generator), torch.randn(4, 48, generator=generator)
    got, expected = ha.hash_pack(x, weight, bias), ha.reference_hash_pack(x, weight, bias)
    projection = torch.einsum("rhsd,hdn->rhsn", x, weight) + bias[None, :, None, :]
    near_zero = pack_bits((projection.abs() < 1e-5).long())  # bits whose sign may depend on the summation order
    assert torch.equal((got ^ expected) & ~near_zero, torch.zeros_like(got))


@pytest.mark.parametrize("rays, heads, samples, head_dim, n_bits", SHAPES)
def test_quadratic_kernel_matches_reference(rays, heads, samples, head_dim, n_bits):
    generator = torch.Generator().manual_seed(samples * 100 + n_bits)
    q_words = random_words(rays, heads, samples, n_bits, generator)
    k_words = random_words(rays, heads, samples, n_bits, generator)
    v = torch.randn(rays, heads, samples, head_dim, generator=generator)
    scale = torch.rand(heads, generator=generator) * 2 / math.sqrt(n_bits)
    got = ha.quadratic_attention(q_words, k_words, v, scale, n_bits)
    torch.testing.assert_close(got, ha.reference_quadratic(q_words, k_words, v, scale, n_bits), atol=1e-5, rtol=1e-5)


def test_quadratic_kernel_is_stable_for_large_logits():
    """Logits of +-4800 (scale 100, 48 bits) overflow exp without the max subtraction."""
    generator = torch.Generator().manual_seed(3)
    q_words, k_words = (random_words(3, 4, 33, 48, generator) for _ in range(2))
    v = torch.randn(3, 4, 33, 8, generator=generator)
    scale = torch.tensor([100.0, 20.0, 1.0, 0.001])
    got = ha.quadratic_attention(q_words, k_words, v, scale, 48)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ha.reference_quadratic(q_words, k_words, v, scale, 48), atol=1e-5, rtol=1e-5)


def test_quadratic_kernel_with_fewer_queries_than_keys_and_a_float_scale():
    generator = torch.Generator().manual_seed(4)
    q_words, k_words = random_words(2, 4, 5, 16, generator), random_words(2, 4, 24, 16, generator)
    v = torch.randn(2, 4, 24, 8, generator=generator)
    got = ha.quadratic_attention(q_words, k_words, v, 0.25, 16)
    assert got.shape == (2, 4, 5, 8)
    torch.testing.assert_close(got, ha.reference_quadratic(q_words, k_words, v, 0.25, 16), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rays, heads, samples, head_dim, n_bits", SHAPES)
def test_linear_kernel_matches_reference(rays, heads, samples, head_dim, n_bits):
    generator = torch.Generator().manual_seed(samples * 10 + n_bits)
    q_words = random_words(rays, heads, samples, n_bits, generator)
    k_words = random_words(rays, heads, samples, n_bits, generator)
    v = torch.randn(rays, heads, samples, head_dim, generator=generator)
    q_words[0, 0, 0] = 0  # an all-zero query code: no shared bits with any key, output defined as 0
    got = ha.linear_attention(q_words, k_words, v, n_bits)
    torch.testing.assert_close(got, ha.reference_linear(q_words, k_words, v, n_bits), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0, 0, 0], torch.zeros(head_dim))


def test_linear_kernel_with_all_zero_key_codes_returns_zero():
    generator = torch.Generator().manual_seed(5)
    q_words = random_words(2, 4, 24, 16, generator)
    k_words = torch.zeros_like(q_words)
    v = torch.randn(2, 4, 24, 8, generator=generator)
    assert torch.equal(ha.linear_attention(q_words, k_words, v, 16), torch.zeros_like(v))


def test_seed_linear_kernel_matches_reference():
    generator = torch.Generator().manual_seed(6)
    q_words, k_words = (random_words(3, 4, 33, 48, generator) for _ in range(2))
    q_words[1, 2, 5] = 0  # the seed form returns v_i there (its 0.5 terms keep the denominator positive)
    v = torch.randn(3, 4, 33, 16, generator=generator)
    got = ha.linear_attention(q_words, k_words, v, 48, form="seed")
    torch.testing.assert_close(got, ha.reference_linear(q_words, k_words, v, 48, "seed"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 2, 5], v[1, 2, 5])


def test_half_precision_values_are_upcast_and_returned_in_their_dtype():
    generator = torch.Generator().manual_seed(8)
    q_words, k_words = (random_words(2, 4, 24, 16, generator) for _ in range(2))
    v = torch.randn(2, 4, 24, 8, generator=generator).half()
    for got, expected in ((ha.quadratic_attention(q_words, k_words, v, 0.5, 16),
                           ha.reference_quadratic(q_words, k_words, v, 0.5, 16)),
                          (ha.linear_attention(q_words, k_words, v, 16), ha.reference_linear(q_words, k_words, v, 16))):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def test_wrappers_reject_bad_inputs_with_clear_errors():
    generator = torch.Generator().manual_seed(9)
    words = random_words(2, 4, 24, 16, generator)
    v = torch.randn(2, 4, 24, 8)
    with pytest.raises(ValueError, match="int32"):
        ha.quadratic_attention(words.long(), words, v, 0.5, 16)
    with pytest.raises(ValueError, match="n_bits=48 needs 2"):
        ha.linear_attention(words, words, v, 48)
    with pytest.raises(ValueError, match="shapes disagree"):
        ha.linear_attention(words, words, v[:, :, :7], 16)
    with pytest.raises(ValueError, match="scale"):
        ha.quadratic_attention(words, words, v, torch.ones(3), 16)
    with pytest.raises(ValueError, match="form"):
        ha.linear_attention(words, words, v, 16, form="cosine")
    with pytest.raises(ValueError, match="weight"):
        ha.hash_pack(torch.randn(2, 4, 24, 8), torch.randn(4, 16, 16), torch.randn(4, 16))


def test_failed_build_falls_back_to_the_reference_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("SHIFTADD_GNT_KERNEL_CACHE", str(tmp_path))  # a new cache: nothing memoised for it yet

    def failing_build(name, key, target, make):
        raise KernelBuildError(f"kernel {name!r} {key}: simulated failure for the fallback test")

    monkeypatch.setattr("kernels.dispatch.build_kernel", failing_build)  # every kernel is built through the facade
    generator = torch.Generator().manual_seed(10)
    q_words, k_words = (random_words(2, 2, 7, 8, generator) for _ in range(2))
    v = torch.randn(2, 2, 7, 8, generator=generator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ha.linear_attention(q_words, k_words, v, 8)
    assert any("simulated failure" in str(warning.message) for warning in caught)
    assert torch.equal(got, ha.reference_linear(q_words, k_words, v, 8))


# ----------------------------------------------------------------------------------------- CUDA builds


@pytest.mark.parametrize("heads, samples, head_dim, n_bits", [(4, 24, 8, 16), (1, 7, 16, 48), (4, 33, 16, 32)])
def test_cuda_kernels_build_for_sm90(heads, samples, head_dim, n_bits):
    import tvm

    target = cuda_target("sm_90")
    modules = {
        "hash_pack": ha.make_hash_pack(target, heads=heads, samples=samples, head_dim=head_dim, n_bits=n_bits),
        "quadratic": ha.make_quadratic(target, heads=heads, queries=samples, keys=samples, head_dim=head_dim,
                                       n_bits=n_bits),
        "linear": ha.make_linear(target, heads=heads, queries=samples, keys=samples, head_dim=head_dim,
                                 n_bits=n_bits),
        "seed": ha.make_linear(target, heads=heads, queries=samples, keys=samples, head_dim=head_dim,
                               n_bits=n_bits, form="seed"),
    }
    for name, module in modules.items():
        library = tvm.compile(module, target=tvm.target.Target(target))
        source = library.mod.imports[0].inspect_source()
        assert "blockIdx.x" in source and "threadIdx.x" in source, name
        if name != "hash_pack":
            assert "__shared__" in source, name
    assert "__popc" in tvm.compile(modules["quadratic"], target=tvm.target.Target(target)).mod.imports[0] \
        .inspect_source()
