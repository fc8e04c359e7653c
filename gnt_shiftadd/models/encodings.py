"""NeRF positional encoding: x -> [x, sin(2^k x), cos(2^k x)] for k = 0..num_freqs-1 (log-spaced bands)."""
from __future__ import annotations

import torch
from torch import nn


class PositionalEncoding(nn.Module):
    """[..., D] -> [..., D * (1 + 2 * num_freqs)] (input included, as in NeRF/GNT)."""

    def __init__(self, input_dims: int = 3, num_freqs: int = 10):
        super().__init__()
        self.input_dims = input_dims
        self.num_freqs = num_freqs
        self.register_buffer("freq_bands", 2.0 ** torch.arange(num_freqs, dtype=torch.float32), persistent=False)

    @property
    def out_dim(self) -> int:
        return self.input_dims * (1 + 2 * self.num_freqs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x[..., None, :] * self.freq_bands[:, None]  # [..., F, D]
        encoded = torch.stack([scaled.sin(), scaled.cos()], dim=-2)  # [..., F, 2, D]
        return torch.cat([x, encoded.flatten(-3)], dim=-1)
