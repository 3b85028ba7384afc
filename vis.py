"""Side-by-side pictures of restorations: degraded | restored, and | clean | error map when clean images exist.

::

    python vis.py                                    # pred.npz + datasets/test/degraded, 8 random images, into vis/
    python vis.py --gt_folder val/clean --names rain-3.png snow-7.png

Each panel is titled with its file name and, when a clean image exists, the PSNR of what it shows (the grader's PSNR:
uint8 RGB, whole image). The error map is the mean absolute difference over the channels, in 8-bit levels, drawn
from black (0) to white (``ERROR_SCALE`` levels or more) on the same scale in every picture.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataloader import DataError
from inference import check_npz, npz_path, scan_inputs
from scoring import psnr
from utils import atomic_write, check_output_path, listing, naming, positive_int, run_cli, setup_logging

log = logging.getLogger(__name__)
ERROR_SCALE = 64  # 8-bit levels drawn as white in the error maps
PANEL_INCHES = 3.2
MAX_ASPECT = 4  # a panel is at most this many times as tall as wide (a 6x3000 strip drew a picture Pillow refused)
GRID_NAME = re.compile(r"^grid_[0-9]+\.png$")


@dataclass(frozen=True)
class Example:
    """One image to draw: uint8 arrays (3, H, W); ``clean`` is None without clean images."""

    name: str
    degraded: np.ndarray
    restored: np.ndarray
    clean: np.ndarray | None = None


def choose_names(available: Sequence[str], *, names: Sequence[str] | None = None, num: int = 8,
                 seed: int = 0) -> list[str]:
    """The images to draw, in the folder's order: ``names`` (all must exist) or ``num`` chosen at random by ``seed``."""
    if names:
        unknown = [name for name in names if name not in available]
        if unknown:
            raise DataError(f"--names not in the input folder: {listing(unknown)} (it holds "
                            f"{listing(available, limit=5)})")
        chosen = set(names)
    else:
        chosen = set(random.Random(seed).sample(list(available), min(num, len(available))))
    return [name for name in available if name in chosen]


def load_examples(pred_npz: str | os.PathLike, input_folder: str | os.PathLike, *,
                  gt_folder: str | os.PathLike | None = None, names: Sequence[str] | None = None, num: int = 8,
                  seed: int = 0) -> list[Example]:
    """Read the chosen images and their predictions, after checking that the prediction file matches the folder.
    ``pred_npz`` gets ``.npz`` appended when it lacks it, as ``inference.py --output_npz`` does.

    Raises:
        PredictionFileError: the prediction file is missing or its keys or shapes do not match the folder (named).
        DataError: the folder, a chosen name or a clean image is missing, or an image is unreadable.
    """
    pred_npz = npz_path(pred_npz)
    inputs = scan_inputs(input_folder, gt_folder)  # every image read once, with a clean partner of its size
    check_npz(pred_npz, inputs)
    chosen = choose_names(list(inputs), names=names, num=num, seed=seed)
    with np.load(pred_npz, allow_pickle=False) as data:
        return [Example(name, inputs.degraded(name).numpy(), data[name],
                        inputs.clean(name).numpy() if gt_folder else None)
                for name in chosen]


def _psnr_title(image: np.ndarray, clean: np.ndarray | None) -> str:
    return "" if clean is None else f"\nPSNR {psnr(torch.from_numpy(image), torch.from_numpy(clean)):.2f} dB"


def draw_grid(examples: Sequence[Example], path: str | os.PathLike) -> Path:
    """One PNG with a row per example: degraded | restored (| clean | error map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_clean = any(ex.clean is not None for ex in examples)
    cols = 4 if with_clean else 2
    aspect = min(max(ex.degraded.shape[1] / ex.degraded.shape[2] for ex in examples), MAX_ASPECT)
    fig, axes = plt.subplots(len(examples), cols, squeeze=False,
                             figsize=(cols * PANEL_INCHES, len(examples) * (PANEL_INCHES * aspect + 0.5)))
    for row, ex in zip(axes, examples):
        panels = [(ex.degraded, f"{ex.name} degraded{_psnr_title(ex.degraded, ex.clean)}"),
                  (ex.restored, f"{ex.name} restored{_psnr_title(ex.restored, ex.clean)}")]
        if ex.clean is not None:
            error = np.abs(ex.restored.astype(np.int16) - ex.clean.astype(np.int16)).mean(0)
            panels += [(ex.clean, f"{ex.name} clean"),
                       (error, f"{ex.name} |restored - clean|\n0 to {ERROR_SCALE} levels")]
        for ax, (image, title) in zip(row, panels):
            if image.ndim == 3:
                ax.imshow(image.transpose(1, 2, 0))
            else:
                ax.imshow(image, cmap="magma", vmin=0, vmax=ERROR_SCALE)
            ax.set_title(title, fontsize=9)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    try:
        with naming(path):  # a grid is whole or absent, even when interrupted
            atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def visualize(pred_npz: str | os.PathLike, input_folder: str | os.PathLike, out_dir: str | os.PathLike, *,
              gt_folder: str | os.PathLike | None = None, names: Sequence[str] | None = None, num: int = 8,
              seed: int = 0, per_grid: int = 4) -> list[Path]:
    """Draw the chosen images into ``out_dir/grid_<i>.png``, ``per_grid`` rows each; returns the files written.

    Raises:
        ConfigError: ``out_dir`` is a file, an input folder or cannot be written (checked before anything is read).
        PredictionFileError: the prediction file is missing, unreadable or does not match the folder (named).
        DataError: a folder, a chosen name or a clean image is missing, or an image is unreadable.
    """
    check_output_path(out_dir, "--out_dir", folder=True, inputs=[f for f in (input_folder, gt_folder) if f])
    examples = load_examples(pred_npz, input_folder, gt_folder=gt_folder, names=names, num=num, seed=seed)
    digits = len(str(math.ceil(len(examples) / per_grid)))
    written = [draw_grid(examples[i:i + per_grid], Path(out_dir) / f"grid_{i // per_grid + 1:0{digits}d}.png")
               for i in range(0, len(examples), per_grid)]
    _remove_earlier_grids(Path(out_dir), written)
    return written


def _remove_earlier_grids(out_dir: Path, written: Sequence[Path]) -> None:
    """Remove the grids an earlier run left in ``out_dir`` beside this run's (only files named as grids), saying so:
    the folder then shows this run's pictures alone."""
    earlier = sorted(p for p in out_dir.glob("grid_*.png") if GRID_NAME.match(p.name) and p not in written)
    for path in earlier:
        path.unlink(missing_ok=True)
    if earlier:
        log.info("removed %d grid(s) of an earlier run from %s: %s", len(earlier), out_dir,
                 listing([p.name for p in earlier], limit=5))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vis.py", description="Draw degraded images beside their restorations "
                                     "from pred.npz (and beside the clean images with an error map, given "
                                     "--gt_folder).")
    parser.add_argument("--pred_npz", default="pred.npz", help="prediction file of inference.py, .npz appended "
                        "when missing (default: %(default)s)")
    parser.add_argument("--input_folder", default="datasets/test/degraded",
                        help="the degraded images the predictions were made from (default: %(default)s)")
    parser.add_argument("--gt_folder", help="clean images: same file names, or <type>_clean-<N> for <type>-<N>")
    parser.add_argument("--out_dir", default="vis", help="where the PNG grids go (default: %(default)s)")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="file names to draw (default: a random sample)")
    parser.add_argument("--num", type=positive_int, default=8, help="images in the random sample (default: "
                        "%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample (default: %(default)s)")
    parser.add_argument("--per_grid", type=positive_int, default=4, help="rows per PNG (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> list[Path]:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = run_cli(parser.prog, lambda: visualize(
        args.pred_npz, args.input_folder, args.out_dir, gt_folder=args.gt_folder, names=args.names, num=args.num,
        seed=args.seed, per_grid=args.per_grid))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
