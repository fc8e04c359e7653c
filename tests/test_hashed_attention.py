"""Binary hashing and the additive attention cores against direct float computations."""
import math

import pytest
import torch

from gnt_shiftadd.models.transformers import RayAttention
from gnt_shiftadd.shiftadd.hashed_attention import (BinaryHasher, HashedLinearAttention, HashedQuadraticAttention,
                                                    SeedLinearAttention, binary_ste, hamming_distance_packed,
                                                    pack_bits, sign_ste)


def _qkv(r=3, h=2, s=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(r, h, s, d, generator=g) for _ in range(3))


def test_ste_values_and_gradients():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1, -1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0]
    assert binary_ste(x.detach()).tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("n", [1, 5, 16, 31, 32, 33, 64])
def test_packed_hamming_equals_loop_and_float_formula(n):
    g = torch.Generator().manual_seed(n)
    a = torch.randint(0, 2, (2, 3, n), generator=g)
    b = torch.randint(0, 2, (2, 4, n), generator=g)
    a[0, 0, -1] = 1  # top bit of the last word set: the sign bit of an int32 word when n is a multiple of 32
    b[0, 0, -1] = 0
    ham = hamming_distance_packed(pack_bits(a), pack_bits(b))
    loop = torch.tensor([[[sum(int(x != y) for x, y in zip(a[r, i], b[r, j])) for j in range(4)] for i in range(3)]
                         for r in range(2)])
    assert ham.dtype == torch.int32 and torch.equal(ham, loop.int())
    pm_a, pm_b = 2.0 * a - 1, 2.0 * b - 1
    assert torch.equal((pm_a @ pm_b.transpose(-1, -2)).int(), n - 2 * ham)


def test_pack_bits_layout():
    codes = torch.zeros(40, dtype=torch.int64)
    codes[[0, 3, 31, 33]] = 1
    words = pack_bits(codes)
    assert words.shape == (2,) and words.dtype == torch.int32
    assert words[0].item() == (1 + 8 - 2**31) and words[1].item() == 2


def test_codes_are_binary_and_differentiable():
    hasher = BinaryHasher(2, 4, 7)
    q, _, _ = _qkv()
    q.requires_grad_(True)
    codes = hasher.codes(q)
    assert set(codes.unique().tolist()) <= {0.0, 1.0} and codes.shape == (3, 2, 5, 7)
    (codes * torch.randn_like(codes)).sum().backward()
    assert hasher.weight.grad is not None and hasher.bias.grad is not None and q.grad is not None


def test_quadratic_attention_equals_direct_float_computation():
    core = HashedQuadraticAttention(2, 4, 16)
    q, k, v = _qkv()
    bq = (core.hasher.project(q) >= 0).float() * 2 - 1
    bk = (core.hasher.project(k) >= 0).float() * 2 - 1
    expected = torch.softmax(core.scale.detach()[None, :, None, None] * (bq @ bk.transpose(-1, -2)), -1) @ v
    torch.testing.assert_close(core(q, k, v), expected)
    assert torch.equal(core.similarity_packed(q, k), (bq @ bk.transpose(-1, -2)).int())


def test_linear_attention_equals_direct_quadratic_sum_including_an_all_zero_query():
    core = HashedLinearAttention(2, 4, 6)
    q, k, v = _qkv()
    with torch.no_grad():
        core.hasher.bias[0] = -100.0  # head 0: every code bit 0 -> denominator 0 -> output 0
    bq = (core.hasher.project(q) >= 0).float()
    bk = (core.hasher.project(k) >= 0).float()
    out = core(q, k, v)
    for r in range(3):
        for h in range(2):
            for i in range(5):
                weights = torch.stack([bq[r, h, i] @ bk[r, h, j] for j in range(5)])
                total = weights.sum()
                want = (weights[:, None] * v[r, h]).sum(0) / total if total > 0 else torch.zeros(4)
                torch.testing.assert_close(out[r, h, i], want)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))


def test_seed_form_equals_its_formula():
    core = SeedLinearAttention(2, 4, 8)
    q, k, v = _qkv()
    with torch.no_grad():
        core.conv.weight.normal_()
    bq = (core.hasher.project(q) >= 0).float()
    bk = (core.hasher.project(k) >= 0).float()
    sim = bq @ bk.transpose(-1, -2)
    attn = (0.5 * v + (sim @ v) / math.pi) / (0.5 + sim.sum(-1, keepdim=True) / math.pi)
    w = core.conv.weight.detach()  # [C, 1, 3]
    vc = torch.nn.functional.pad(v.permute(0, 1, 3, 2).reshape(3, 8, 5), (1, 1))
    conv = torch.stack([sum(w[None, :, 0, t] * vc[:, :, i + t] for t in range(3)) for i in range(5)], -1)
    expected = attn + conv.reshape(3, 2, 4, 5).permute(0, 1, 3, 2)
    torch.testing.assert_close(core(q, k, v), expected)


def test_fit_makes_code_similarity_track_real_similarity():
    torch.manual_seed(0)
    basis, offset = torch.randn(3, 8), 3 * torch.randn(8)  # low-rank, off-centre: like real projected features
    q = (torch.randn(64, 1, 12, 3) @ basis) + 0.05 * torch.randn(64, 1, 12, 8) + offset
    k = (torch.randn(64, 1, 12, 3) @ basis) + 0.05 * torch.randn(64, 1, 12, 8) + offset

    def correlation(hasher):
        """Mean per-query Pearson correlation (attention only compares keys of one query)."""
        sim = hasher.signed_codes(q) @ hasher.signed_codes(k).transpose(-1, -2)
        real = q @ k.transpose(-1, -2)
        sim, real = (t - t.mean(-1, keepdim=True) for t in (sim, real))
        return ((sim * real).sum(-1) / (sim.norm(dim=-1) * real.norm(dim=-1)).clamp_min(1e-9)).mean().item()

    random_hasher = BinaryHasher(1, 8, 16)
    fitted = BinaryHasher(1, 8, 16)
    fitted.fit(q, k)
    assert bool(fitted.fitted) and not bool(random_hasher.fitted)
    assert correlation(fitted) > 0.6 and correlation(fitted) > correlation(random_hasher) + 0.05


def test_calibrate_is_deterministic_and_sets_temperature():
    q, k, v = _qkv(r=8, s=6)
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        core = HashedQuadraticAttention(2, 4, 12)
        core.calibrate(q, k, v)
        results.append((core.hasher.weight.clone(), core.scale.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert (results[0][1] > 0).all()


@pytest.mark.parametrize("cls", [HashedQuadraticAttention, HashedLinearAttention, SeedLinearAttention])
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 3, 7, 5)])
def test_odd_shapes_gradients_and_ray_attention_drop_in(cls, shape):
    r, h, s, d = shape
    core = cls(h, d, 33)
    q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))
    out = core(q, k, v)
    assert out.shape == shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert v.grad is not None and core.hasher.weight.grad is not None
    assert core(q.bfloat16(), k.bfloat16(), v.bfloat16()).dtype == torch.bfloat16

    attention = RayAttention(dim=16, num_heads=2)
    attention.core = cls(2, 8, 16)
    assert attention(torch.randn(3, 7, 16)).shape == (3, 7, 16)
