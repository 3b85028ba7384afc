"""Restore degraded images with a trained PromptIR, write the submission file ``pred.npz`` and score it.

::

    python inference.py --checkpoint best.pth --input_folder datasets/test/degraded            # writes pred.npz
    python inference.py --checkpoint best.pth --input_folder val/degraded --gt_folder val/clean   # and a score table

``pred.npz`` holds one ``uint8`` array of shape (3, H, W) per input image, keyed by its file name with the extension
(``"0.png"``). Every image is restored with test-time augmentation (the 8 dihedral views of ``augment.py``, each
output mapped back by its exact inverse and averaged in float32) unless ``--tta`` says otherwise; images too large
for the accelerator can be restored in overlapping tiles blended with a smooth window, and an out-of-memory error
retries the image one view at a time, then in tiles, saying so.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from augment import VIEW_NAMES, dihedral, dihedral_inverse
from dataloader import (DataError, Pair, check_pairs, clean_partner_stem, degradation_type, list_images, read_image,
                        read_image_uint8)
from fast_path import enable_fast_path
from model import MIN_SIZE, PRESETS, build_model, load_weights
from scoring import psnr, ssim
from utils import CheckpointError, atomic_write, load_checkpoint, positive_int, to_uint8

log = logging.getLogger("inference")

# The views each --tta setting averages, by name in augment.VIEW_NAMES. 2 and 4 use flips only, so every view keeps
# the image's shape and they always run as one batch.
TTA_VIEWS = {
    1: ("identity",),
    2: ("identity", "hflip"),
    4: ("identity", "hflip", "vflip", "rot180"),
    8: tuple(VIEW_NAMES),
}
DEFAULT_OVERLAP = 32
MIN_RETRY_TILE = 16  # out-of-memory retries halve the tile down to this size, then give up
SSIM_MIN_SIZE = 11  # the side of utils.ssim's window: smaller images are scored without SSIM (NaN)
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------------- model
def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a run folder (``trainer.py --save_dir``) the ``best.pth`` in it, saying so.

    Raises:
        CheckpointError: ``path`` is a folder without ``best.pth`` (naming the checkpoints it holds).
    """
    path = Path(path)
    if not path.is_dir():
        return path
    best = path / "best.pth"
    if not best.is_file():
        held = sorted(p.name for p in path.glob("*.pth"))
        raise CheckpointError(f"checkpoint {path} is a folder without best.pth (it holds "
                              f"{', '.join(held) if held else 'no .pth files'}); give a checkpoint file, such as "
                              f"{path / 'best.pth'} or {path / 'last.pth'} of a trainer.py run")
    log.info("checkpoint %s is a folder: using its best.pth", path)
    return best


def load_model(checkpoint: str | os.PathLike, *, preset: str = "official", use_ema: bool = True,
               trusted: bool = False, device: str | torch.device = "cpu", plain: bool = False,
               compile: bool = False) -> nn.Module:
    """The network of a checkpoint, in eval mode on ``device``.

    Args:
        checkpoint: a file written by ``trainer.py`` or any layout ``model.load_weights`` accepts, or a run folder
            of ``trainer.py``, whose ``best.pth`` is used (:func:`checkpoint_file`).
        preset: model size used when the checkpoint has no ``"model_config"`` (foreign checkpoints).
        use_ema: take the ``"ema"`` weights of our checkpoints when they hold some (the weights trainer.py validated
            and chose ``best.pth`` by); False takes the plain ``"model"`` weights.
        trusted: allow full unpickling (only for files you trust).
        device: where the model runs.
        plain: keep the official formulation instead of the fast path (``model.enable_fast_path``: same weights,
            same function within float rounding, about 2.5x faster on a CPU).
        compile: also compile the blocks with ``torch.compile`` (CUDA only; ignored on other devices).
    """
    checkpoint = checkpoint_file(checkpoint)
    state = load_checkpoint(checkpoint, trusted=trusted)
    config = state.get("model_config") if isinstance(state, Mapping) else None
    model = build_model(**config) if config else build_model(preset)
    if isinstance(state, Mapping) and state.get("ema") is not None:
        log.info("%s holds EMA weights: using %s", checkpoint,
                 "them (--no_ema for the plain ones)" if use_ema else "its plain weights instead (--no_ema)")
        state = state["ema"] if use_ema else state["model"]
    load_weights(model, state)
    model = model.to(device).eval()
    if not plain:
        enable_fast_path(model, compile=compile and torch.device(device).type == "cuda")
    return model


def _run_model(model: nn.Module, batch: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """The one place the network is called: a batch in, a float32 batch of the same shape out."""
    with torch.autocast(batch.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return model(batch).float()


# ----------------------------------------------------------------------------------------------------------- tiling
def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp_window(start: int, length: int, size: int, overlap: int, device: torch.device) -> torch.Tensor:
    """1-D blending weights of one tile: 1 inside, a raised-cosine ramp (never 0) over the overlap on each side
    that meets another tile. Two regular neighbours' ramps sum to exactly 1."""
    weight = torch.ones(length, device=device)
    ramp_len = min(overlap, length // 2)
    if ramp_len == 0:
        return weight
    ramp = torch.sin(math.pi / 2 * (torch.arange(ramp_len, device=device) + 0.5) / ramp_len) ** 2
    if start > 0:
        weight[:ramp_len] = ramp
    if start + length < size:
        weight[-ramp_len:] = torch.minimum(weight[-ramp_len:], ramp.flip(0))
    return weight


def _run_tiled(model: nn.Module, batch: torch.Tensor, tile: int, overlap: int,
               autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Restore ``batch`` tile by tile (tiles of ``tile`` pixels overlapping by at least ``overlap``), blending the
    tiles' outputs with smooth weights so no seam shows."""
    h, w = batch.shape[-2:]
    out = torch.zeros(batch.shape, dtype=torch.float32, device=batch.device)
    weight_sum = torch.zeros((h, w), dtype=torch.float32, device=batch.device)
    th, tw = min(tile, h), min(tile, w)
    for top in _tile_starts(h, tile, overlap):
        wy = _ramp_window(top, th, h, overlap, batch.device)
        for left in _tile_starts(w, tile, overlap):
            weight = wy[:, None] * _ramp_window(left, tw, w, overlap, batch.device)[None, :]
            pred = _run_model(model, batch[..., top:top + th, left:left + tw], autocast_dtype)
            out[..., top:top + th, left:left + tw] += pred * weight
            weight_sum[top:top + th, left:left + tw] += weight
    return out / weight_sum


# -------------------------------------------------------------------------------------------------------- restoring
def _restore_once(model: nn.Module, image: torch.Tensor, views: Sequence[int], tile: int | None, overlap: int,
                  autocast_dtype: torch.dtype | None, batch_views: int | None) -> torch.Tensor:
    """Mean over ``views`` of inverse(model(view(image))), views of one shape batched together."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    plane = torch.empty(image.shape[-2:], device="meta")  # shapes of the views without computing them
    for k in views:
        by_shape.setdefault(tuple(dihedral(plane, k).shape), []).append(k)
    total = torch.zeros(image.shape, dtype=torch.float32, device=image.device)
    for group in by_shape.values():
        step = batch_views or len(group)
        for i in range(0, len(group), step):
            ks = group[i:i + step]
            batch = torch.stack([dihedral(image, k) for k in ks])
            pred = _run_model(model, batch, autocast_dtype) if tile is None else \
                _run_tiled(model, batch, tile, overlap, autocast_dtype)
            for k, out in zip(ks, pred):
                total += dihedral_inverse(out, k)
    return total / len(views)


def _smaller_tile(tile: int | None, height: int, width: int) -> int | None:
    """The next tile size to try after running out of memory: half the current one (or of the image), a multiple
    of 8, or None when that would fall under ``MIN_RETRY_TILE``."""
    half = (tile or max(height, width)) // 2 // 8 * 8
    return half if half >= MIN_RETRY_TILE else None


def restore(model: nn.Module, image: torch.Tensor, *, tta: int = 8, tile: int | None = None,
            overlap: int = DEFAULT_OVERLAP, autocast_dtype: torch.dtype | None = None,
            batch_views: int | None = None) -> torch.Tensor:
    """Restore one image (3, H, W) in [0, 1]; returns the float32 result (3, H, W) on the image's device, not clamped.

    Args:
        model: the network, in eval mode; the image is moved to its device.
        image: the degraded image.
        tta: number of test-time views averaged (``TTA_VIEWS``): 8 (all dihedral views), 4 (flips), 2 (horizontal
            flip), 1 (none).
        tile: restore in tiles of this many pixels (None: the whole image at once).
        overlap: pixels two neighbouring tiles share at least; blended with a raised-cosine window.
        autocast_dtype: ``torch.float16`` or ``torch.bfloat16`` to run the network under autocast; None for fp32.
        batch_views: run at most this many views per network call (None: all views of one shape together).

    A CUDA out-of-memory error first retries the image one view at a time, then in tiles of half the size each
    time, and logs a warning saying so.
    """
    if tta not in TTA_VIEWS:
        raise ValueError(f"tta must be one of {sorted(TTA_VIEWS)}, got {tta}")
    if tile is not None and not 0 <= overlap < tile:
        raise ValueError(f"the tile overlap must be at least 0 and smaller than the tile ({tile}), got {overlap}")
    views = [VIEW_NAMES.index(name) for name in TTA_VIEWS[tta]]
    device = next(model.parameters()).device
    x = image.to(device, torch.float32)
    h, w = x.shape[-2:]
    while True:
        try:
            with torch.inference_mode():
                return _restore_once(model, x, views, tile, overlap, autocast_dtype, batch_views).to(image.device)
        except torch.cuda.OutOfMemoryError:
            pass  # retried below, outside the handler, so the failed attempt's tensors are freed first
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(views) > 1 and batch_views != 1 and tile is None:
            batch_views = 1
            log.warning("out of memory on a %dx%d image: retrying one view at a time", h, w)
            continue
        smaller = _smaller_tile(tile, h, w)
        if smaller is None:
            tried = f"in {tile}-pixel tiles" if tile else "one view at a time"
            raise torch.cuda.OutOfMemoryError(f"out of memory on a {h}x{w} image even {tried}; try --device cpu")
        tile = smaller
        overlap, batch_views = min(overlap, tile // 4), 1
        log.warning("out of memory on a %dx%d image: retrying in %d-pixel tiles (overlap %d), one view at a time",
                    h, w, tile, overlap)


def scan_inputs(folder: str | os.PathLike,
                gt_folder: str | os.PathLike | None = None) -> dict[str, tuple[int, int]]:
    """Decode every image of ``folder`` (and with ``gt_folder`` its clean partner) once, before any work, and
    return ``{file name: (H, W)}``.

    Raises:
        DataError: the folder is missing or holds no images, or some images cannot be read, have no clean partner,
            differ in size from it, or are smaller than the network's ``MIN_SIZE`` (all named at once).
    """
    paths = list_images(folder)
    if gt_folder is not None:
        partners = find_clean([path.name for path in paths], gt_folder)
        pairs = [Pair(path, partners[path.name], degradation_type(path), path.name) for path in paths]
        sizes = {path.name: size for path, size in zip(paths, check_pairs(pairs))}
    else:
        sizes, problems = {}, []
        for path in paths:
            try:
                sizes[path.name] = tuple(read_image_uint8(path).shape[-2:])
            except DataError as err:
                problems.append(f"  {err}")
        if problems:
            raise DataError(f"{len(problems)} of {len(paths)} input images cannot be read; fix or remove them:\n" +
                            "\n".join(problems))
    small = [f"  {path}: {sizes[path.name][1]}x{sizes[path.name][0]} (WxH)" for path in paths
             if min(sizes[path.name]) < MIN_SIZE]
    if small:
        raise DataError(f"{len(small)} of {len(paths)} input images are smaller than {MIN_SIZE}x{MIN_SIZE} pixels, "
                        "the network's smallest input; enlarge or remove them:\n" + "\n".join(small))
    return sizes


def predict_folder(model: nn.Module, input_folder: str | os.PathLike, *, tta: int = 8, tile: int | None = None,
                   overlap: int = DEFAULT_OVERLAP, autocast_dtype: torch.dtype | None = None,
                   batch_views: int | None = None, save_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> dict[str, np.ndarray]:
    """Restore every image of ``input_folder`` (natural order); returns ``{file name: uint8 array (3, H, W)}``.

    The options are those of :func:`restore`. With ``save_dir`` each result is also written there as
    ``<stem>.png``. Call :func:`scan_inputs` first to learn about unreadable images before any work.

    Raises:
        NonFiniteOutputError: the network gave non-finite values for an image (named); fp16 overflow is the usual
            cause.
    """
    paths = list_images(input_folder)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    preds = {}
    for path in tqdm(paths, desc="restoring", unit="img", disable=not progress):
        out = restore(model, read_image(path), tta=tta, tile=tile, overlap=overlap, autocast_dtype=autocast_dtype,
                      batch_views=batch_views)
        if not torch.isfinite(out).all():
            hint = " (fp16 overflow? try --bf16 or fp32)" if autocast_dtype == torch.float16 else ""
            raise NonFiniteOutputError(f"the network gave non-finite values for {path}{hint}")
        preds[path.name] = to_uint8(out).cpu().numpy()
        if save_dir is not None:
            Image.fromarray(preds[path.name].transpose(1, 2, 0)).save(Path(save_dir) / f"{path.stem}.png")
    return preds


# --------------------------------------------------------------------------------------------------- the npz file
def npz_path(path: str | os.PathLike) -> Path:
    """The file ``numpy.savez`` writes for ``path``: the name with ``.npz`` appended when it lacks it."""
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _names(names: Sequence[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class NonFiniteOutputError(RuntimeError):
    """The network produced NaN or infinite values for an image."""


class PredictionFileError(ValueError):
    """A prediction file is missing or does not match its images."""


def check_npz(path: str | os.PathLike, expected: Mapping[str, tuple[int, int]]) -> None:
    """Check that the prediction file holds exactly the keys of ``expected`` (file names with extension), each a
    ``uint8`` array of shape (3, H, W) with the expected (H, W).

    Raises:
        PredictionFileError: the file does not exist, or listing every problem (missing and extra keys, wrong
            dtypes and shapes).
    """
    path = Path(path)
    if not path.is_file():
        raise PredictionFileError(f"prediction file {path} does not exist; write it with inference.py")
    problems = []
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        missing = sorted(set(expected) - keys)
        extra = sorted(keys - set(expected))
        if missing:
            problems.append(f"  missing ({len(missing)}): {_names(missing)}")
        if extra:
            problems.append(f"  not expected ({len(extra)}): {_names(extra)}")
        for name in sorted(keys & set(expected)):
            array = data[name]
            want = (3, *expected[name])
            if array.dtype != np.uint8 or array.shape != want:
                problems.append(f"  {name}: {array.dtype} {array.shape}, expected uint8 {want}")
    if problems:
        raise PredictionFileError(f"{path} does not match its images:\n" + "\n".join(problems))


def write_npz(path: str | os.PathLike, preds: Mapping[str, np.ndarray],
              expected: Mapping[str, tuple[int, int]] | None = None) -> Path:
    """Write the prediction file (``numpy.savez``, one array per key) and return its path (``.npz`` appended when
    missing, as ``numpy.savez`` would).

    The file is written under a temporary name in the same folder, checked with :func:`check_npz` against
    ``expected`` (default: the shapes of ``preds``), and only then renamed, so a finished-looking file is always a
    complete and valid one.
    """
    if expected is None:
        expected = {name: tuple(array.shape[-2:]) for name, array in preds.items()}
    # np.savez gets a file object, so it appends no suffix of its own
    return atomic_write(npz_path(path), lambda f: np.savez(f, **preds), check=lambda tmp: check_npz(tmp, expected))


# ---------------------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class Score:
    """Scores of one restored image against its clean image; ``ssim`` is NaN for images under ``SSIM_MIN_SIZE``
    pixels on a side."""

    name: str
    kind: str
    psnr: float
    ssim: float


def find_clean(names: Sequence[str], gt_folder: str | os.PathLike) -> dict[str, Path]:
    """``{name: clean image}`` for every degraded file name, paired as ``dataloader.find_pairs`` pairs: the homework
    partner (``rain-12.png`` -> ``rain_clean-12.*``) or the same stem.

    Raises:
        DataError: the folder is missing, or naming every image without a clean partner.
    """
    clean_by_stem = {path.stem: path for path in list_images(gt_folder)}
    partners, missing = {}, []
    for name in names:
        found = clean_by_stem.get(clean_partner_stem(Path(name).stem, clean_by_stem))
        if found is None:
            missing.append(name)
        partners[name] = found
    if missing:
        raise DataError(f"{len(missing)} images have no clean partner in {gt_folder} (same stem, or <type>_clean-<N> "
                        f"for <type>-<N>): {_names(missing)}")
    return partners


def evaluate(preds: Mapping[str, np.ndarray], gt_folder: str | os.PathLike, *,
             input_folder: str | os.PathLike) -> list[Score]:
    """PSNR and SSIM (``utils.psnr``/``utils.ssim``, on uint8 RGB, whole image) of each prediction against its clean
    image in ``gt_folder``; SSIM is NaN for images under ``SSIM_MIN_SIZE`` pixels on a side (its window's size).

    Raises:
        DataError: some predictions have no clean image, or a clean image's size differs (all named).
    """
    partners = find_clean(list(preds), gt_folder)
    scores, problems = [], []
    for name, pred in preds.items():
        clean = read_image_uint8(partners[name])
        pred = torch.as_tensor(pred)
        if clean.shape != pred.shape:
            problems.append(f"  {name}: restored {tuple(pred.shape)}, clean {partners[name]} {tuple(clean.shape)}")
            continue
        similarity = ssim(pred, clean) if min(pred.shape[-2:]) >= SSIM_MIN_SIZE else math.nan
        scores.append(Score(name, degradation_type(Path(input_folder) / name), psnr(pred, clean), similarity))
    if problems:
        raise DataError("restored and clean images differ in size:\n" + "\n".join(problems))
    return scores


def _mean(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN; NaN when there are none."""
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def summarize(scores: Sequence[Score]) -> dict[str, tuple[int, float, float]]:
    """``{type: (images, mean PSNR, mean SSIM)}`` for each type, then ``"overall"`` (the mean over all images).
    The SSIM means leave out the images without one (NaN); a group with none has NaN."""
    groups: dict[str, list[Score]] = {}
    for score in scores:
        groups.setdefault(score.kind, []).append(score)
    groups = dict(sorted(groups.items()))
    groups["overall"] = list(scores)
    return {kind: (len(group), _mean([s.psnr for s in group]), _mean([s.ssim for s in group]))
            for kind, group in groups.items()}


def format_table(scores: Sequence[Score]) -> str:
    """Per-image rows, then one row per type (when there are several) and the overall mean; an SSIM left out
    (NaN: images under ``SSIM_MIN_SIZE`` pixels) shows as n/a, and a note says so."""
    summary = {kind: (f"mean of {n}", p, q) for kind, (n, p, q) in summarize(scores).items()}
    if len(summary) == 2:  # a single type: its row would repeat the overall one
        summary = {"overall": summary["overall"]}
    width = max(len(name) for name in ["image", *(s.name for s in scores), *(row[0] for row in summary.values())])
    kwidth = max(len(kind) for kind in ["type", *summary])
    row = lambda name, kind, p, q: (f"{name:<{width}}  {kind:<{kwidth}}  {p:>9.3f}  "  # noqa: E731
                                    f"{'n/a' if math.isnan(q) else f'{q:.4f}':>6}")
    lines = [f"{'image':<{width}}  {'type':<{kwidth}}  {'PSNR (dB)':>9}  {'SSIM':>6}"]
    lines += [row(s.name, s.kind, s.psnr, s.ssim) for s in scores]
    lines.append("-" * len(lines[0]))
    lines += [row(name, kind, p, q) for kind, (name, p, q) in summary.items()]
    no_ssim = sum(math.isnan(s.ssim) for s in scores)
    if no_ssim:
        lines.append(f"SSIM n/a: {no_ssim} images under {SSIM_MIN_SIZE}x{SSIM_MIN_SIZE} pixels (its window); the "
                     "SSIM means leave them out")
    return "\n".join(lines)


def write_csv(path: str | os.PathLike, scores: Sequence[Score]) -> Path:
    """Write the scores as CSV, atomically (``utils.atomic_write``): columns level (image, type, overall), name,
    type, images, psnr, ssim (``nan`` where an image has none; the means leave those out)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["level", "name", "type", "images", "psnr", "ssim"])
    writer.writerows(["image", s.name, s.kind, 1, repr(s.psnr), repr(s.ssim)] for s in scores)
    for kind, (n, p, q) in summarize(scores).items():
        writer.writerow(["overall" if kind == "overall" else "type", "", kind if kind != "overall" else "", n,
                         repr(p), repr(q)])
    return atomic_write(path, lambda f: f.write(text.getvalue().encode("utf-8")))


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Restore degraded images with a trained PromptIR and write pred.npz (uint8, (3, H, W), keyed by "
                    "file name with extension); with --gt_folder also score PSNR and SSIM.")
    parser.add_argument("--checkpoint", required=True, help="weights: best.pth / last.pth of trainer.py (a run "
                        "folder stands for its best.pth), or any layout model.load_weights accepts (official "
                        "Lightning, BasicSR, DDP, torch.compile)")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input_folder", help="folder of degraded images (e.g. datasets/test/degraded)")
    inputs.add_argument("--data_dir", help="a plain paired set: restores DATA_DIR/degraded and, when it exists, "
                        "scores against DATA_DIR/clean")
    parser.add_argument("--output_npz", default="pred.npz", help="prediction file (default: %(default)s)")
    parser.add_argument("--gt_folder", help="clean images: same file names, or <type>_clean-<N> for <type>-<N>")
    parser.add_argument("--csv", help="score table as CSV (default: beside the npz, <npz name>_scores.csv)")
    parser.add_argument("--save_images", metavar="DIR", help="also write the restored images as PNG here")
    parser.add_argument("--preset", default="official", choices=sorted(PRESETS),
                        help="model size when the checkpoint has no model_config (default: %(default)s)")
    parser.add_argument("--no_ema", action="store_true", help="use the plain weights of a checkpoint that also holds "
                        "EMA weights (by default the EMA weights, which trainer.py validated, are used)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="allow a checkpoint that needs pickle to load (it can run code: only files you trust)")
    parser.add_argument("--tta", type=int, default=8, choices=sorted(TTA_VIEWS),
                        help="test-time views averaged: 8 = all dihedral views (default), 4 = identity and the "
                             "horizontal, vertical and double flips, 2 = identity and horizontal flip, 1 = off")
    parser.add_argument("--batch_views", type=positive_int, help="at most this many views per network call "
                        "(default: all views of one shape at once); lowers memory")
    parser.add_argument("--tile", type=positive_int, help="restore in tiles of this many pixels (for images too large "
                        "for memory; costs a little PSNR). Default: whole images")
    parser.add_argument("--tile_overlap", type=int, help="pixels neighbouring tiles share, blended smoothly "
                        f"(default: {DEFAULT_OVERLAP}, at most a quarter of the tile)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="run the network under float16 autocast")
    precision.add_argument("--bf16", action="store_true", help="run the network under bfloat16 autocast")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--plain", action="store_true", help="run the official formulation of the network instead "
                        "of the fast path (same weights, same results within float rounding; for comparison)")
    parser.add_argument("--compile", action="store_true", help="compile the network's blocks with torch.compile "
                        "(CUDA only: the first image of each size compiles for minutes, cached on disk)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def _resolve_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived options and reject inconsistent ones before any work."""
    if args.data_dir:
        root = Path(args.data_dir)
        if not (root / "degraded").is_dir():
            parser.error(f"--data_dir {root} has no degraded/ folder; give a plain paired set (degraded/ + clean/) "
                         "or use --input_folder")
        args.input_folder = str(root / "degraded")
        if args.gt_folder is None and (root / "clean").is_dir():
            args.gt_folder = str(root / "clean")
    if args.tile is None and args.tile_overlap is not None:
        parser.error("--tile_overlap needs --tile")
    if args.tile_overlap is None:  # without --tile, restore() fits it to the tiles of an out-of-memory retry
        args.tile_overlap = DEFAULT_OVERLAP if args.tile is None else min(DEFAULT_OVERLAP, args.tile // 4)
    if args.tile is not None and not 0 <= args.tile_overlap < args.tile:
        parser.error(f"--tile_overlap must be at least 0 and smaller than --tile ({args.tile})")
    if args.csv and not args.gt_folder:
        parser.error("--csv needs --gt_folder (or --data_dir with a clean/ folder): there is nothing to score")
    args.output_npz = npz_path(args.output_npz)
    if args.csv is None and args.gt_folder:
        args.csv = args.output_npz.with_name(args.output_npz.stem + "_scores.csv")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here; use --device cpu (or leave --device auto)")
    if args.tile is not None and args.tile < MIN_SIZE:
        parser.error(f"--tile must be at least {MIN_SIZE} pixels (the network's smallest input), got {args.tile}")
    if args.compile and device.type != "cuda":
        parser.error("--compile needs a CUDA device: on the CPU the fast path without it is the quicker one")
    if args.compile and args.plain:
        parser.error("--compile works on the fast path: drop --plain or --compile")
    return args


@contextlib.contextmanager
def _console_logging() -> Iterator[None]:
    """Log records of this script and model.py to stderr, printed above the progress bar."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    loggers = [log, logging.getLogger("model")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm(loggers):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> list[Score] | None:
    parser = build_parser()
    args = _resolve_args(parser, parser.parse_args(argv))
    try:
        return _run(parser, args)
    except (DataError, CheckpointError, PredictionFileError, NonFiniteOutputError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Score] | None:
    with _console_logging():
        sizes = scan_inputs(args.input_folder, args.gt_folder)
        if args.save_images:
            stems = [Path(name).stem for name in sizes]
            clashes = sorted({s for s in stems if stems.count(s) > 1})
            if clashes:
                parser.error(f"--save_images writes <stem>.png, but several inputs share the stem(s) {clashes}")
        model = load_model(args.checkpoint, preset=args.preset, use_ema=not args.no_ema, trusted=args.trust_checkpoint,
                           device=args.device, plain=args.plain, compile=args.compile)
        autocast_dtype = AUTOCAST["fp16"] if args.fp16 else AUTOCAST["bf16"] if args.bf16 else None
        preds = predict_folder(model, args.input_folder, tta=args.tta, tile=args.tile, overlap=args.tile_overlap,
                               autocast_dtype=autocast_dtype, batch_views=args.batch_views,
                               save_dir=args.save_images, progress=not args.no_progress)
        path = write_npz(args.output_npz, preds, expected=sizes)
        print(f"wrote {path}: {len(preds)} images; reopened it and checked every key, dtype (uint8) and shape "
              "(3, H, W) against the inputs")
        if not args.gt_folder:
            return None
        scores = evaluate(preds, args.gt_folder, input_folder=args.input_folder)
        print(format_table(scores))
        print(f"wrote {write_csv(args.csv, scores)}")
        return scores


if __name__ == "__main__":
    main()
