"""An ImageNet-trained feature extractor for GNT, available offline: AlexNet's first two stages.

GNT's quality rests on multi-view features that let the view transformer tell which source views agree about a
point. Trained from scratch, the ResUNet needs many steps to learn them, and on a CPU its forward + backward pass
over the source views is most of a training step. AlexNet's conv1/conv2 (the LPIPS weights the project already
converts, see evaluation/lpips.py) are generic edge/texture detectors: frozen, they need no backward pass, and
their maps for an image never change, so in training they are computed once per image and reused
(`BackboneCache`; at inference every call computes them, so op counts and timings include them). Only a small
1x1 projection to `feature_channels` is trained.

images [B, 3, H, W] in [0, 1] -> features [B, out_channels, h, w] at conv1's resolution (about H/4), like ResUNet.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from gnt_shiftadd.evaluation.lpips import load_lpips

# LPIPS' input scaling (x in [-1, 1] -> (x - shift) / scale), which the AlexNet weights expect
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class BackboneCache:
    """Frozen-backbone maps per distinct input image, checked for exact equality on every hit (never a stale map).

    Keyed by the image's shape and a few sampled values; a hit also compares the whole image with torch.equal, which
    costs far less than the convolutions it saves. Least-recently-used entries beyond `capacity` are dropped.
    """

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(image: torch.Tensor) -> tuple:
        flat = image.reshape(-1)
        probe = flat[:: max(flat.numel() // 31, 1)][:32]
        return (tuple(image.shape), str(image.device), tuple(probe.tolist()))

    def get(self, image: torch.Tensor, compute) -> tuple[torch.Tensor, ...]:
        key = self._key(image)
        entry = self.entries.get(key)
        if entry is not None and torch.equal(entry[0], image):
            self.entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        self.misses += 1
        maps = compute(image[None])
        self.entries[key] = (image.detach().clone(), tuple(m[0] for m in maps))
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return self.entries[key][1]

    def clear(self) -> None:
        self.entries.clear()


class AlexNetFeatures(nn.Module):
    """Frozen AlexNet conv1 (64 ch, stride 4) + conv2 (192 ch, 1/8) -> trained 1x1 convs -> out_channels at 1/4.

    The frozen convolutions are saved in checkpoints but never optimised (requires_grad False, run under no_grad);
    a fresh model gets them from `load_imagenet_weights()` (the LPIPS AlexNet file; see evaluation/lpips.py for
    how it is fetched offline), a trained one from its checkpoint.
    """

    def __init__(self, out_channels: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 11, stride=4, padding=2)
        self.conv2 = nn.Conv2d(64, 192, 5, padding=2)
        self.conv1.requires_grad_(False)
        self.conv2.requires_grad_(False)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        # each stage projected at its own resolution (cheaper than projecting the upsampled 256-channel stack)
        self.project1 = nn.Conv2d(64, out_channels, 1)
        self.project2 = nn.Conv2d(192, out_channels, 1)
        self.out_conv = nn.Conv2d(out_channels, out_channels, 1)
        self.cache = BackboneCache()

    def load_imagenet_weights(self, weights_path=None) -> None:
        lpips = load_lpips("alex", weights_path=weights_path)
        with torch.no_grad():
            for target, source in ((self.conv1, lpips.stages[0][0]), (self.conv2, lpips.stages[1][1])):
                target.weight.copy_(source.weight)
                target.bias.copy_(source.bias)
        self.cache.clear()

    def _load_from_state_dict(self, *args, **kwargs):
        self.cache.clear()  # maps computed with the old weights must not survive a checkpoint load
        super()._load_from_state_dict(*args, **kwargs)

    def backbone(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] in [0, 1] -> conv1 maps [B, 64, ~H/4, ~W/4], conv2 maps [B, 192, ~H/8, ~W/8] (ReLU'd)."""
        with torch.no_grad():
            x = ((images * 2.0 - 1.0) - self.shift) / self.scale
            c1 = F.relu(self.conv1(x))
            c2 = F.relu(self.conv2(F.max_pool2d(c1, 3, 2)))
        return c1, c2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            maps = [self.cache.get(image, self.backbone) for image in images.detach()]
            c1, c2 = torch.stack([m[0] for m in maps]), torch.stack([m[1] for m in maps])
        else:
            c1, c2 = self.backbone(images)
        coarse = F.interpolate(self.project2(c2), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        return self.out_conv(F.relu(self.project1(c1) + coarse))
