"""Binary-hashed additive attention for GNT's ray transformer (ShiftAddViT's "MatAdd" attention).

Per head, queries and keys are mapped to n-bit binary codes by a learned projection + sign (straight-through
estimator), first fitted on real q/k of a calibration batch. The attention MatMuls then become additions:
  * quadratic: similarity = n - 2 Hamming(q_code, k_code) (XOR + popcount), softmax over the ray's samples;
  * linear:    out = Q_b (K_b^T V) / (Q_b (K_b^T 1)) with {0,1} codes, every product with a code an addition;
  * seed:      our linear form with a 0.5 V offset, (0.5 V + Q_b (K_b^T V) / pi) / (0.5 + Q_b K_b^T 1 / pi), + a
               depthwise conv on V (not ShiftAddViT's released form, which divides by the per-token L2 norm and
               uses a (9, 1) depthwise conv per head; the name `hash_linear_seed` is kept for old checkpoints).
Every core maps q, k, v [R, H, S, d] -> [R, H, S, d]: a drop-in for `RayAttention.core`. These are the pure-torch
references a fused kernel must match; internally they compute in float32 (float64 stays float64) and return
v's dtype, so bfloat16 inputs get the same codes as float32 ones.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["sign_ste", "binary_ste", "BinaryHasher", "pack_bits", "hamming_distance_packed",
           "HashedQuadraticAttention", "HashedLinearAttention", "SeedLinearAttention", "ATTENTION_CORES"]

_WORD_BITS = 32


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """At least float32, so low-precision inputs hash (and accumulate integer counts) exactly as float32 does."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_sizes(num_heads: int, head_dim: int, n_bits: int) -> None:
    for name, value in (("num_heads", num_heads), ("head_dim", head_dim), ("n_bits", n_bits)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


# ----------------------------------------------------------------------------------------------------------- STE


class _SignSTE(torch.autograd.Function):
    """sign with the hardtanh straight-through gradient (Courbariaux et al.): d/dx = 1 on |x| <= 1, else 0."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        one = torch.ones((), dtype=x.dtype, device=x.device)
        return torch.where(x >= 0, one, -one)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: Tensor) -> Tensor:
    """+1 where x >= 0 else -1 (0 maps to +1, so codes are never 0); gradient passed where |x| <= 1."""
    return _SignSTE.apply(x)


def binary_ste(x: Tensor) -> Tensor:
    """{0, 1} = (sign_ste(x) + 1) / 2; its straight-through gradient is therefore 1/2 on |x| <= 1."""
    return (sign_ste(x) + 1) / 2


# -------------------------------------------------------------------------------------------------------- hasher


def _random_orthogonal(size: int) -> Tensor:
    """A Haar-random orthogonal [size, size] matrix from torch's global CPU RNG (same result on any device)."""
    q, r = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64))
    return (q * torch.where(torch.diagonal(r) >= 0, 1.0, -1.0)).float()  # fix QR's sign ambiguity


def _standardise_rows(x: Tensor) -> Tensor:
    """Zero mean, unit std along the last dim (population std, so a single key gives 0 rather than NaN)."""
    x = x - x.mean(-1, keepdim=True)
    return x / x.std(-1, keepdim=True, correction=0).clamp_min(1e-6)


def _row_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Mean over query rows of the Pearson correlation along the keys (attention only compares one query's keys)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)).mean()


class BinaryHasher(nn.Module):
    """Per-head learned projection to n-bit codes: bits = sign(x W_h + b_h); weight [H, d, n], bias [H, n].

    Before `fit` the projection is random (LSH-like); `fit` initialises it from one calibration batch of real
    queries/keys, and training then updates it through the straight-through estimator.
    """

    itq_iterations = 50  # ITQ converges in a few tens of alternations on d <= 64
    refine_lr = 1e-2  # Adam step in standardised input units (scale-free, see `_refine_head`)
    refine_max_rays = 128  # rays per head used by the supervised refinement (evenly spaced over the batch)
    extra_threshold_std = 0.5  # random thresholds of the bits beyond d (in projection stds): break ties when n > d

    def __init__(self, num_heads: int, head_dim: int, n_bits: int = 16):
        super().__init__()
        _check_sizes(num_heads, head_dim, n_bits)
        self.num_heads, self.head_dim, self.n_bits = num_heads, head_dim, n_bits
        self.weight = nn.Parameter(torch.randn(num_heads, head_dim, n_bits) / math.sqrt(head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, n_bits))
        self.register_buffer("fitted", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, n_bits={self.n_bits}"

    def project(self, x: Tensor) -> Tensor:
        """x [R, H, S, d] -> real projections [R, H, S, n] (float32 or wider)."""
        dtype = _compute_dtype(x, self.weight)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        return torch.einsum("rhsd,hdn->rhsn", x.to(dtype), weight) + bias[None, :, None, :]

    def codes(self, x: Tensor) -> Tensor:
        """{0, 1} float codes [R, H, S, n]; straight-through gradient to weight, bias and x."""
        return binary_ste(self.project(x))

    def signed_codes(self, x: Tensor) -> Tensor:
        """+-1 float codes [R, H, S, n]; straight-through gradient to weight, bias and x."""
        return sign_ste(self.project(x))

    @torch.no_grad()
    def fit(self, q: Tensor, k: Tensor, iterations: int = 200) -> None:
        """Data-driven initialisation from one calibration batch of real queries/keys q [R, H, Sq, d], k [R, H, Sk, d].

        Per head: (1) centre on the joint mean of q and k; PCA directions (top min(n, d)) rotated ITQ-style to
        balance the quantisation error, plus orthogonalised random directions with random thresholds for bits
        beyond d; every bit scaled to unit std so the STE window |x| <= 1 covers the bulk of the data.
        (2) KSH-style refinement: `iterations` Adam steps fitting the tanh-relaxed code similarity
        tanh(qW+b) tanh(kW+b)^T / n to q k^T, both standardised per query row; the refined projection is kept only
        if its *binary* code similarity correlates at least as well with q k^T as the initial one's.
        Deterministic given torch's RNG state. Sets `fitted`.
        """
        for name, x in (("q", q), ("k", k)):
            if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
                raise ValueError(f"{name} must be [R, {self.num_heads}, S, {self.head_dim}], got {tuple(x.shape)}")
        device = self.weight.device
        queries = q.detach().to(device=device, dtype=torch.float32).transpose(0, 1)  # [H, R, Sq, d]
        keys = k.detach().to(device=device, dtype=torch.float32).transpose(0, 1)  # [H, R, Sk, d]
        weights, biases = [], []
        for head in range(self.num_heads):
            data = torch.cat([queries[head].reshape(-1, self.head_dim), keys[head].reshape(-1, self.head_dim)])
            weight, bias = self._initial_projection(data)
            if iterations > 0:
                weight, bias = self._refine_head(queries[head], keys[head], weight, bias, iterations)
            weights.append(weight)
            biases.append(bias)
        self.weight.copy_(torch.stack(weights))
        self.bias.copy_(torch.stack(biases))
        self.fitted.fill_(True)

    def _initial_projection(self, data: Tensor) -> tuple[Tensor, Tensor]:
        """Centred PCA + ITQ rotation (+ random extra bits), unit-std scaled. data [N, d] -> W [d, n], b [n]."""
        n, d = self.n_bits, self.head_dim
        mean = data.mean(0)
        centred = data - mean
        covariance = centred.T @ centred / data.shape[0]
        _, eigenvectors = torch.linalg.eigh(covariance.double())  # ascending eigenvalues; a full basis of R^d
        pca_bits = min(n, d)
        pca = eigenvectors.flip(-1)[:, :pca_bits].float()  # [d, m], largest variance first
        # ITQ (Gong & Lazebnik): alternate B = sign(Z R) and the orthogonal Procrustes R = argmax tr(B^T Z R)
        reduced = centred @ pca  # [N, m]
        rotation = _random_orthogonal(pca_bits).to(data.device)
        for _ in range(self.itq_iterations):
            binary = torch.where(reduced @ rotation >= 0, 1.0, -1.0)
            u, _, vh = torch.linalg.svd(reduced.T @ binary)
            rotation = u @ vh
        directions = [pca @ rotation]
        thresholds = [torch.zeros(pca_bits)]
        extra = n - pca_bits
        if extra:  # n > d: random directions, orthonormal within each block of d
            blocks = [_random_orthogonal(d)[:, :min(d, extra - start)] for start in range(0, extra, d)]
            directions += [block.to(data.device) for block in blocks]
            thresholds.append(torch.randn(extra) * self.extra_threshold_std)
        weight = torch.cat(directions, dim=1)  # [d, n]
        std = (centred @ weight).std(0, correction=0)
        std = std.clamp_min(1e-3 * std.max() + 1e-12)  # a dead direction must not blow its weight up
        weight = weight / std
        bias = torch.cat(thresholds).to(data.device) - mean @ weight
        return weight, bias

    def _refine_head(self, q: Tensor, k: Tensor, weight: Tensor, bias: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
        """Supervised (KSH-style) refinement of one head. q [R, Sq, d], k [R, Sk, d]; W [d, n], b [n] -> refined.

        Optimised in standardised input coordinates x' = (x - mu) / sigma (sigma a scalar), so Adam's step size
        does not depend on the scale of the features; converted back at the end.
        """
        rays = torch.linspace(0, q.shape[0] - 1, min(q.shape[0], self.refine_max_rays), device=q.device).round().long()
        q, k = q[rays], k[rays]
        target = _standardise_rows(q @ k.transpose(-1, -2))  # [R', Sq, Sk]
        data = torch.cat([q.reshape(-1, self.head_dim), k.reshape(-1, self.head_dim)])
        mu = data.mean(0)
        sigma = (data - mu).std(correction=0).clamp_min(1e-12)
        q_std, k_std = (q - mu) / sigma, (k - mu) / sigma
        weight_std = (weight * sigma).clone().requires_grad_(True)  # x' W' + b' == x W + b
        bias_std = (bias + mu @ weight).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([weight_std, bias_std], lr=self.refine_lr)
        with torch.enable_grad():
            for _ in range(iterations):
                relaxed_q = torch.tanh(q_std @ weight_std + bias_std)
                relaxed_k = torch.tanh(k_std @ weight_std + bias_std)
                similarity = _standardise_rows(relaxed_q @ relaxed_k.transpose(-1, -2) / self.n_bits)
                loss = (similarity - target).square().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        refined_weight = weight_std.detach() / sigma
        refined_bias = bias_std.detach() - mu @ refined_weight

        def binary_score(w: Tensor, b: Tensor) -> Tensor:
            codes_q = torch.where(q @ w + b >= 0, 1.0, -1.0)
            codes_k = torch.where(k @ w + b >= 0, 1.0, -1.0)
            return _row_correlation(codes_q @ codes_k.transpose(-1, -2), target)

        # a tensor comparison decides on the device (fit is a calibration step, a sync here is fine)
        keep = binary_score(refined_weight, refined_bias) >= binary_score(weight, bias)
        return torch.where(keep, refined_weight, weight), torch.where(keep, refined_bias, bias)


# ---------------------------------------------------------------------------------------------- packed reference


def pack_bits(codes: Tensor) -> Tensor:
    """{0,1} codes [..., n] -> int32 words [..., ceil(n / 32)], little-endian within and across words.

    Bit j (value 2^j, j = 0..31) of word w holds code[32 w + j]; bits past n are 0. A word with bit 31 set is
    stored as the negative int32 with the same two's-complement bit pattern. Codes must be exactly 0 or 1.
    """
    n = codes.shape[-1]
    words = -(-n // _WORD_BITS)
    bits = F.pad(codes.to(torch.int64), (0, words * _WORD_BITS - n))
    bits = bits.reshape(*codes.shape[:-1], words, _WORD_BITS)
    shifts = torch.arange(_WORD_BITS, dtype=torch.int64, device=codes.device)
    unsigned = (bits << shifts).sum(-1)  # in [0, 2^32): the disjoint bits sum to their OR
    return torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned).to(torch.int32)


def _popcount32(words: Tensor) -> Tensor:
    """Set bits per int32 word (SWAR bit tricks on the unsigned value held in int64): int64, same shape."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)  # 2-bit counts
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)  # 4-bit counts
    x = (x + (x >> 4)) & 0x0F0F0F0F  # 8-bit counts
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24  # sum of the four bytes lands in the top byte


def hamming_distance_packed(a: Tensor, b: Tensor) -> Tensor:
    """Packed codes a [..., Sq, W], b [..., Sk, W] -> int32 [..., Sq, Sk] differing bits (XOR + popcount)."""
    differing = torch.bitwise_xor(a.unsqueeze(-2), b.unsqueeze(-3))  # [..., Sq, Sk, W]
    return _popcount32(differing).sum(-1).to(torch.int32)


# --------------------------------------------------------------------------------------------------------- cores


class HashedQuadraticAttention(nn.Module):
    """logits = scale_h * (n - 2 Hamming(q_code, k_code)) (= +-1 code inner product), softmax over the S samples,
    weighted sum of v. q, k, v [R, H, S, d] -> [R, H, S, d]."""

    def __init__(self, num_heads: int, head_dim: int, n_bits: int = 16):
        super().__init__()
        self.hasher = BinaryHasher(num_heads, head_dim, n_bits)
        # random +-1 codes give similarities of std sqrt(n): start with unit-std logits
        self.scale = nn.Parameter(torch.full((num_heads,), 1.0 / math.sqrt(n_bits)))

    def code_similarity(self, q: Tensor, k: Tensor) -> Tensor:
        """+-1 code inner products [R, H, Sq, Sk] (= n - 2 Hamming exactly), differentiable through the STE."""
        return self.hasher.signed_codes(q) @ self.hasher.signed_codes(k).transpose(-1, -2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        similarity = self.code_similarity(q, k)
        logits = similarity * self.scale.to(similarity.dtype)[None, :, None, None]
        weights = torch.softmax(logits, dim=-1)
        return (weights @ v.to(weights.dtype)).to(v.dtype)

    @torch.no_grad()
    def similarity_packed(self, q: Tensor, k: Tensor) -> Tensor:
        """int32 [R, H, Sq, Sk] n - 2 Hamming via pack_bits + XOR/popcount: the reference for the MatAdd kernel."""
        hamming = hamming_distance_packed(pack_bits(self.hasher.codes(q)), pack_bits(self.hasher.codes(k)))
        return self.hasher.n_bits - 2 * hamming

    @torch.no_grad()
    def calibrate(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Fit the hasher on q, k [R, H, S, d], then each head's temperature by least squares against q k^T / sqrt(d).

        Both similarities are centred per query row first: softmax ignores a row's offset, so only the spread
        along the keys should be matched. The scale is kept >= 1e-3 (a non-positive one would invert attention).
        """
        self.hasher.fit(q, k)
        similarity = self.code_similarity(q.float(), k.float())
        target = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        similarity = similarity - similarity.mean(-1, keepdim=True)
        target = target - target.mean(-1, keepdim=True)
        numerator = (similarity * target).sum(dim=(0, 2, 3))
        denominator = (similarity * similarity).sum(dim=(0, 2, 3)).clamp_min(1e-12)
        self.scale.copy_((numerator / denominator).clamp_min(1e-3))


class HashedLinearAttention(nn.Module):
    """out_i = sum_j (q_i . k_j) v_j / sum_j (q_i . k_j) with {0,1} codes, computed as Q_b (K_b^T V) / (Q_b (K_b^T 1)):
    every product with a code is an addition. q, k, v [R, H, S, d] -> [R, H, S, d].

    The denominator counts shared set bits over all keys, a non-negative integer; when it is 0 (e.g. an all-zero
    query code) every term of the numerator is 0 too, and the output is defined as 0 (denominator clamped to >= 1).
    """

    def __init__(self, num_heads: int, head_dim: int, n_bits: int = 16):
        super().__init__()
        self.hasher = BinaryHasher(num_heads, head_dim, n_bits)

    def _numerator_denominator(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Q_b (K_b^T V) [R, H, Sq, d] and Q_b (K_b^T 1) [R, H, Sq, 1], in the codes' float dtype."""
        query_codes, key_codes = self.hasher.codes(q), self.hasher.codes(k)
        values = v.to(key_codes.dtype)
        bit_values = key_codes.transpose(-1, -2) @ values  # [R, H, n, d]: per bit, the sum of v over keys with it
        bit_counts = key_codes.sum(dim=-2).unsqueeze(-1)  # [R, H, n, 1]: per bit, how many keys have it
        return query_codes @ bit_values, query_codes @ bit_counts

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        numerator, denominator = self._numerator_denominator(q, k, v)
        return (numerator / denominator.clamp_min(1.0)).to(v.dtype)

    @torch.no_grad()
    def calibrate(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        """Fit the hasher on q, k [R, H, S, d] (there is no temperature in the linear form)."""
        self.hasher.fit(q, k)


class SeedLinearAttention(HashedLinearAttention):
    """Linear hashed attention with a 0.5 v offset (not ShiftAddViT's released form: see the module doc): {0,1}
    codes, numerator 0.5 v_i + (1/pi) q_i (K^T V) normalised by the matching row sum 0.5 + (1/pi) q_i (K^T 1),
    plus a depthwise conv (kernel 3, along the samples, per channel of V) branch added to the output. q, k, v [R, H, S, d] -> [R, H, S, d].

    The 0.5 term keeps the denominator >= 0.5, so no clamp is needed (an all-zero query code returns v_i). The conv
    ('same' padding, channel h * d + c for head h, channel c) starts at zero so the branch is a no-op after conversion.
    """

    def __init__(self, num_heads: int, head_dim: int, n_bits: int = 16, conv_kernel: int = 3):
        super().__init__(num_heads, head_dim, n_bits)
        if conv_kernel < 1:
            raise ValueError(f"conv_kernel must be >= 1, got {conv_kernel}")
        channels = num_heads * head_dim
        self.conv = nn.Conv1d(channels, channels, conv_kernel, padding="same", groups=channels, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        numerator, denominator = self._numerator_denominator(q, k, v)
        values = v.to(numerator.dtype)
        attention = (0.5 * values + numerator / math.pi) / (0.5 + denominator / math.pi)
        rays, heads, samples, dim = v.shape
        channels_first = values.permute(0, 1, 3, 2).reshape(rays, heads * dim, samples)  # [R, H*d, S]
        conv_dtype = _compute_dtype(values, self.conv.weight)
        local = F.conv1d(channels_first.to(conv_dtype), self.conv.weight.to(conv_dtype), padding="same",
                         groups=heads * dim)
        local = local.reshape(rays, heads, dim, samples).permute(0, 1, 3, 2)
        return (attention + local.to(attention.dtype)).to(v.dtype)


ATTENTION_CORES = {"hash_quadratic": HashedQuadraticAttention, "hash_linear": HashedLinearAttention,
                   "hash_linear_seed": SeedLinearAttention}
