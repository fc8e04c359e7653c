"""Binary-hashed additive attention for GNT's ray transformer (ShiftAddViT's "MatAdd" attention).

Queries and keys are mapped per head to n-bit binary codes by a learned projection + sign (straight-through
estimator), fitted first on real q/k of a calibration batch. Then the attention MatMuls become additions:
  * quadratic: similarity = n - 2 Hamming(q_code, k_code) (XOR + popcount), softmax over the ray's samples;
  * linear: out = Q_b (K_b^T V) / (Q_b (K_b^T 1)) with {0,1} codes, every product with a code an addition;
  * seed: ShiftAddViT's released linear form, 0.5 V + (1/pi) Q_b (K_b^T V) normalised, + a depthwise conv on V.
All cores take q, k, v [R, H, S, d] and return [R, H, S, d]: drop-in for `RayAttention.core`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["sign_ste", "binary_ste", "BinaryHasher", "pack_bits", "hamming_distance_packed",
           "HashedQuadraticAttention", "HashedLinearAttention", "SeedLinearAttention", "ATTENTION_CORES"]


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: Tensor) -> Tensor:
    """+1 where x >= 0 else -1; gradient passed straight through where |x| <= 1 (hardtanh STE)."""
    return _SignSTE.apply(x)


def binary_ste(x: Tensor) -> Tensor:
    """{0, 1} codes with the same straight-through gradient (halved)."""
    return (sign_ste(x) + 1) / 2


class BinaryHasher(nn.Module):
    """Per-head learned projection to n-bit codes: bits = sign(x W_h + b_h). weight [H, d, n], bias [H, n]."""

    def __init__(self, num_heads: int, head_dim: int, n_bits: int = 16):
        super().__init__()
        self.num_heads, self.head_dim, self.n_bits = num_heads, head_dim, n_bits
        self.weight = nn.Parameter(torch.randn(num_heads, head_dim, n_bits) / math.sqrt(head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, n_bits))
        self.register_buffer("fitted", torch.tensor(False))

    def project(self, x: Tensor) -> Tensor:
        """x [R, H, S, d] -> real projections [R, H, S, n]."""
        return torch.einsum("rhsd,hdn->rhsn", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)[None, :, None, :]

    def signed_codes(self, x: Tensor) -> Tensor:
        return sign_ste(self.project(x))

    def codes(self, x: Tensor) -> Tensor:
        return binary_ste(self.project(x))

    @torch.no_grad()
    def fit(self, q: Tensor, k: Tensor, iterations: int = 200) -> None:
        """Fit the codes to real queries/keys q, k [R, H, S, d] of one calibration batch.

        Per head: centre on the joint mean; PCA directions (top min(n, d)) rotated ITQ-style to balance
        quantisation, random directions for bits beyond d; scaled to unit std so the STE window is meaningful.
        Then a KSH-style supervised refinement: Adam on the tanh-relaxed code similarity
        tanh(qW+b) tanh(kW+b)^T / n against the row-standardised float similarity q k^T (both per query row).
        """
        q = q.detach().float().transpose(0, 1).reshape(self.num_heads, -1, q.shape[-2], self.head_dim)  # [H, R, S, d]
        k = k.detach().float().transpose(0, 1).reshape(self.num_heads, -1, k.shape[-2], self.head_dim)
        weight = torch.empty_like(self.weight, dtype=torch.float32)
        bias = torch.empty_like(self.bias, dtype=torch.float32)
        n, d = self.n_bits, self.head_dim
        for h in range(self.num_heads):
            data = torch.cat([q[h].reshape(-1, d), k[h].reshape(-1, d)])
            mean = data.mean(0)
            centred = data - mean
            _, _, vh = torch.linalg.svd(centred, full_matrices=False)
            m = min(n, d, vh.shape[0])
            directions = vh[:m].T  # [d, m]
            rotation = torch.linalg.qr(torch.randn(m, m))[0]
            projected = centred @ directions
            for _ in range(20):  # ITQ: alternate codes and the orthogonal rotation
                b = torch.sign(projected @ rotation)
                u, _, vt = torch.linalg.svd(projected.T @ b)
                rotation = u @ vt
            w = directions @ rotation
            if n > m:
                w = torch.cat([w, torch.randn(d, n - m)], dim=1)
            std = (centred @ w).std(0).clamp_min(1e-6)
            weight[h] = w / std
            bias[h] = -(mean @ w) / std
        self.weight.copy_(weight)
        self.bias.copy_(bias)
        self._refine(q, k, iterations)
        self.fitted.fill_(True)

    def _refine(self, q: Tensor, k: Tensor, iterations: int) -> None:
        if iterations <= 0:
            return
        rows = min(q.shape[1], 64)  # a subset of rays keeps the fit fast
        q, k = q[:, :rows], k[:, :rows]  # [H, R', S, d]
        target = torch.einsum("hrsd,hrtd->hrst", q, k)
        target = (target - target.mean(-1, keepdim=True)) / target.std(-1, keepdim=True).clamp_min(1e-6)
        weight = self.weight.detach().clone().requires_grad_(True)
        bias = self.bias.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
        with torch.enable_grad():
            for _ in range(iterations):
                cq = torch.tanh(torch.einsum("hrsd,hdn->hrsn", q, weight) + bias[:, None, None, :])
                ck = torch.tanh(torch.einsum("hrsd,hdn->hrsn", k, weight) + bias[:, None, None, :])
                sim = torch.einsum("hrsn,hrtn->hrst", cq, ck) / self.n_bits
                sim = (sim - sim.mean(-1, keepdim=True)) / sim.std(-1, keepdim=True).clamp_min(1e-6)
                loss = F.mse_loss(sim, target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.weight.copy_(weight.detach())
        self.bias.copy_(bias.detach())


def pack_bits(codes: Tensor) -> Tensor:
    """{0,1} codes [..., n] -> int32 words [..., ceil(n/32)]; bit j of word w is code[32 w + j] (two's complement)."""
    n = codes.shape[-1]
    words = math.ceil(n / 32)
    padded = F.pad(codes.to(torch.int64), (0, words * 32 - n)).reshape(*codes.shape[:-1], words, 32)
    weights = torch.ones(32, dtype=torch.int64, device=codes.device) << torch.arange(32, device=codes.device)
    packed = (padded * weights).sum(-1)  # [0, 2^32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _popcount32(x: Tensor) -> Tensor:
    """Bit count of int32 words (SWAR bit tricks in int64 to stay unsigned)."""
    x = x.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def hamming_distance_packed(a: Tensor, b: Tensor) -> Tensor:
    """Packed a [..., Sq, W], b [..., Sk, W] -> int32 [..., Sq, Sk]: XOR + popcount, summed over words."""
    return _popcount32(torch.bitwise_xor(a[..., :, None, :], b[..., None, :, :])).sum(-1).to(torch.int32)


class HashedQuadraticAttention(nn.Module):
    """logits = scale_h (n - 2 Hamming(q_code, k_code)) = scale_h * (+-1 code inner product); softmax over S; @ v."""

    def __init__(self, num_heads: int, head_dim: int, n_bits: int = 16):
        super().__init__()
        self.hasher = BinaryHasher(num_heads, head_dim, n_bits)
        self.scale = nn.Parameter(torch.full((num_heads,), 1.0 / math.sqrt(n_bits)))

    def code_similarity(self, q: Tensor, k: Tensor) -> Tensor:
        """n - 2 Hamming as a differentiable float product of +-1 codes: [R, H, S, S]."""
        return self.hasher.signed_codes(q) @ self.hasher.signed_codes(k).transpose(-1, -2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        logits = self.code_similarity(q, k) * self.scale.to(q.dtype)[None, :, None, None]
        return torch.softmax(logits.float(), dim=-1).to(v.dtype) @ v

    @torch.no_grad()
    def similarity_packed(self, q: Tensor, k: Tensor) -> Tensor:
        """int32 [R, H, S, S] n - 2 Hamming via packed XOR + popcount: the reference for the MatAdd kernel."""
        n = self.hasher.n_bits
        return n - 2 * hamming_distance_packed(pack_bits(self.hasher.codes(q)), pack_bits(self.hasher.codes(k)))

    @torch.no_grad()
    def calibrate(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Fit the codes, then the per-head temperature by least squares against q k^T / sqrt(d)."""
        self.hasher.fit(q, k)
        sim = self.code_similarity(q.float(), k.float())
        target = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        sim_c = sim - sim.mean(-1, keepdim=True)  # softmax ignores per-row offsets
        target_c = target - target.mean(-1, keepdim=True)
        num = (sim_c * target_c).sum(dim=(0, 2, 3))
        den = (sim_c * sim_c).sum(dim=(0, 2, 3)).clamp_min(1e-6)
        self.scale.copy_((num / den).clamp_min(1e-3))


class HashedLinearAttention(nn.Module):
    """out_i = sum_j (q_i . k_j) v_j / sum_j (q_i . k_j) with {0,1} codes, as Q_b (K_b^T V) / (Q_b (K_b^T 1)).

    A zero denominator means the query shares no bit with any key, so the numerator is 0 too: the output is 0
    there (the denominator, an integer count, is clamped to >= 1).
    """

    def __init__(self, num_heads: int, head_dim: int, n_bits: int = 16):
        super().__init__()
        self.hasher = BinaryHasher(num_heads, head_dim, n_bits)

    def _parts(self, q, k, v):
        cq, ck = self.hasher.codes(q).to(v.dtype), self.hasher.codes(k).to(v.dtype)
        kv = ck.transpose(-1, -2) @ v  # [R, H, n, d]: additions of v rows selected by key bits
        numerator = cq @ kv  # [R, H, S, d]: additions of kv rows selected by query bits
        denominator = cq @ ck.sum(dim=-2, keepdim=True).transpose(-1, -2)  # [R, H, S, 1]
        return numerator, denominator

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        numerator, denominator = self._parts(q, k, v)
        return numerator / denominator.clamp_min(1.0)

    @torch.no_grad()
    def calibrate(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        self.hasher.fit(q, k)


class SeedLinearAttention(HashedLinearAttention):
    """ShiftAddViT's released form, as we read it: {0,1} codes, (0.5 v_i + (1/pi) q_i (K^T V)) / (0.5 + (1/pi)
    q_i (K^T 1)), plus a depthwise conv (along the samples, per channel of V) added to the output. The conv
    starts at zero so the branch is a no-op right after conversion."""

    def __init__(self, num_heads: int, head_dim: int, n_bits: int = 16, conv_kernel: int = 3):
        super().__init__(num_heads, head_dim, n_bits)
        channels = num_heads * head_dim
        self.conv = nn.Conv1d(channels, channels, conv_kernel, padding=conv_kernel // 2, groups=channels, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        numerator, denominator = self._parts(q, k, v)
        out = (0.5 * v + numerator / math.pi) / (0.5 + denominator / math.pi)
        rays, heads, samples, dim = v.shape
        v_channels = v.permute(0, 1, 3, 2).reshape(rays, heads * dim, samples)
        conv = self.conv(v_channels.to(self.conv.weight.dtype)).to(v.dtype)
        return out + conv.reshape(rays, heads, dim, samples).permute(0, 1, 3, 2)


ATTENTION_CORES = {"hash_quadratic": HashedQuadraticAttention, "hash_linear": HashedLinearAttention,
                   "hash_linear_seed": SeedLinearAttention}
