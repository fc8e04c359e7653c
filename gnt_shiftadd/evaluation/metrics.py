"""Image-quality metrics for rendered views: PSNR, SSIM and LPIPS on [H,W,3] images in [0,1]."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import kornia
import numpy as np
import torch

from gnt_shiftadd.evaluation.lpips import LPIPS, LPIPSUnavailable, cached_weights_path, load_lpips, lpips_distance

# LPIPS setups that already failed in this process: not retried (a failing pip download takes seconds), not re-warned
_LPIPS_FAILURES: set[tuple[str, str, bool]] = set()


def _as_tensor(image) -> torch.Tensor:
    return image if torch.is_tensor(image) else torch.from_numpy(np.asarray(image))


def _pair(pred, target) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images as float tensors on pred's device, after checking they match in shape."""
    pred, target = _as_tensor(pred), _as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"image shapes differ: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    return pred.float(), target.to(pred.device, torch.float32)


def mse_to_psnr(mse):
    """PSNR in dB for a mean squared error of images in [0,1]; a float gives a float, a tensor a tensor."""
    if torch.is_tensor(mse):
        return -10.0 * torch.log10(mse)
    return math.inf if mse <= 0 else -10.0 * math.log10(mse)


def psnr(pred, target) -> float:
    """PSNR (dB) from the MSE over all pixels and channels; inf for identical images."""
    pred, target = _pair(pred, target)
    mse = (pred.double() - target.double()).pow(2).mean().item()
    return mse_to_psnr(mse)


def ssim(pred, target, window_size: int = 11) -> float:
    """Mean of kornia's SSIM map (Gaussian window 11, max_val 1.0) for [H,W,3] images."""
    pred, target = _pair(pred, target)
    pred, target = pred.permute(2, 0, 1)[None], target.permute(2, 0, 1)[None]
    return kornia.metrics.ssim(pred, target, window_size, max_val=1.0).mean().item()


class ImageMetrics:
    """metrics(pred, target) -> {"psnr", "ssim", "lpips"} for one [H,W,3] pair in [0,1].

    LPIPS weights load on first use. If they cannot be had (no cache, no PyPI), this warns once per process
    with the cause and the fix and reports lpips=None, never a stand-in number.
    """

    def __init__(self, use_lpips: bool = True, net: str = "alex", weights_path: str | Path | None = None,
                 fetch: bool = True):
        self.use_lpips = use_lpips
        self.net, self.weights_path, self.fetch = net, weights_path, fetch
        self._lpips: LPIPS | None = None

    def lpips_model(self) -> LPIPS | None:
        if not self.use_lpips:
            return None
        setup = (self.net, str(self.weights_path or cached_weights_path(self.net)), self.fetch)
        if self._lpips is None and setup not in _LPIPS_FAILURES:
            try:
                self._lpips = load_lpips(self.net, self.weights_path, self.fetch)
            except LPIPSUnavailable as exc:
                _LPIPS_FAILURES.add(setup)
                warnings.warn(f"LPIPS disabled, reporting lpips=None. {exc}", RuntimeWarning, stacklevel=3)
        return self._lpips

    def __call__(self, pred, target) -> dict[str, float | None]:
        pred, target = _pair(pred, target)
        model = self.lpips_model()
        if model is not None:
            model.to(pred.device)
        return {
            "psnr": psnr(pred, target),
            "ssim": ssim(pred, target),
            "lpips": lpips_distance(pred, target, model=model) if model is not None else None,
        }
