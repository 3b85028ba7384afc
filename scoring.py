"""Scoring restored images against clean ones, per image, per degradation type and overall.

Two sets of metrics, labelled apart everywhere they are shown:

* **RGB**, the way the homework grader computes them: PSNR and SSIM on the uint8-rounded RGB image, whole image, no
  border crop;
* **Y**, the way the deraining literature (Rain100L/H and the papers after them) reports them: on the luma of
  MATLAB's ``rgb2ycbcr`` (ITU-R BT.601, studio range) of the uint8 images, ``Y = 16 + (65.481 R + 128.553 G +
  24.966 B) / 255`` for R, G, B in 0..255, kept in floating point (not rounded); PSNR with peak 255 and SSIM on that
  single channel with the same window.

The images of a set are paired with their clean partners by :func:`find_clean` (``dataloader``'s pairing rule),
scored by :func:`evaluate`, summarised by :func:`summarize` and shown by :func:`format_table` and :func:`write_csv`.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from dataloader import DataError, clean_partner_stem, images_by_stem
from utils import atomic_write, listing, to_uint8

SSIM_WINDOW = 11  # the side of SSIM's Gaussian window: smaller images get no SSIM
SSIM_MIN_SIZE = SSIM_WINDOW
Y_WEIGHTS = (65.481, 128.553, 24.966)  # MATLAB rgb2ycbcr's luma row, for R, G, B in [0, 1] giving 0..219
Y_OFFSET = 16.0


# ----------------------------------------------------------------------------------------------------------- metrics
def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected an image (C, H, W) or a batch (B, C, H, W), got shape {tuple(x.shape)}")
    return x


def _quantised_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images as float64 in 0..255 after uint8 rounding (float inputs are taken as [0, 1])."""
    pred, target = _as_batch(pred), _as_batch(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    q = lambda t: t if t.dtype == torch.uint8 else to_uint8(t)  # noqa: E731
    return q(pred).double(), q(target).double()


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """The BT.601 luma of MATLAB's ``rgb2ycbcr`` for RGB values in 0..255 (B, 3, H, W): float64 (B, 1, H, W) in
    16..235, not rounded."""
    if rgb.shape[-3] != 3:
        raise ValueError(f"the Y channel needs RGB images (3 channels), got {rgb.shape[-3]}")
    weights = torch.tensor(Y_WEIGHTS, dtype=torch.float64, device=rgb.device).view(1, 3, 1, 1) / 255
    return Y_OFFSET + (rgb.double() * weights).sum(-3, keepdim=True)


def _psnr_values(p: torch.Tensor, t: torch.Tensor) -> list[float]:
    """PSNR with peak 255 of each image of two float64 batches in 0..255; ``inf`` where they are equal."""
    mse = (p - t).pow(2).flatten(1).mean(1)
    return [float("inf") if m == 0 else 10.0 * math.log10(255.0**2 / float(m)) for m in mse]


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def _ssim_values(p: torch.Tensor, t: torch.Tensor) -> list[float]:
    """SSIM of each image of two float64 batches in 0..255, per channel, averaged over channels and positions."""
    if min(p.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(p.shape[-2:])}")
    c = p.shape[1]
    window = _gaussian_window().to(p.device).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)
    blur = lambda x: F.conv2d(x, window, groups=c)  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_p, mu_t = blur(p), blur(t)
    var_p = blur(p * p) - mu_p**2
    var_t = blur(t * t) - mu_t**2
    cov = blur(p * t) - mu_p * mu_t
    ssim_map = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return [float(v) for v in ssim_map.flatten(1).mean(1)]


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """PSNR of each image the way the grader computes it: uint8-rounded RGB, whole image, no border crop.

    Float inputs are taken as [0, 1] and quantised with :func:`to_uint8`; uint8 inputs are used as they are.
    Identical images score ``inf``.
    """
    return _psnr_values(*_quantised_pair(pred, target))


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the batch of :func:`psnr_per_image` (a single image gives its own PSNR)."""
    values = psnr_per_image(pred, target)
    return sum(values) / len(values)


def ssim_per_image(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """SSIM (Wang et al. 2004) on uint8-rounded RGB: 11x11 Gaussian window (sigma 1.5), no padding,
    K1 = 0.01, K2 = 0.03, computed per channel and averaged over channels and positions."""
    return _ssim_values(*_quantised_pair(pred, target))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the batch of :func:`ssim_per_image`."""
    values = ssim_per_image(pred, target)
    return sum(values) / len(values)


def psnr_y_per_image(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """PSNR on the Y channel (:func:`luma` of the uint8-rounded images, peak 255), as the deraining literature
    reports it; ``inf`` where the lumas are equal."""
    p, t = _quantised_pair(pred, target)
    return _psnr_values(luma(p), luma(t))


def psnr_y(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the batch of :func:`psnr_y_per_image`."""
    values = psnr_y_per_image(pred, target)
    return sum(values) / len(values)


def ssim_y_per_image(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """SSIM on the Y channel (:func:`luma`, not rounded), with the window and constants of :func:`ssim_per_image`."""
    p, t = _quantised_pair(pred, target)
    return _ssim_values(luma(p), luma(t))


def ssim_y(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the batch of :func:`ssim_y_per_image`."""
    values = ssim_y_per_image(pred, target)
    return sum(values) / len(values)


# ------------------------------------------------------------------------------------------------------ per image
@dataclass(frozen=True)
class Score:
    """Scores of one restored image against its clean image. ``psnr`` and ``ssim`` are on RGB (the grader's),
    ``psnr_y`` and ``ssim_y`` on the Y channel (the literature's; NaN when not computed); both SSIMs are NaN for
    images under ``SSIM_MIN_SIZE`` pixels on a side.

    Args:
        name: the degraded image's file name.
        kind: its degradation type (``dataloader.degradation_type``).
        psnr, ssim: RGB PSNR (dB) and SSIM.
        psnr_y, ssim_y: Y-channel PSNR (dB) and SSIM.
    """

    name: str
    kind: str
    psnr: float
    ssim: float
    psnr_y: float = math.nan
    ssim_y: float = math.nan


def score_image(name: str, kind: str, pred: torch.Tensor, clean: torch.Tensor) -> Score:
    """Every metric of one restored image (uint8 or [0, 1] float, (3, H, W)) against its clean image."""
    small = min(pred.shape[-2:]) < SSIM_MIN_SIZE
    return Score(name, kind, psnr(pred, clean), math.nan if small else ssim(pred, clean),
                 psnr_y(pred, clean), math.nan if small else ssim_y(pred, clean))


def find_clean(names: Sequence[str], gt_folder: str | os.PathLike) -> dict[str, Path]:
    """``{name: clean image}`` for every degraded file name, paired as ``dataloader.find_pairs`` pairs: the homework
    partner (``rain-12.png`` -> ``rain_clean-12.*``) or the same stem.

    Raises:
        DataError: the folder is missing, holds several files of one stem (``dataloader.images_by_stem``: which is
            the clean image would be a guess), or naming every image without a clean partner.
    """
    clean_by_stem = images_by_stem(gt_folder)
    partners, missing = {}, []
    for name in names:
        found = clean_by_stem.get(clean_partner_stem(Path(name).stem, clean_by_stem))
        if found is None:
            missing.append(name)
        partners[name] = found
    if missing:
        raise DataError(f"{len(missing)} images have no clean partner in {gt_folder} (same stem, or <type>_clean-<N> "
                        f"for <type>-<N>): {listing(missing)}")
    return partners


class PairedImages(Protocol):
    """What :func:`evaluate` needs of the images predictions were made from (``inference.InputSet`` is one)."""

    def kind(self, name: str) -> str: ...

    def clean(self, name: str) -> torch.Tensor: ...


def evaluate(preds: Mapping[str, np.ndarray | torch.Tensor], inputs: PairedImages) -> list[Score]:
    """Every metric (:func:`score_image`) of each prediction against its clean image, in the order of ``preds``.

    Args:
        preds: uint8 arrays (3, H, W) by file name, as in ``pred.npz``.
        inputs: the images they were made from, with their types and clean images.

    Raises:
        DataError: a prediction's size differs from its clean image's (all named).
    """
    scores, problems = [], []
    for name, pred in preds.items():
        clean, pred = inputs.clean(name), torch.as_tensor(pred)
        if clean.shape != pred.shape:
            problems.append(f"  {name}: restored {tuple(pred.shape)}, clean {tuple(clean.shape)}")
            continue
        scores.append(score_image(name, inputs.kind(name), pred, clean))
    if problems:
        raise DataError("restored and clean images differ in size:\n" + "\n".join(problems))
    return scores


# ------------------------------------------------------------------------------------------------------- summaries
class Mean(NamedTuple):
    """Means over a group of images; each leaves out the images without that metric (NaN)."""

    images: int
    psnr: float
    ssim: float
    psnr_y: float
    ssim_y: float


def _mean(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN; NaN when there are none."""
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def summarize(scores: Sequence[Score]) -> dict[str, Mean]:
    """``{type: Mean}`` for each type, then ``"overall"`` (the mean over all images). The SSIM means leave out the
    images without one (NaN); a group with none has NaN."""
    groups: dict[str, list[Score]] = {}
    for score in scores:
        groups.setdefault(score.kind, []).append(score)
    groups = dict(sorted(groups.items()))
    groups["overall"] = list(scores)
    return {kind: Mean(len(group), *(_mean([getattr(s, m) for s in group]) for m in ("psnr", "ssim", "psnr_y",
                                                                                       "ssim_y")))
            for kind, group in groups.items()}


def _has_y(scores: Sequence[Score]) -> bool:
    return any(not math.isnan(s.psnr_y) for s in scores)


def format_table(scores: Sequence[Score]) -> str:
    """Per-image rows, then one row per type (when there are several) and the overall mean. Columns "PSNR RGB" and
    "SSIM RGB" (the grader's), and "PSNR Y" and "SSIM Y" (the literature's) when the scores hold them; an SSIM left
    out (NaN: images under ``SSIM_MIN_SIZE`` pixels) shows as n/a, and a note says so."""
    summary = {kind: (f"mean of {m.images}", m) for kind, m in summarize(scores).items()}
    if len(summary) == 2:  # a single type: its row would repeat the overall one
        summary = {"overall": summary["overall"]}
    with_y = _has_y(scores)
    columns = [("PSNR RGB", "psnr", 9, ".3f"), ("SSIM RGB", "ssim", 8, ".4f")]
    if with_y:
        columns += [("PSNR Y", "psnr_y", 9, ".3f"), ("SSIM Y", "ssim_y", 8, ".4f")]
    width = max(len(name) for name in ["image", *(s.name for s in scores), *(label for label, _ in summary.values())])
    kwidth = max(len(kind) for kind in ["type", *summary])

    def row(name: str, kind: str, values: Score | Mean) -> str:
        cells = [f"{'n/a' if math.isnan(v := getattr(values, key)) else format(v, spec):>{w}}"
                 for _, key, w, spec in columns]
        return f"{name:<{width}}  {kind:<{kwidth}}  " + "  ".join(cells)

    lines = [f"{'image':<{width}}  {'type':<{kwidth}}  " + "  ".join(f"{label:>{w}}" for label, _, w, _ in columns)]
    lines += [row(s.name, s.kind, s) for s in scores]
    lines.append("-" * len(lines[0]))
    lines += [row(label, kind, mean) for kind, (label, mean) in summary.items()]
    lines.append("PSNR in dB. RGB: uint8 RGB, whole image (the grader's)" +
                 ("; Y: BT.601 luma of MATLAB rgb2ycbcr, peak 255 (the deraining literature's)" if with_y else ""))
    no_ssim = sum(math.isnan(s.ssim) for s in scores)
    if no_ssim:
        lines.append(f"SSIM n/a: {no_ssim} images under {SSIM_MIN_SIZE}x{SSIM_MIN_SIZE} pixels (its window); the "
                     "SSIM means leave them out")
    return "\n".join(lines)


CSV_COLUMNS = ["level", "name", "type", "images", "psnr", "ssim", "psnr_y", "ssim_y"]


def write_csv(path: str | os.PathLike, scores: Sequence[Score]) -> Path:
    """Write the scores as CSV, atomically (``utils.atomic_write``): columns level (image, type, overall), name,
    type, images, psnr and ssim (RGB, the grader's), psnr_y and ssim_y (Y channel, the literature's); ``nan`` where
    an image has no such value (the means leave those out)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(CSV_COLUMNS)
    metrics = lambda x: [repr(float(x.psnr)), repr(float(x.ssim)), repr(float(x.psnr_y)),  # noqa: E731
                         repr(float(x.ssim_y))]
    writer.writerows(["image", s.name, s.kind, 1, *metrics(s)] for s in scores)
    for kind, mean in summarize(scores).items():
        writer.writerow(["overall" if kind == "overall" else "type", "", kind if kind != "overall" else "",
                         mean.images, *metrics(mean)])
    return atomic_write(path, lambda f: f.write(text.getvalue().encode("utf-8")))
