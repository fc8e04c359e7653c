"""A linear layer over concatenated inputs whose leading block (and optionally one later block) is a shift layer
and whose other inputs stay dense.

BlendColorHead's view_fc1 reads [feature_v (C) | h (C) | ray_diff_v (4)] per (sample, view). Its feature block is
the layer's bulk (C x H per view, against 4 x H per view and C x H once per sample) and reads one kind of value,
the front end's per-view features, so one activation scale serves it: shiftadd.head: shift makes that block a
shift layer (an integer shift layer with int_activations, on VNNI in the blend-head kernel). The h and ray_diff
blocks mix other ranges and stay dense.

GNT's position fusion's first layer reads [q (C) | point (3) | sin, cos of the point's frequencies (6F) | direction
code] per sample: shiftadd.position_fusion: shift makes the query block `first` and the sines and cosines (values in
[-1, 1]) `second`, each with its own activation scale; the raw coordinates (another range) and the direction code
(once per ray) stay dense in `rest`.

    y = first(x[..., :block]) + rest(x[..., the other inputs])              first, second: ShiftLinear or
        (+ second(x[..., second_start:second_start + second.in_features]))  IntShiftLinear, no bias;
                                                                            rest: nn.Linear with the layer's bias
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.shiftadd.shift_linear import ShiftLinear, ShiftSpec

__all__ = ["BlockShiftLinear"]


class BlockShiftLinear(nn.Module):
    """x [..., in] -> first(x[..., :block]) + rest(the inputs no shift block reads) (+ second(its block)) [..., out].
    second_start: where the second shift block starts (0 without one)."""

    def __init__(self, first: nn.Module, rest: nn.Linear, second: nn.Module | None = None, second_start: int = 0):
        super().__init__()
        for name, layer in (("first", first), ("second", second)):
            if layer is not None and layer.out_features != rest.out_features:
                raise ValueError(f"BlockShiftLinear: {name} gives {layer.out_features} outputs, rest "
                                 f"{rest.out_features}")
        if second is not None and second_start < first.in_features:
            raise ValueError(f"BlockShiftLinear: the second block must start after the first ({first.in_features}), "
                             f"got {second_start}")
        self.first, self.rest = first, rest
        if second is not None:
            self.second = second
        self.second_start = second_start if second is not None else 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int, spec: ShiftSpec,
                    second: tuple[int, int] | None = None) -> "BlockShiftLinear":
        """The trained `linear` split after its first `block` inputs, that block rounded to a shift layer; second =
        (start, width): those inputs (after the first block) rounded to a second shift layer."""
        if not 0 < block < linear.in_features:
            raise ValueError(f"BlockShiftLinear: block must be in 1..{linear.in_features - 1}, got {block}")
        weight = linear.weight.detach()
        columns = torch.ones(linear.in_features, dtype=torch.bool)
        columns[:block] = False
        if second is not None:
            start, width = second
            if start < block or width < 1 or start + width > linear.in_features or block + width >= linear.in_features:
                raise ValueError(f"BlockShiftLinear: second block {second} does not fit after {block} of "
                                 f"{linear.in_features} inputs with dense inputs left over")
            columns[start:start + width] = False

        def shift_block(start: int, width: int) -> ShiftLinear:
            dense = nn.Linear(width, linear.out_features, bias=False).to(weight.device, weight.dtype)
            with torch.no_grad():
                dense.weight.copy_(weight[:, start:start + width])
            return ShiftLinear.from_linear(dense, spec)

        rest = nn.Linear(int(columns.sum()), linear.out_features, bias=linear.bias is not None)
        rest = rest.to(weight.device, weight.dtype)
        with torch.no_grad():
            rest.weight.copy_(weight[:, columns.to(weight.device)])
            if linear.bias is not None:
                rest.bias.copy_(linear.bias.detach())
        return cls(shift_block(0, block), rest, shift_block(*second) if second is not None else None,
                   second[0] if second is not None else 0)

    @property
    def block(self) -> int:
        return self.first.in_features

    @property
    def has_second(self) -> bool:
        return "second" in self._modules

    @property
    def in_features(self) -> int:
        return self.first.in_features + self.rest.in_features + (self.second.in_features if self.has_second else 0)

    @property
    def out_features(self) -> int:
        return self.rest.out_features

    def assembled_weight(self, block_weight) -> torch.Tensor:
        """The whole layer's weight [out, in], each block's columns where its inputs are; block_weight(layer) gives
        a shift block's dense weight (e.g. its decoded +-2^k)."""
        weight = torch.cat([block_weight(self.first), self.rest.weight.detach()], dim=1)
        if not self.has_second:
            return weight
        start = self.second_start
        return torch.cat([weight[:, :start], block_weight(self.second), weight[:, start:]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_second:
            return self.first(x[..., :self.block]) + self.rest(x[..., self.block:])
        start, end = self.second_start, self.second_start + self.second.in_features
        dense = torch.cat([x[..., self.block:start], x[..., end:]], dim=-1)
        return self.first(x[..., :self.block]) + self.second(x[..., start:end]) + self.rest(dense)

    def split_forward(self, h: torch.Tensor, features: torch.Tensor, ray_diff: torch.Tensor) -> torch.Tensor:
        """The head's view_fc1([features, h over the views, ray_diff]) without the concatenation (models.heads.
        split_view_linear): first(features) + W_r ray_diff per (sample, view), W_h h + b once per sample.
        h [R, S, C], features [R, S, V, C], ray_diff [R, S, V, 4] -> [R, S, V, hidden]."""
        channels = h.shape[-1]
        per_sample = F.linear(h, self.rest.weight[:, :channels], self.rest.bias)
        per_view = self.first(features) + F.linear(ray_diff, self.rest.weight[:, channels:])
        return per_view + per_sample[:, :, None, :]
