"""Scoring restored images: PSNR and SSIM the way the homework grader computes them (uint8-rounded RGB, whole image,
no border crop), per image, per degradation type and overall.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils import to_uint8


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected an image (C, H, W) or a batch (B, C, H, W), got shape {tuple(x.shape)}")
    return x


def _quantised_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = _as_batch(pred), _as_batch(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    q = lambda t: t if t.dtype == torch.uint8 else to_uint8(t)  # noqa: E731
    return q(pred).double(), q(target).double()


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """PSNR of each image the way the grader computes it: uint8-rounded RGB, whole image, no border crop.

    Float inputs are taken as [0, 1] and quantised with :func:`to_uint8`; uint8 inputs are used as they are.
    Identical images score ``inf``.
    """
    p, t = _quantised_pair(pred, target)
    mse = (p - t).pow(2).flatten(1).mean(1)
    return [float("inf") if m == 0 else 10.0 * math.log10(255.0**2 / float(m)) for m in mse]


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the batch of :func:`psnr_per_image` (a single image gives its own PSNR)."""
    values = psnr_per_image(pred, target)
    return sum(values) / len(values)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_per_image(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """SSIM (Wang et al. 2004) on uint8-rounded RGB: 11x11 Gaussian window (sigma 1.5), no padding,
    K1 = 0.01, K2 = 0.03, computed per channel and averaged over channels and positions."""
    p, t = _quantised_pair(pred, target)
    c = p.shape[1]
    window = _gaussian_window().to(p.device).expand(c, 1, 11, 11)
    if min(p.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(p.shape[-2:])}")
    blur = lambda x: F.conv2d(x, window, groups=c)  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_p, mu_t = blur(p), blur(t)
    var_p = blur(p * p) - mu_p**2
    var_t = blur(t * t) - mu_t**2
    cov = blur(p * t) - mu_p * mu_t
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return [float(v) for v in ssim_map.flatten(1).mean(1)]


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the batch of :func:`ssim_per_image`."""
    values = ssim_per_image(pred, target)
    return sum(values) / len(values)
