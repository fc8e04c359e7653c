"""Binary hashing and the additive attention cores, each checked against an independent direct computation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gnt_shiftadd.models.transformers import RayAttention
from gnt_shiftadd.shiftadd.hashed_attention import (ATTENTION_CORES, BinaryHasher, HashedLinearAttention,
                                                    HashedQuadraticAttention, SeedLinearAttention, binary_ste,
                                                    hamming_distance_packed, pack_bits, sign_ste)

CORES = [HashedQuadraticAttention, HashedLinearAttention, SeedLinearAttention]


def _qkv(rays=3, heads=2, samples=5, dim=4, seed=0):
    """Three random [R, H, S, d] tensors from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(rays, heads, samples, dim, generator=generator) for _ in range(3))


def _direct_bits(hasher, x):
    """{0,1} codes computed head by head with plain matmuls, independently of BinaryHasher.project."""
    weight, bias = hasher.weight.detach(), hasher.bias.detach()
    heads = [(x[:, h] @ weight[h] + bias[h]) >= 0 for h in range(x.shape[1])]
    return torch.stack(heads, dim=1).float()


def _loop_hamming(a, b):
    """[B, Sq, n] x [B, Sk, n] {0,1} -> [B, Sq, Sk] differing bits, one python comparison at a time."""
    return torch.tensor([[[sum(int(x) != int(y) for x, y in zip(a[r, i].tolist(), b[r, j].tolist()))
                           for j in range(b.shape[1])] for i in range(a.shape[1])] for r in range(a.shape[0])])


def _mean_row_correlation(similarity, real):
    """Mean over query rows of the Pearson correlation along the keys."""
    similarity = similarity - similarity.mean(-1, keepdim=True)
    real = real - real.mean(-1, keepdim=True)
    return ((similarity * real).sum(-1) / (similarity.norm(dim=-1) * real.norm(dim=-1)).clamp_min(1e-12)).mean().item()


# ------------------------------------------------------------------------------------------------ STE and codes


def test_sign_and_binary_ste_values_and_straight_through_gradients():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    signed = sign_ste(x)
    assert signed.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    signed.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]  # hardtanh window |x| <= 1

    x.grad = None
    binary = binary_ste(x)
    assert binary.tolist() == [0, 0, 0, 1, 1, 1, 1]
    (binary * torch.arange(7.0)).sum().backward()
    assert x.grad.tolist() == [0, 0.5, 1.0, 1.5, 2.0, 2.5, 0]  # half the sign gradient, times the upstream one


def test_codes_are_exactly_binary_and_match_signed_codes():
    hasher = BinaryHasher(2, 4, 7)
    q, _, _ = _qkv()
    codes, signed = hasher.codes(q), hasher.signed_codes(q)
    assert codes.shape == signed.shape == (3, 2, 5, 7) and codes.dtype == torch.float32
    assert set(codes.unique().tolist()) <= {0.0, 1.0} and set(signed.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(codes, (signed + 1) / 2)
    assert torch.equal(codes, _direct_bits(hasher, q))
    assert torch.equal(hasher.codes(q.bfloat16()), codes)  # low precision inputs hash like float32 ones


def test_codes_are_differentiable_wrt_weight_bias_and_input():
    hasher = BinaryHasher(2, 4, 7)
    q, _, _ = _qkv()
    q = (0.3 * q).requires_grad_(True)  # inside the STE window for most entries
    (hasher.codes(q) * torch.randn(3, 2, 5, 7)).sum().backward()
    for grad in (hasher.weight.grad, hasher.bias.grad, q.grad):
        assert grad is not None and grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ packing and Hamming


def test_pack_bits_layout_is_little_endian_with_two_complement_words():
    codes = torch.zeros(70, dtype=torch.int64)
    codes[[0, 3, 31, 33, 63, 64, 69]] = 1
    words = pack_bits(codes)
    assert words.shape == (3,) and words.dtype == torch.int32
    assert words.tolist() == [1 + 8 - 2**31, 2 - 2**31, 1 + 32]  # bit 31 set = negative int32
    assert pack_bits(torch.ones(2, 3, 32)).tolist() == [[[-1]] * 3] * 2  # float codes work too
    assert pack_bits(torch.ones(5)).tolist() == [31]


@pytest.mark.parametrize("n", [1, 5, 16, 31, 32, 33, 64])
def test_signed_product_equals_n_minus_twice_hamming_equals_packed_xor_popcount(n):
    generator = torch.Generator().manual_seed(n)
    a = torch.randint(0, 2, (2, 3, n), generator=generator)
    b = torch.randint(0, 2, (2, 4, n), generator=generator)
    a[0, 0] = 1  # every bit set, bits 31 / 63 included: sign bits of the int32 words
    b[0, 1] = 0
    if n > 31:
        a[1, 2, 31], b[1, 3, 31] = 1, 0
    if n == 64:
        a[1, 1, 63], b[1, 0, 63] = 1, 0
    hamming = hamming_distance_packed(pack_bits(a), pack_bits(b))
    assert hamming.dtype == torch.int32 and hamming.shape == (2, 3, 4)
    loop = _loop_hamming(a, b)
    assert torch.equal(hamming, loop.int())
    assert hamming[0, 0, 1] == n  # all ones against all zeros
    signed_a, signed_b = 2.0 * a - 1, 2.0 * b - 1
    assert torch.equal((signed_a @ signed_b.transpose(-1, -2)).int(), n - 2 * loop.int())


# ------------------------------------------------------------------------------------------------------- cores


@pytest.mark.parametrize("n_bits", [5, 16, 33, 64])
def test_quadratic_attention_equals_direct_float_softmax(n_bits):
    core = HashedQuadraticAttention(2, 4, n_bits)
    with torch.no_grad():
        core.scale.copy_(torch.tensor([0.3, 0.7]))
    q, k, v = _qkv()
    signed_q, signed_k = 2 * _direct_bits(core.hasher, q) - 1, 2 * _direct_bits(core.hasher, k) - 1
    similarity = signed_q @ signed_k.transpose(-1, -2)
    expected = torch.softmax(torch.tensor([0.3, 0.7])[None, :, None, None] * similarity, dim=-1) @ v
    torch.testing.assert_close(core(q, k, v), expected)
    packed = core.similarity_packed(q, k)
    assert packed.dtype == torch.int32 and torch.equal(packed, similarity.int())
    assert torch.equal(packed, n_bits - 2 * _loop_hamming(_direct_bits(core.hasher, q).flatten(0, 1),
                                                          _direct_bits(core.hasher, k).flatten(0, 1)).view(3, 2, 5, 5).int())


def _coordinate_hasher_core(cls, n_bits=6):
    """A core whose bits are x_c >= 0 for c = 0..3 (then repeats), so a query of all negatives has an all-zero code."""
    core = cls(2, 4, n_bits)
    with torch.no_grad():
        core.hasher.weight.copy_(torch.eye(4).repeat(1, 2)[:, :n_bits].expand(2, 4, n_bits))
        core.hasher.bias.zero_()
    return core


def test_linear_attention_equals_direct_quadratic_sum_including_an_all_zero_query_code():
    core = _coordinate_hasher_core(HashedLinearAttention)
    q, k, v = _qkv()
    q[1, 0, 2] = -torch.rand(4) - 0.1  # this query shares no bit with any key
    k[0, 1] = -k[0, 1].abs() - 0.1  # every key of this (ray, head) is all-zero too
    bits_q, bits_k = _direct_bits(core.hasher, q), _direct_bits(core.hasher, k)
    assert bits_q[1, 0, 2].sum() == 0 and bits_k[0, 1].sum() == 0
    out = core(q, k, v)
    for r in range(3):
        for h in range(2):
            for i in range(5):
                weights = torch.stack([bits_q[r, h, i] @ bits_k[r, h, j] for j in range(5)])
                total = weights.sum()
                want = (weights[:, None] * v[r, h]).sum(0) / total if total > 0 else torch.zeros(4)
                torch.testing.assert_close(out[r, h, i], want)
    assert torch.equal(out[1, 0, 2], torch.zeros(4)) and torch.equal(out[0, 1], torch.zeros(5, 4))
    assert torch.isfinite(out).all()


def _direct_seed(core, q, k, v):
    """0.5 v_i + (1/pi) sum_j (bq_i . bk_j) v_j over 0.5 + (1/pi) sum_j (bq_i . bk_j), + an explicit depthwise conv."""
    bits_q, bits_k = _direct_bits(core.hasher, q), _direct_bits(core.hasher, k)
    rays, heads, samples, dim = v.shape
    out = torch.zeros_like(v)
    weight = core.conv.weight.detach()[:, 0]  # [H*d, kernel]
    half = weight.shape[1] // 2
    for r in range(rays):
        for h in range(heads):
            for i in range(samples):
                weights = torch.stack([bits_q[r, h, i] @ bits_k[r, h, j] for j in range(samples)])
                out[r, h, i] = (0.5 * v[r, h, i] + (weights[:, None] * v[r, h]).sum(0) / math.pi) / (
                    0.5 + weights.sum() / math.pi)
                for c in range(dim):
                    for t in range(weight.shape[1]):
                        j = i + t - half
                        if 0 <= j < samples:
                            out[r, h, i, c] += weight[h * dim + c, t] * v[r, h, j, c]
    return out


def test_seed_linear_attention_equals_its_direct_formula_with_a_nonzero_conv():
    core = _coordinate_hasher_core(SeedLinearAttention)
    q, k, v = _qkv()
    q[2, 1, 4] = -torch.rand(4) - 0.1  # all-zero query code: the 0.5 term keeps it finite (returns v_i + conv)
    no_conv = core(q, k, v)
    with torch.no_grad():
        core.conv.weight.normal_()
    torch.testing.assert_close(core(q, k, v), _direct_seed(core, q, k, v))
    with torch.no_grad():
        core.conv.weight.zero_()  # the branch starts as a no-op
    torch.testing.assert_close(no_conv, _direct_seed(core, q, k, v))
    torch.testing.assert_close(no_conv[2, 1, 4], v[2, 1, 4])


# --------------------------------------------------------------------------------------------------------- fit


def _low_rank_batch(rays, generator, basis, offset):
    """q or k [R, 1, 12, 8]: rank-3 Gaussian + small noise, off-centre (like projected LayerNorm features)."""
    return (torch.randn(rays, 1, 12, 3, generator=generator) @ basis + 0.05 * torch.randn(rays, 1, 12, 8,
                                                                                          generator=generator) + offset)


def test_fit_makes_code_similarity_track_real_similarity_better_than_random_hashing():
    generator = torch.Generator().manual_seed(0)
    basis, offset = torch.randn(3, 8, generator=generator), 2 * torch.randn(8, generator=generator)
    q, k = (_low_rank_batch(64, generator, basis, offset) for _ in range(2))
    held_out_q, held_out_k = (_low_rank_batch(64, generator, basis, offset) for _ in range(2))

    def correlation(hasher, queries, keys):
        codes = hasher.signed_codes(queries) @ hasher.signed_codes(keys).transpose(-1, -2)
        return _mean_row_correlation(codes, queries @ keys.transpose(-1, -2))

    torch.manual_seed(0)
    random_hashers = [BinaryHasher(1, 8, 16) for _ in range(8)]  # LSH: what an unfitted hasher gives
    fitted = BinaryHasher(1, 8, 16)
    fitted.fit(q, k)
    assert bool(fitted.fitted) and not any(bool(h.fitted) for h in random_hashers)
    for queries, keys in ((q, k), (held_out_q, held_out_k)):  # fitted ~0.80, random hashing ~0.66 on average
        random_mean = sum(correlation(h, queries, keys) for h in random_hashers) / len(random_hashers)
        assert correlation(fitted, queries, keys) > 0.7
        assert correlation(fitted, queries, keys) > random_mean + 0.08


def test_fit_handles_single_samples_tiny_batches_and_more_bits_than_dims():
    for rays, samples, dim, n_bits in ((1, 1, 3, 5), (2, 1, 1, 4), (1, 3, 5, 33)):
        q, k, _ = _qkv(rays, 2, samples, dim)
        hasher = BinaryHasher(2, dim, n_bits)
        hasher.fit(q, k, iterations=10)
        assert bool(hasher.fitted)
        assert torch.isfinite(hasher.weight).all() and torch.isfinite(hasher.bias).all()
    # bits beyond d: the extra directions are orthonormal within their block of d (they are not all the same bit)
    q, k, _ = _qkv(8, 1, 6, 3)
    hasher = BinaryHasher(1, 3, 9)
    hasher.fit(q, k, iterations=0)
    extra = F.normalize(hasher.weight[0, :, 3:6], dim=0)
    torch.testing.assert_close(extra.T @ extra, torch.eye(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", CORES)
def test_calibrate_sets_fitted_and_is_deterministic_under_a_fixed_seed(cls):
    q, k, v = _qkv(rays=8, samples=6)
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        core = cls(2, 4, 12)
        assert not bool(core.hasher.fitted)
        core.calibrate(q, k, v)
        assert bool(core.hasher.fitted)
        states.append(core.state_dict())
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    if cls is HashedQuadraticAttention:
        assert (states[0]["scale"] > 0).all()


def test_calibrated_temperature_is_the_least_squares_fit_to_scaled_dot_products():
    q, k, v = _qkv(rays=8, samples=6)
    torch.manual_seed(0)
    core = HashedQuadraticAttention(2, 4, 16)
    core.calibrate(q, k, v)
    with torch.no_grad():
        similarity = core.code_similarity(q, k)
    target = q @ k.transpose(-1, -2) / 2.0

    def row_centred_error(scale):
        residual = scale[None, :, None, None] * similarity - target
        return (residual - residual.mean(-1, keepdim=True)).square().sum()

    best = row_centred_error(core.scale.detach())
    for factor in (0.9, 1.1):
        assert best < row_centred_error(core.scale.detach() * factor)


# ------------------------------------------------------------------------------- gradients, shapes, drop-in use


@pytest.mark.parametrize("cls", CORES)
def test_gradients_reach_hasher_scale_conv_and_inputs(cls):
    core = cls(2, 4, 8)
    q, k, v = (0.5 * t for t in _qkv(seed=1))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = core(q, k, v)
    (out * torch.randn_like(out)).sum().backward()
    grads = {"weight": core.hasher.weight.grad, "bias": core.hasher.bias.grad, "q": q.grad, "k": k.grad, "v": v.grad}
    if cls is HashedQuadraticAttention:
        grads["scale"] = core.scale.grad
    if cls is SeedLinearAttention:
        grads["conv"] = core.conv.weight.grad
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", CORES)
@pytest.mark.parametrize("shape,n_bits", [((1, 1, 1, 3), 1), ((1, 2, 1, 5), 33), ((2, 3, 7, 5), 5), ((3, 1, 4, 1), 64)])
def test_any_shape_and_bit_count_float32_and_bfloat16(cls, shape, n_bits):
    rays, heads, samples, dim = shape
    core = cls(heads, dim, n_bits)
    q, k, v = _qkv(rays, heads, samples, dim, seed=2)
    out = core(q, k, v)
    assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    low = core(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert low.shape == shape and low.dtype == torch.bfloat16 and torch.isfinite(low.float()).all()
    torch.testing.assert_close(low.float(), core(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float()),
                               rtol=1e-2, atol=1e-2)
    if samples == 1 and cls is HashedQuadraticAttention:  # a single key gets all the softmax weight
        torch.testing.assert_close(out, v)


@pytest.mark.parametrize("name", sorted(ATTENTION_CORES))
def test_drop_in_replacement_for_ray_attention_core(name):
    torch.manual_seed(0)
    attention = RayAttention(dim=16, num_heads=2)
    x = torch.randn(3, 7, 16)
    captured = {}
    handle = attention.core.register_forward_hook(lambda _m, inputs, _o: captured.update(qkv=inputs))
    dense = attention(x)
    handle.remove()
    core = ATTENTION_CORES[name](2, 8, 16)
    core.calibrate(*captured["qkv"])
    attention.core = core
    out = attention(x)
    assert out.shape == dense.shape == (3, 7, 16) and torch.isfinite(out).all()
    out.sum().backward()
    assert attention.q_fc.weight.grad is not None and core.hasher.weight.grad is not None
    assert attention.state_dict()["core.hasher.fitted"].item()
