"""How GNT's final per-sample tokens become a pixel colour.

`RegressColorHead` is GNT's: a linear layer on the mean over the ray's samples. The colour must be synthesised
by the network itself, which a small model trained for minutes does only as a blur.
`BlendColorHead` keeps the transformer but lets it *choose* colours instead of synthesising them (the
image-based-rendering form that IBRNet uses): per sample, a softmax over the visible source views blends the
colours those views see there; per ray, a softmax over the samples (the ray transformer's learned notion of
where the surface is) mixes the per-sample colours. Every output is a convex combination of real source pixels,
so edges and texture come from the photos.

Shapes: q [R, S, C] final tokens, features [R, S, V, C] per-view embedded features, colors [R, S, V, 3] what each
view sees at each sample, ray_diff [R, S, V, 4], mask [R, S, V, 1] (1 = visible) -> rgb [R, 3].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RegressColorHead(nn.Module):
    """GNT: rgb = Linear(LN(mean over samples of q)); unbounded (clamp for display)."""

    needs_colors = False

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.rgb_fc = nn.Linear(dim, 3)

    def forward(self, q, features=None, colors=None, ray_diff=None, mask=None) -> torch.Tensor:
        return self.rgb_fc(self.norm(q).mean(dim=1))


class BlendColorHead(nn.Module):
    """rgb = sum_s a_s sum_v w_{s,v} colors_{s,v}; w = softmax over visible views of MLP(feature_v, q_s, ray_diff_v),
    a = softmax over samples of Linear(LN(q_s)). A sample no view sees has no colour (its blend is 0) and is left
    out of a; a ray none of whose samples is seen renders black."""

    needs_colors = True

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.view_fc1 = nn.Linear(2 * dim + 4, hidden)
        self.view_fc2 = nn.Linear(hidden, 1)
        self.sample_fc = nn.Linear(dim, 1)

    def forward(self, q, features, colors, ray_diff, mask) -> torch.Tensor:
        h = self.norm(q)  # [R, S, C]
        per_view = torch.cat([features, h[:, :, None, :].expand_as(features), ray_diff], dim=-1)
        logits = self.view_fc2(F.relu(self.view_fc1(per_view)))  # [R, S, V, 1]
        visible = mask > 0
        logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
        view_weights = torch.softmax(logits, dim=2) * mask  # 0 for a sample no view sees
        sample_colors = (view_weights * colors).sum(dim=2)  # [R, S, 3]
        seen = visible.any(dim=2)  # [R, S, 1]
        sample_logits = self.sample_fc(h).masked_fill(~seen, -1e4)  # unseen samples only when nothing is seen
        sample_weights = torch.softmax(sample_logits, dim=1)  # [R, S, 1]
        return (sample_weights * sample_colors).sum(dim=1)


def make_color_head(kind: str, dim: int) -> nn.Module:
    if kind == "regress":
        return RegressColorHead(dim)
    if kind == "blend":
        return BlendColorHead(dim)
    raise ValueError(f"unknown color head {kind!r}; choose regress or blend")
