"""Restore degraded images with a trained PromptIR (or an ensemble of them), write the submission file ``pred.npz``
and score it.

::

    python inference.py --checkpoint best.pth --input_folder datasets/test/degraded            # writes pred.npz
    python inference.py --checkpoint best.pth --input_folder val/degraded --gt_folder val/clean   # and a score table
    python inference.py --checkpoint a.pth b.pth --input_folder datasets/test/degraded         # an ensemble

``pred.npz`` holds one ``uint8`` array of shape (3, H, W) per input image, keyed by its file name with the extension
(``"0.png"``). Every image is restored with test-time augmentation (the 8 dihedral views of ``augment.py``, each
output mapped back by its exact inverse and averaged in float32) unless ``--tta`` says otherwise; several checkpoints
average their models' outputs over all of those views. Images too large for the accelerator can be restored in
overlapping tiles blended with a smooth window, and an out-of-memory error retries the image one view at a time,
then in tiles, saying so.

The input images are found, decoded and checked once (:func:`scan_inputs`, an :class:`InputSet`), before any work;
restoring, writing the file and scoring (``scoring.py``) all use that one set.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from augment import VIEW_NAMES, dihedral, dihedral_inverse
from dataloader import PAIRED_FOLDERS, DataError, degradation_type, list_images, read_image_uint8, threaded
from fast_path import enable_fast_path
from model import MIN_SIZE, PRESETS, add_arch_argument, model_config, model_from_checkpoint
from run import checkpoint_file, remove_stale_temporaries
from scoring import evaluate, find_clean, format_table, write_csv
from utils import (ConfigError, UserError, WorkError, add_precision_args, atomic_write, check_name_length,
                   check_not_an_input, check_output_path, is_out_of_memory, listing, load_checkpoint, naming,
                   output_lock, positive_int, resolve_device, resolve_precision, run_cli, same_path, setup_logging,
                   to_uint8)

log = logging.getLogger(__name__)

# The views each --tta setting averages, by name in augment.VIEW_NAMES. 2 and 4 use flips only, so every view keeps
# the image's shape and they always run as one batch.
TTA_VIEWS = {
    1: ("identity",),
    2: ("identity", "hflip"),
    4: ("identity", "hflip", "vflip", "rot180"),
    8: tuple(VIEW_NAMES),
}
DEFAULT_OVERLAP = 32
SMALL_TILE = 64  # --tile below this is said to be slow (a tile of 5 ran 26 times slower than whole images)
MIN_RETRY_TILE = 16  # out-of-memory retries halve the tile down to this size, then give up
# An ensemble keeps all its models on the device when the weights of the models beyond the first take at most this
# share of the free memory (the rest is left for activations); otherwise it loads one model at a time.
ENSEMBLE_MEMORY_SHARE = 0.25
ENSEMBLE_MEMORY = ("auto", "together", "one_at_a_time")


# ------------------------------------------------------------------------------------------------- errors a user sees
class PredictionFileError(UserError, ValueError):
    """A prediction file is missing, unreadable or does not match its images (exit code 2)."""


class NonFiniteOutputError(WorkError, RuntimeError):
    """The network produced NaN or infinite values for an image (exit code 1)."""


class RestoreOutOfMemoryError(WorkError, torch.cuda.OutOfMemoryError):
    """An image could not be restored even in the smallest tiles, one view at a time (exit code 1)."""


# ------------------------------------------------------------------------------------------------------------- model
def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_model(checkpoint: str | os.PathLike, *, preset: str | None = None, arch: str | None = None,
               use_ema: bool = True,
               trusted: bool = False, device: str | torch.device = "cpu", plain: bool = False,
               compile: bool = False) -> nn.Module:
    """The network of a checkpoint, in eval mode on ``device``.

    Args:
        checkpoint: a file written by ``trainer.py`` or any layout ``model.load_weights`` accepts, or a run folder
            of ``trainer.py``, whose ``best.pth`` is used (``run.checkpoint_file``).
        preset: model size used when the checkpoint has no ``"model_config"`` (foreign checkpoints; None: official);
            one that contradicts the checkpoint's own is refused (``model.model_config``).
        arch: the network (``model.ARCHS``), likewise; weights without a config are recognised by their names.
        use_ema: take the ``"ema"`` weights of our checkpoints when they hold some (the weights trainer.py validated
            and chose ``best.pth`` by); False takes the plain ``"model"`` weights.
        trusted: allow full unpickling (only for files you trust).
        device: where the model runs.
        plain: keep the official formulation instead of the fast path (``fast_path.enable_fast_path``: same weights,
            same function within float rounding, about 2.5x faster on a CPU).
        compile: also compile the blocks with ``torch.compile`` (CUDA only; ignored on other devices).

    Raises:
        CheckpointError: the file is missing, unreadable or does not fit the model.
        ConfigError: ``preset`` contradicts the checkpoint's own.
        WorkError: the model does not fit in the device's memory.
    """
    checkpoint = checkpoint_file(checkpoint)
    model = model_from_checkpoint(load_checkpoint(checkpoint, trusted=trusted), preset=preset, arch=arch,
                                  use_ema=use_ema, source=str(checkpoint))
    try:
        model = model.to(device).eval()
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise WorkError(f"the model of {checkpoint} does not fit in the memory of {device}: free it of other "
                           "work, or run with --device cpu") from None
    if not plain:
        enable_fast_path(model, compile=compile and torch.device(device).type == "cuda")
    return model


def model_bytes(model: nn.Module) -> int:
    """The memory a model's parameters and buffers take."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (for the CPU: the system's available memory); None when
    unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


class Ensemble:
    """Several checkpoints whose models' outputs are averaged, over every test-time view of every model, in
    float32 (all models weigh the same).

    Args:
        checkpoints: the checkpoint files, in order.
        load: builds the model of a checkpoint on the device (for example ``functools.partial(load_model, ...)``).
        together: hold every model at once and restore each image with all of them; False loads one model at a
            time, restores every image with it and keeps each image's float32 sum in main memory.
        first: the model of ``checkpoints[0]`` when it is already loaded.
    """

    def __init__(self, checkpoints: Sequence[str | os.PathLike], load: Callable[[Path], nn.Module], *,
                 together: bool, first: nn.Module | None = None):
        if not checkpoints:
            raise ValueError("an ensemble needs at least one checkpoint")
        self.checkpoints = [Path(c) for c in checkpoints]
        self.load = load
        self.together = together
        self._first = first
        self._held: list[nn.Module] | None = None

    def __len__(self) -> int:
        return len(self.checkpoints)

    def held(self) -> list[nn.Module]:
        """Every model, loaded once and kept (``together``)."""
        if self._held is None:
            self._held = [self.model(i) for i in range(len(self))]
        return self._held

    def model(self, index: int) -> nn.Module:
        """The model of ``checkpoints[index]``, loaded now (or the ``first`` model given, which is then let go)."""
        if index == 0 and self._first is not None:
            model, self._first = self._first, None
            return model
        return self.load(self.checkpoints[index])


def ensemble_fits(first: nn.Module, count: int, device: torch.device) -> tuple[bool, str]:
    """Whether ``count`` models of the size of ``first`` (already on ``device``) can all stay there: the others'
    weights take at most ``ENSEMBLE_MEMORY_SHARE`` of the free memory. Returns the answer and the reason in words."""
    more = (count - 1) * model_bytes(first)
    free = free_memory(device)
    if free is None:
        return True, f"the free memory of {device} is unknown"
    verb = "take at most" if more <= ENSEMBLE_MEMORY_SHARE * free else "would take more than"
    return more <= ENSEMBLE_MEMORY_SHARE * free, (f"the other {count - 1} models' weights ({_size(more)}) {verb} a "
                                                  f"quarter of the {_size(free)} free on {device}")


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


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
        model: the network, in eval mode; the image is moved to its device (:func:`restore_folder` averages
            several).
        image: the degraded image.
        tta: number of test-time views averaged (``TTA_VIEWS``): 8 (all dihedral views), 4 (flips), 2 (horizontal
            flip), 1 (none).
        tile: restore in tiles of this many pixels (None: the whole image at once).
        overlap: pixels two neighbouring tiles share at least; blended with a raised-cosine window.
        autocast_dtype: ``torch.float16`` or ``torch.bfloat16`` to run the network under autocast; None for fp32.
        batch_views: run at most this many views per network call (None: all views of one shape together).

    Running out of memory (:func:`is_out_of_memory`: PyTorch's error, or cuBLAS's and cuDNN's failed allocations)
    first retries the image one view at a time, then in tiles of half the size each time, and logs a warning saying
    so.

    Raises:
        RestoreOutOfMemoryError: still out of memory in ``MIN_RETRY_TILE``-pixel tiles, one view at a time.
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
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            failure = (str(err).strip().splitlines() or [type(err).__name__])[0]
        # retried here, outside the handler, so that the failed attempt's tensors are freed first
        _free_device_memory()
        if len(views) > 1 and batch_views != 1 and tile is None:
            batch_views = 1
            log.warning("out of memory on a %dx%d (WxH) image: retrying one view at a time", w, h)
            continue
        smaller = _smaller_tile(tile, h, w)
        if smaller is None:
            tried = f"in {tile}-pixel tiles, one view at a time" if tile else "one view at a time"
            fix = (f"free {device} of other work, or run on the CPU (--device cpu)" if device.type != "cpu" else
                   "free main memory of other work, or restore smaller images")
            raise RestoreOutOfMemoryError(
                f"out of memory on a {w}x{h} (WxH) image even {tried} ({failure}); the automatic retries already went "
                f"as low as smaller tiles (--tile) and one view per call (--batch_views 1) can: {fix}")
        tile = smaller
        overlap, batch_views = min(overlap, tile // 4), 1
        log.warning("out of memory on a %dx%d (WxH) image: retrying in %d-pixel tiles (overlap %d), one view at a "
                    "time", w, h, tile, overlap)


# ------------------------------------------------------------------------------------------------------ the inputs
class InputSet(Mapping):
    """The degraded images of one run, found, decoded and checked once: a mapping from file name (with extension,
    natural order) to (H, W), which is what ``pred.npz`` must hold, with each image's path, degradation type
    (``dataloader.degradation_type``), clean partner and pixels. Build it with :func:`scan_inputs`.

    The decoded uint8 pixels of every image (and clean partner) are kept, as much memory as ``pred.npz`` itself per
    folder, so that nothing is read twice and a file changed or removed after the scan does not change the run.

    Args:
        folder: the folder of degraded images.
        paths: ``{name: path}`` of the degraded images, in order.
        pixels: ``{path: uint8 tensor (3, H, W)}`` of every degraded and clean image.
        partners: ``{name: clean image path}``; empty without clean images.
        gt_folder: the folder of clean images, or None.
    """

    def __init__(self, folder: Path, paths: Mapping[str, Path], pixels: Mapping[Path, torch.Tensor], *,
                 partners: Mapping[str, Path] | None = None, gt_folder: Path | None = None):
        self.folder, self.gt_folder = Path(folder), gt_folder
        self.paths = dict(paths)
        self.partners = dict(partners or {})
        self._pixels = dict(pixels)
        self.kinds = {name: degradation_type(path) for name, path in self.paths.items()}

    def __getitem__(self, name: str) -> tuple[int, int]:
        return tuple(self._pixels[self.paths[name]].shape[-2:])

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def kind(self, name: str) -> str:
        """The degradation type of an image."""
        return self.kinds[name]

    def degraded(self, name: str) -> torch.Tensor:
        """The degraded image as decoded by the scan, uint8 (3, H, W)."""
        return self._pixels[self.paths[name]]

    def image(self, name: str) -> torch.Tensor:
        """The degraded image as the network takes it: float32 (3, H, W) in [0, 1]."""
        return self.degraded(name).float().div_(255)

    def clean(self, name: str) -> torch.Tensor:
        """The clean partner, uint8 (3, H, W); KeyError when the set has no clean images."""
        return self._pixels[self.partners[name]]

    def files(self) -> list[Path]:
        """Every file the set was read from (degraded and clean)."""
        return [*self.paths.values(), *self.partners.values()]


def scan_inputs(folder: str | os.PathLike, gt_folder: str | os.PathLike | None = None) -> InputSet:
    """Find, decode and check every image of ``folder`` (and with ``gt_folder`` its clean partner) once, before any
    work.

    Raises:
        DataError: the folder is missing or holds no images; ``gt_folder`` is ``folder`` itself (the images would be
            scored against themselves); or some images cannot be read, have no clean partner, differ in size from
            it, or are smaller than the network's ``MIN_SIZE`` (all named at once).
    """
    folder = Path(folder)
    paths = {path.name: path for path in list_images(folder)}
    partners: dict[str, Path] = {}
    if gt_folder is not None:
        gt_folder = Path(gt_folder)
        if gt_folder.is_dir() and same_path(folder, gt_folder):
            raise DataError(f"the clean folder {gt_folder} is the input folder {folder}: every image would be scored "
                            "against itself. Give the folder of the clean images (for example .../clean beside "
                            ".../degraded)")
        partners = find_clean(list(paths), gt_folder)
    files = [*paths.values(), *partners.values()]
    decoded = dict(zip(files, threaded(read_image_uint8, files)))
    problems = [f"  {result}" for result in decoded.values() if isinstance(result, DataError)]
    for name, clean in partners.items():
        lq, gt = decoded[paths[name]], decoded[clean]
        if isinstance(lq, torch.Tensor) and isinstance(gt, torch.Tensor) and lq.shape != gt.shape:
            problems.append(f"  sizes differ: {paths[name]} is {lq.shape[2]}x{lq.shape[1]} (WxH) but {clean} is "
                            f"{gt.shape[2]}x{gt.shape[1]}")
    if problems:
        raise DataError(f"{len(problems)} problem(s) with the {len(paths)} input images; fix or remove them:\n" +
                        listing(problems, limit=50, sep="\n"))
    small = [f"  {path}: {decoded[path].shape[2]}x{decoded[path].shape[1]} (WxH)" for path in paths.values()
             if min(decoded[path].shape[-2:]) < MIN_SIZE]
    if small:
        raise DataError(f"{len(small)} of {len(paths)} input images are smaller than {MIN_SIZE}x{MIN_SIZE} pixels, "
                        "the network's smallest input; enlarge or remove them:\n" + listing(small, limit=50, sep="\n"))
    return InputSet(folder, paths, decoded, partners=partners, gt_folder=gt_folder)


# ------------------------------------------------------------------------------------------------------ prediction
def _checked(out: torch.Tensor, inputs: InputSet, name: str, autocast_dtype: torch.dtype | None,
             source: Path | None) -> torch.Tensor:
    if not torch.isfinite(out).all():
        hint = " (fp16 overflow? try --bf16 or fp32)" if autocast_dtype == torch.float16 else ""
        by = f" of {source}" if source is not None else ""
        raise NonFiniteOutputError(f"the network{by} gave non-finite values for {inputs.paths[name]}{hint}")
    return out


def restore_folder(models: nn.Module | Sequence[nn.Module] | Ensemble, inputs: InputSet, *, progress: bool = True,
                   **options: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Restore every image of ``inputs``, in order; yields ``(name, float32 result (3, H, W))`` on the CPU, not
    clamped. Several models (a sequence, or an :class:`Ensemble`) give the mean of their results, summed in float32
    in the order given.

    Args:
        models: the network(s). An ``Ensemble`` that is not ``together`` loads one model at a time and yields the
            images only once the last model has restored them all.
        inputs: the images (:func:`scan_inputs`).
        progress: show a progress bar.
        options: passed to :func:`restore` (``tta``, ``tile``, ``overlap``, ``autocast_dtype``, ``batch_views``).

    Raises:
        NonFiniteOutputError: a network gave non-finite values for an image (named); fp16 overflow is the usual cause.
        RestoreOutOfMemoryError: an image could not be restored in the memory there is (named).
    """
    amp = options.get("autocast_dtype")
    names = list(inputs)

    def restored(model: nn.Module, name: str, source: Path | None) -> torch.Tensor:
        try:
            out = restore(model, inputs.image(name), **options)
        except RestoreOutOfMemoryError as err:
            raise RestoreOutOfMemoryError(f"{inputs.paths[name]}: {err}") from None
        return _checked(out, inputs, name, amp, source)

    if isinstance(models, Ensemble) and not models.together:
        sums: dict[str, torch.Tensor] = {}
        for index, source in enumerate(models.checkpoints):
            model = models.model(index)
            for name in tqdm(names, desc=f"model {index + 1}/{len(models)}", unit="img", disable=not progress):
                out = restored(model, name, source)
                sums[name] = out if index == 0 else sums[name] + out
            del model
            _free_device_memory()
        for name in names:
            yield name, sums.pop(name) / len(models)
        return
    if isinstance(models, Ensemble):
        held, sources = models.held(), models.checkpoints
    else:
        held = [models] if isinstance(models, nn.Module) else list(models)
        sources = [None] * len(held)
    for name in tqdm(names, desc="restoring", unit="img", disable=not progress):
        total = restored(held[0], name, sources[0] if len(held) > 1 else None)
        for model, source in zip(held[1:], sources[1:]):
            total = total + restored(model, name, source)
        yield name, total / len(held)


def predict_folder(models: nn.Module | Sequence[nn.Module] | Ensemble, inputs: InputSet | str | os.PathLike, *,
                   tta: int = 8, tile: int | None = None, overlap: int = DEFAULT_OVERLAP,
                   autocast_dtype: torch.dtype | None = None, batch_views: int | None = None,
                   save_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, np.ndarray]:
    """Restore every image of ``inputs`` (natural order); returns ``{file name: uint8 array (3, H, W)}``.

    ``inputs`` is the :class:`InputSet` of :func:`scan_inputs`, or a folder, scanned here. The other options are
    those of :func:`restore`. With ``save_dir`` each result is also written there as ``<stem>.png``.

    Raises:
        NonFiniteOutputError: the network gave non-finite values for an image (named); fp16 overflow is the usual
            cause.
        RestoreOutOfMemoryError: an image could not be restored in the memory there is (named).
    """
    if not isinstance(inputs, InputSet):
        inputs = scan_inputs(inputs)
    preds = {}
    for name, out in restore_folder(models, inputs, progress=progress, tta=tta, tile=tile, overlap=overlap,
                                    autocast_dtype=autocast_dtype, batch_views=batch_views):
        preds[name] = to_uint8(out).numpy()
        if save_dir is not None:
            save_png(Path(save_dir) / f"{Path(name).stem}.png", preds[name])
    return preds


# ------------------------------------------------------------------------------------------------------ the outputs
def save_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 image (3, H, W) as PNG, atomically: an interrupted write leaves no broken file."""
    with naming(path):
        atomic_write(path, lambda f: Image.fromarray(image.transpose(1, 2, 0)).save(f, format="PNG"))


def npz_path(path: str | os.PathLike) -> Path:
    """The file ``numpy.savez`` writes for ``path``: the name with ``.npz`` appended when it lacks it."""
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def check_npz(path: str | os.PathLike, expected: Mapping[str, tuple[int, int]]) -> None:
    """Check that the prediction file holds exactly the keys of ``expected`` (file names with extension), each a
    ``uint8`` array of shape (3, H, W) with the expected (H, W).

    Raises:
        PredictionFileError: the file does not exist or cannot be read as an ``.npz`` of arrays, or listing every
            problem (missing and extra keys, wrong dtypes and shapes).
    """
    path = Path(path)
    if not path.is_file():
        raise PredictionFileError(f"prediction file {path} does not exist" + (" (it is a folder)" if path.is_dir()
                                  else "") + "; write it with inference.py")
    problems = []
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not one per image")
        with data:
            keys = set(data.files)
            missing = sorted(set(expected) - keys)
            extra = sorted(keys - set(expected))
            if missing:
                problems.append(f"  missing ({len(missing)}): {listing(missing)}")
            if extra:
                problems.append(f"  not expected ({len(extra)}): {listing(extra)}")
            for name in sorted(keys & set(expected)):
                array = data[name]
                want = (3, *expected[name])
                if array.dtype != np.uint8 or array.shape != want:
                    problems.append(f"  {name}: {array.dtype} {array.shape}, expected uint8 {want}")
    except OSError:
        raise  # the file system's own failure: run_cli names the file
    except Exception as err:  # numpy raises ValueError, zipfile.BadZipFile, EOFError ... by the kind of damage
        detail = (str(err).strip().splitlines() or [""])[0]
        raise PredictionFileError(f"{path} is not a readable prediction file (an .npz of one uint8 array per image): "
                                  f"it is damaged or another kind of file ({type(err).__name__}: {detail}); write it "
                                  "again with inference.py") from None
    if problems:
        raise PredictionFileError(f"{path} does not match its images:\n" + "\n".join(problems))


def write_npz(path: str | os.PathLike, preds: Mapping[str, np.ndarray],
              expected: Mapping[str, tuple[int, int]] | None = None) -> Path:
    """Write the prediction file (``numpy.savez``, one array per key) and return its path (``.npz`` appended when
    missing, as ``numpy.savez`` would).

    The file is written under a temporary name in the same folder, checked with :func:`check_npz` against
    ``expected`` (default: the shapes of ``preds``; an :class:`InputSet` is such a mapping), and only then renamed,
    so a finished-looking file is always a complete and valid one, and a failure (a full disk, an interrupt) leaves
    the previous file as it was.
    """
    if expected is None:
        expected = {name: tuple(array.shape[-2:]) for name, array in preds.items()}
    path = npz_path(path)
    with naming(path):
        # np.savez gets a file object, so it appends no suffix of its own
        return atomic_write(path, lambda f: np.savez(f, **preds), check=lambda tmp: check_npz(tmp, expected))


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference.py",
        description="Restore degraded images with a trained PromptIR (or the mean of several) and write pred.npz "
                    "(uint8, (3, H, W), keyed by file name with extension); with --gt_folder also score PSNR and "
                    "SSIM, on RGB (the grader's) and on Y (the deraining literature's).")
    parser.add_argument("--checkpoint", required=True, nargs="+", metavar="CHECKPOINT",
                        help="weights: best.pth / last.pth of trainer.py (a run folder stands for its best.pth), or "
                        "any layout model.load_weights accepts (official Lightning, BasicSR, DDP, torch.compile). "
                        "Several: an ensemble, the mean of their outputs over all test-time views")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input_folder", help="folder of degraded images (e.g. datasets/test/degraded)")
    inputs.add_argument("--data_dir", help="a plain paired set: restores DATA_DIR/degraded and, when it exists, "
                        "scores against DATA_DIR/clean")
    parser.add_argument("--output_npz", default="pred.npz", help="prediction file (default: %(default)s)")
    parser.add_argument("--gt_folder", help="clean images: same file names, or <type>_clean-<N> for <type>-<N>")
    parser.add_argument("--csv", help="score table as CSV (default: beside the npz, <npz name>_scores.csv)")
    parser.add_argument("--save_images", metavar="DIR", help="also write the restored images as PNG here")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model size of a checkpoint without model_config (foreign checkpoints; default: "
                        "official); a checkpoint's own size wins")
    add_arch_argument(parser)
    parser.add_argument("--no_ema", action="store_true", help="use the plain weights of a checkpoint that also holds "
                        "EMA weights (by default the EMA weights, which trainer.py validated, are used)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="allow a checkpoint that needs pickle to load (it can run code: only files you trust)")
    parser.add_argument("--ensemble_memory", default="auto", choices=ENSEMBLE_MEMORY,
                        help="with several checkpoints: together = all models on the device at once, one_at_a_time "
                        "= load each in turn and keep every image's float32 sum in main memory; auto (default) "
                        "holds them together when the extra weights take at most a quarter of the free memory")
    parser.add_argument("--tta", type=int, default=8, choices=sorted(TTA_VIEWS),
                        help="test-time views averaged: 8 = all dihedral views (default), 4 = identity and the "
                             "horizontal, vertical and double flips, 2 = identity and horizontal flip, 1 = off")
    parser.add_argument("--batch_views", type=positive_int, help="at most this many views per network call "
                        "(default: all views of one shape at once); lowers memory")
    parser.add_argument("--tile", type=positive_int, help="restore in tiles of this many pixels (for images too large "
                        "for memory; costs a little PSNR). Default: whole images")
    parser.add_argument("--tile_overlap", type=int, help="pixels neighbouring tiles share, blended smoothly "
                        f"(default: {DEFAULT_OVERLAP}, at most a quarter of the tile)")
    add_precision_args(parser, training=False)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--plain", action="store_true", help="run the official formulation of the network instead "
                        "of the fast path (same weights, same results within float rounding; for comparison)")
    parser.add_argument("--compile", action="store_true", help="compile the network's blocks with torch.compile "
                        "(CUDA only: the first image of each size compiles for minutes, cached on disk)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def _resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived options and reject inconsistent ones before any work; sets ``args.device`` (a torch.device),
    ``args.autocast_dtype`` and ``args.checkpoint`` (the files, a run folder standing for its best.pth).

    Raises:
        ConfigError: naming the option and what to do.
    """
    if args.data_dir:
        root = Path(args.data_dir)
        if not (root / "degraded").is_dir():
            raise ConfigError(f"--data_dir {root} has no degraded/ folder; give a plain paired set (degraded/ + "
                              "clean/) or use --input_folder")
        args.input_folder = str(root / "degraded")
        if args.gt_folder is None and (root / "clean").is_dir():
            args.gt_folder = str(root / "clean")
    if args.tile is None and args.tile_overlap is not None:
        raise ConfigError("--tile_overlap needs --tile")
    if args.tile_overlap is None:  # without --tile, restore() fits it to the tiles of an out-of-memory retry
        args.tile_overlap = DEFAULT_OVERLAP if args.tile is None else min(DEFAULT_OVERLAP, args.tile // 4)
    if args.tile is not None and not 0 <= args.tile_overlap < args.tile:
        raise ConfigError(f"--tile_overlap must be at least 0 and smaller than --tile ({args.tile})")
    if args.csv and not args.gt_folder:
        raise ConfigError("--csv needs --gt_folder (or --data_dir with a clean/ folder): there is nothing to score")
    args.device = resolve_device(args.device)
    if args.tile is not None and args.tile < MIN_SIZE:
        raise ConfigError(f"--tile must be at least {MIN_SIZE} pixels (the network's smallest input), got {args.tile}")
    if args.tile is not None and args.tile < SMALL_TILE:
        log.warning(f"--tile {args.tile} is small: every tile is one network call (and tiles overlap), so this runs "
                    f"many times slower than tiles of {SMALL_TILE} pixels or more; use the largest tile that fits")
    if args.compile and args.device.type != "cuda":
        raise ConfigError("--compile needs a CUDA device: on the CPU the fast path without it is the quicker one")
    if args.compile and args.plain:
        raise ConfigError("--compile works on the fast path: drop --plain or --compile")
    args.autocast_dtype = resolve_precision(args, args.device, training=False)
    args.checkpoint = [checkpoint_file(c) for c in args.checkpoint]
    return args


def _resolve_outputs(args: argparse.Namespace, inputs: InputSet) -> None:
    """Every output path checked once, before the work that fills it (``utils.check_output_path``): writable, a file
    where a file goes and a folder where a folder goes, and none of them a checkpoint, an input image or an input
    folder; --save_images also needs inputs of distinct stems (it writes <stem>.png)."""
    if Path(args.output_npz).is_dir():  # before npz_path: --output_npz out would otherwise become out.npz beside it
        raise ConfigError(f"--output_npz {args.output_npz} is a folder: give a file name, such as "
                          f"{Path(args.output_npz) / 'pred.npz'}")
    read = [*args.checkpoint, *inputs.files(), inputs.folder, *([inputs.gt_folder] if inputs.gt_folder else [])]
    args.output_npz = check_output_path(npz_path(args.output_npz), "--output_npz", inputs=read)
    check_not_an_input(args.output_npz, "--output_npz")  # nor another checkpoint or image
    if args.csv is None and args.gt_folder:
        args.csv = args.output_npz.with_name(args.output_npz.stem + "_scores.csv")
    if args.csv:
        args.csv = check_output_path(args.csv, "--csv", inputs=read)
        check_not_an_input(args.csv, "--csv")
        if same_path(args.csv, args.output_npz):
            raise ConfigError(f"--csv {args.csv} is the prediction file itself: give the scores another name")
    if args.save_images:
        args.save_images = check_output_path(args.save_images, "--save_images", folder=True, inputs=read)
        check_not_a_data_set_half(args.save_images, "--save_images")
        for name in inputs:  # every PNG name fits the file system, before the work
            check_name_length(args.save_images, f"{Path(name).stem}.png", f"--save_images, for the input {name}")
        stems = [Path(name).stem for name in inputs]
        clashes = sorted({s for s in stems if stems.count(s) > 1})
        if clashes:
            raise ConfigError(f"--save_images writes <stem>.png, but several inputs share the stem(s) "
                              f"{listing(clashes)}; restore them into separate runs")


def check_not_a_data_set_half(folder: Path, option: str) -> None:
    """Refuse an output folder that is one half of a paired data set (``SET/clean`` beside ``SET/degraded``): its
    images would be overwritten or joined by outputs."""
    parent = folder.absolute().parent
    for degraded, clean in PAIRED_FOLDERS:
        if folder.name in (degraded, clean) and (parent / degraded).is_dir() and (parent / clean).is_dir():
            raise ConfigError(f"{option} {folder} is the {folder.name}/ folder of the data set {parent}: the restored "
                              "PNGs would overwrite or join its images; give another folder")


def load_models(args: argparse.Namespace) -> nn.Module | Ensemble:
    """The model of ``--checkpoint``, or for several the :class:`Ensemble`, holding its models together or one at a
    time (``--ensemble_memory``), which it says."""
    load = functools.partial(load_model, preset=args.preset, arch=args.arch, use_ema=not args.no_ema,
                             trusted=args.trust_checkpoint,
                             device=args.device, plain=args.plain, compile=args.compile)
    files = args.checkpoint
    if len(files) == 1:
        return load(files[0])
    twice = sorted({str(f) for f in files if files.count(f) > 1})
    if twice:
        log.warning("checkpoint(s) given more than once, and weighted as often: %s", listing(twice))
    for path in files[1:]:  # every file readable, of a size --preset agrees with, before any work
        model_config(load_checkpoint(path, trusted=args.trust_checkpoint, mmap=True), args.preset,
                     arch=args.arch, source=str(path))
    first = load(files[0])
    if args.ensemble_memory == "auto":
        together, reason = ensemble_fits(first, len(files), args.device)
    else:
        together, reason = args.ensemble_memory == "together", f"--ensemble_memory {args.ensemble_memory}"
    how = (f"all {len(files)} models held on {args.device} at once" if together else
           "one model at a time, each image's float32 sum kept in main memory until the last model has run")
    log.info("ensemble of %d checkpoints (%s): the mean of their outputs over %d test-time view(s) each, in float32; "
             "%s (%s)", len(files), listing([str(f) for f in files], limit=5), args.tta, how, reason)
    return Ensemble(files, load, together=together, first=first)


def main(argv: Sequence[str] | None = None) -> list | None:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(parser.prog, lambda: _run(args))


def _run(args: argparse.Namespace) -> list | None:
    args = _resolve_args(args)
    inputs = scan_inputs(args.input_folder, args.gt_folder)
    _resolve_outputs(args, inputs)
    with contextlib.ExitStack() as held:  # one run at a time writes each output, so they all come from one run
        for option, path in (("--output_npz", args.output_npz), ("--csv", args.csv)):
            if path is not None:
                held.enter_context(output_lock(path, option))
        return _predict_and_score(args, inputs)


def _predict_and_score(args: argparse.Namespace, inputs: InputSet) -> list | None:
    for path in (args.output_npz, args.csv):
        if path is not None:
            remove_stale_temporaries(path.parent, [path.name])
    models = load_models(args)
    preds = predict_folder(models, inputs, tta=args.tta, tile=args.tile, overlap=args.tile_overlap,
                           autocast_dtype=args.autocast_dtype, batch_views=args.batch_views,
                           save_dir=args.save_images, progress=not args.no_progress)
    path = write_npz(args.output_npz, preds, expected=inputs)
    print(f"wrote {path}: {len(preds)} images; reopened it and checked every key, dtype (uint8) and shape "
          "(3, H, W) against the inputs")
    if not args.gt_folder:
        return None
    scores = evaluate(preds, inputs)
    print(format_table(scores))
    with naming(args.csv):
        print(f"wrote {write_csv(args.csv, scores)}")
    return scores


if __name__ == "__main__":
    main()
