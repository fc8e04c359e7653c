"""GNT's two transformer blocks, built so that each piece can be swapped module by module.

The ShiftAdd reparameterization replaces: the ray attention's `core` (dot-product -> hashed additive), the
`nn.Linear` layers (-> shift layers) and the `ff` modules (-> shift FFN or Mult/Shift mixture of experts).
Every such piece is therefore its own named submodule with a plain tensor-in/tensor-out interface.
The compiled kernels (kernels.apply.use_kernels_) swap leaves the same way: the view `attn`, the ray block's pre-norm
attention sublayer `attn_sublayer` (x + attn(attn_norm(x)) as one call; where no fused kernel covers it, the ray
attention's `core`; the view block has one too) and each block's pre-norm FFN sublayer `ffn` (x + ff(ff_norm(x))); the block forwards stay.

Shapes: R rays, S samples per ray, V source views, C = netwidth.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """Position-wise MLP C -> hidden -> C (GNT: 64 -> 256 -> 64, ReLU)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x)))))


class PreNormFeedForward(nn.Module):
    """The FFN half of a pre-norm block, x + ff(norm(x)), as one swappable leaf (the fused FFN kernel covers all
    three). It has no parameters of its own: the block owns `ff_norm` and `ff` (their state_dict keys, their
    reparameterization and op counts are unchanged) and passes them in. x [..., C] -> [..., C]."""

    def forward(self, x: torch.Tensor, norm: nn.Module, ff: nn.Module) -> torch.Tensor:
        return x + ff(norm(x))


class PreNormAttention(nn.Module):
    """The attention half of a pre-norm ray block, x + attn(norm(x)), as one swappable leaf (the fused ray-attention
    kernel covers LN, projections, core, out projection and residual). No parameters of its own: the block owns
    `attn_norm` and `attn` and passes them in. x [R, S, C] -> [R, S, C]."""

    def forward(self, x: torch.Tensor, norm: nn.Module, attn: nn.Module) -> torch.Tensor:
        return x + attn(norm(x))


class PreNormViewAttention(nn.Module):
    """The attention half of a pre-norm view block, q + attn(norm(q), features, ray_diff, mask), as one swappable
    leaf (the fused view-attention sublayer kernel covers LN, q_fc, the attention, out_fc and the residual). No
    parameters of its own. q [R, S, C], features [R, S, V, C], ray_diff [R, S, V, 4], mask [R, S, V, 1]."""

    def forward(self, q, features, ray_diff, mask, norm: nn.Module, attn: nn.Module) -> torch.Tensor:
        return q + attn(norm(q), features, ray_diff, mask)


class ViewAttention(nn.Module):
    """Subtraction-based vector attention of one point's query over its V source views.

    logits = attn_mlp(k - q + pos) give one weight per *channel* and view; a softmax over the views (invisible
    views masked out) mixes the values: out = sum_v softmax_v(logits) * (v + pos); 0 where no view is visible.
    q: [R, S, C], features: [R, S, V, C], ray_diff: [R, S, V, 4], mask: [R, S, V, 1] (1 = visible).
    GNT computes v from the already k-projected features (v_fc(k_fc(x))); here v = v_fc(x), the same function
    class with one fewer matmul.
    """

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        hidden = max(dim // 8, 1)
        self.q_fc = nn.Linear(dim, dim, bias=False)
        self.k_fc = nn.Linear(dim, dim, bias=False)
        self.v_fc = nn.Linear(dim, dim, bias=False)
        self.pos_fc1 = nn.Linear(4, hidden)
        self.pos_fc2 = nn.Linear(hidden, dim)
        self.attn_fc1 = nn.Linear(dim, hidden)
        self.attn_fc2 = nn.Linear(hidden, dim)
        self.out_fc = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, features: torch.Tensor, ray_diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out_fc(self.attend(self.q_fc(q), features, ray_diff, mask)))

    def attend(self, qp: torch.Tensor, features: torch.Tensor, ray_diff: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """Everything between q_fc and out_fc (what the fused kernels compute): qp [..., C] (the projected query),
        features [..., V, C], ray_diff [..., V, 4], mask [..., V, 1] -> [..., C]."""
        k = self.k_fc(features)
        v = self.v_fc(features)
        pos = self.pos_fc2(F.relu(self.pos_fc1(ray_diff)))
        logits = self.attn_fc2(F.relu(self.attn_fc1(k - qp[..., None, :] + pos)))  # [..., V, C]
        logits = logits.masked_fill(mask == 0, torch.finfo(logits.dtype).min)
        # x mask: a point no view sees gets no value at all (instead of a uniform mix of zero-padded samples)
        weights = self.dropout(torch.softmax(logits, dim=-2) * mask)
        return ((v + pos) * weights).sum(dim=-2)  # [..., C]


class DotProductAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v per head: q, k, v [R, H, S, d] -> [R, H, S, d]. The swappable attention core."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class RayAttention(nn.Module):
    """Multi-head self-attention across the S samples of each ray: x [R, S, C] -> [R, S, C]."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_fc = nn.Linear(dim, dim, bias=False)
        self.k_fc = nn.Linear(dim, dim, bias=False)
        self.v_fc = nn.Linear(dim, dim, bias=False)
        self.core = DotProductAttention()
        self.out_fc = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        rays, samples, dim = x.shape
        return x.view(rays, samples, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._split_heads(fc(x)) for fc in (self.q_fc, self.k_fc, self.v_fc))
        out = self.core(q, k, v)  # [R, H, S, d]
        out = out.transpose(1, 2).flatten(2)
        return self.dropout(self.out_fc(out))


class ViewTransformerBlock(nn.Module):
    """Pre-norm residual block: q <- q + ViewAttention(LN(q), ...); q <- q + FFN(LN(q))."""

    def __init__(self, dim: int, ff_hidden: int, dropout: float = 0.0):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViewAttention(dim, dropout)
        self.ff_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim, ff_hidden, dropout)
        self.attn_sublayer = PreNormViewAttention()
        self.ffn = PreNormFeedForward()

    def forward(self, q, features, ray_diff, mask):
        q = self.attn_sublayer(q, features, ray_diff, mask, self.attn_norm, self.attn)
        return self.ffn(q, self.ff_norm, self.ff)


class RayTransformerBlock(nn.Module):
    """Pre-norm residual block: x <- x + RayAttention(LN(x)); x <- x + FFN(LN(x))."""

    def __init__(self, dim: int, num_heads: int, ff_hidden: int, dropout: float = 0.0):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RayAttention(dim, num_heads, dropout)
        self.ff_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim, ff_hidden, dropout)
        self.attn_sublayer = PreNormAttention()
        self.ffn = PreNormFeedForward()

    def forward(self, x):
        x = self.attn_sublayer(x, self.attn_norm, self.attn)
        return self.ffn(x, self.ff_norm, self.ff)
