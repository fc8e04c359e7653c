"""A linear layer over concatenated inputs whose leading block is a shift layer and whose other inputs stay dense.

BlendColorHead's view_fc1 reads [feature_v (C) | h (C) | ray_diff_v (4)] per (sample, view). Its feature block is
the layer's bulk (C x H per view, against 4 x H per view and C x H once per sample) and reads one kind of value,
the front end's per-view features, so one activation scale serves it: shiftadd.head: shift makes that block a
shift layer (an integer shift layer with int_activations, on VNNI in the blend-head kernel). The h and ray_diff
blocks mix other ranges and stay dense.

    y = first(x[..., :block]) + rest(x[..., block:])        first: ShiftLinear or IntShiftLinear, no bias
                                                            rest:  nn.Linear with the layer's bias
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec

__all__ = ["BlockShiftLinear"]


class BlockShiftLinear(nn.Module):
    """x [..., block + rest_in] -> first(x[..., :block]) + rest(x[..., block:]) [..., out]."""

    def __init__(self, first: nn.Module, rest: nn.Linear):
        super().__init__()
        if first.out_features != rest.out_features:
            raise ValueError(f"BlockShiftLinear: first gives {first.out_features} outputs, rest {rest.out_features}")
        self.first, self.rest = first, rest

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int, spec: ShiftSpec) -> "BlockShiftLinear":
        """The trained `linear` split after its first `block` inputs; that block rounded to a shift layer."""
        if not 0 < block < linear.in_features:
            raise ValueError(f"BlockShiftLinear: block must be in 1..{linear.in_features - 1}, got {block}")
        weight = linear.weight.detach()
        dense_first = nn.Linear(block, linear.out_features, bias=False).to(weight.device, weight.dtype)
        rest = nn.Linear(linear.in_features - block, linear.out_features, bias=linear.bias is not None)
        rest = rest.to(weight.device, weight.dtype)
        with torch.no_grad():
            dense_first.weight.copy_(weight[:, :block])
            rest.weight.copy_(weight[:, block:])
            if linear.bias is not None:
                rest.bias.copy_(linear.bias.detach())
        return cls(ShiftLinear.from_linear(dense_first, spec), rest)

    @property
    def block(self) -> int:
        return self.first.in_features

    @property
    def in_features(self) -> int:
        return self.first.in_features + self.rest.in_features

    @property
    def out_features(self) -> int:
        return self.rest.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x[..., :self.block]) + self.rest(x[..., self.block:])

    def split_forward(self, h: torch.Tensor, features: torch.Tensor, ray_diff: torch.Tensor) -> torch.Tensor:
        """The head's view_fc1([features, h over the views, ray_diff]) without the concatenation (models.heads.
        split_view_linear): first(features) + W_r ray_diff per (sample, view), W_h h + b once per sample.
        h [R, S, C], features [R, S, V, C], ray_diff [R, S, V, 4] -> [R, S, V, hidden]."""
        channels = h.shape[-1]
        per_sample = F.linear(h, self.rest.weight[:, :channels], self.rest.bias)
        per_view = self.first(features) + F.linear(ray_diff, self.rest.weight[:, channels:])
        return per_view + per_sample[:, :, None, :]
