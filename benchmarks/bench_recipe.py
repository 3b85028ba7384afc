"""What each training and inference choice buys, measured: one table of test PSNR on a held-out split.

::

    python benchmarks/bench_recipe.py --out recipe.md            # the whole table, tiny preset (40 min on 2 cores)
    python benchmarks/bench_recipe.py --seeds 0 1 --out recipe.md
    python benchmarks/bench_recipe.py --smoke                     # the same code on a few images in about a minute

The data: Rain100H (rain) and the synthetic snow set of ``../shared/data`` (``--data``), whose backgrounds are disjoint
(rain on 1..50, snow on 51..100). Images 1..40 and 51..90 train, as six 96x96 tiles each (480 pairs); images 41..50
and 91..100 never reach training: their 192x192 centres are the test set. Every training row runs the same number of
optimizer updates on the same number of training pixels per update (8 x 96 x 96), from the same seed, with the same
peak learning rate (1e-3, for the tiny preset) and warm-up (60 updates), so only the recipe differs:

- original: whole tiles, batch 2 x 4 accumulated, GFL loss, CutBlur/Mixup/Blend (the homework's trainer.py);
- official: 48x48 crops (half the side, as the official 128 of 256), batch 8 x 4, L1, flips and rotations only;
- +EMA: the original with ``--ema 0.999`` (warm-up decay, ema.py), tested on the EMA weights; and with the constant
  decay (``--ema_no_warmup``), for what the warm-up changes;
- +progressive: the original with ``--progressive 48:32:5 64:18:4 96:8:2`` (equal pixels per update in each phase);
- together: progressive and EMA;
- official + FFT loss 0.05 / 0.1: the official recipe with ``--fft_weight`` (L1 + W x mean |FFT(pred) - FFT(target)|).

The official-family runs are also restored in the ``--views`` ways: 8x TTA (default), and test-time local statistics
(``tlc``: benchmarks/tlc.py, windows of 1.5 x the 48-pixel crop) without and with TTA (``tlc_tta``). ``--reuse`` with
``--work`` restores finished runs again instead of retraining them. The together run's inference rows: no TTA,
8-view TTA, an ensemble of its last three snapshots (``--keep_last 3``) with TTA, and the average of those snapshots
(``avg_checkpoints.py``) with TTA. PSNR on uint8 RGB (the grader's)
and on Y (the literature's), per type and overall.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the project root: the modules measured here live there
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import avg_checkpoints
import inference
import trainer
import utils
from dataloader import degradation_type, read_image_uint8
from run import read_log
from scoring import score_image
from utils import positive_int, run_cli, setup_logging

log = logging.getLogger("bench_recipe")
DEFAULT_DATA = ROOT.parent / "shared" / "data"
TILE, TILES_X, TILES_Y, TEST_SIDE = 96, 3, 2, 192
SPLITS = {"rain": ("rain100h", range(1, 41), range(41, 51)), "snow": ("snow_synthetic", range(51, 91),
                                                                        range(91, 101))}
EPOCHS = 5  # of the original recipe: 60 updates each (480 tiles / (2 x 4)), 300 in all
# Every recipe: 300 updates (299 progressive), 8 x 96 x 96 = 73,728 training pixels per update, warm-up 60 updates.
COMMON = ["--preset", "tiny", "--lr", "1e-3", "--num_workers", "0", "--val_per_type", "0", "--device", "cpu",
          "--weight_decay", "1e-4"]
ORIGINAL = ["--batch_size", "2", "--accum_steps", "4", "--loss", "gfl", "--augment", "strong", "--epochs", str(EPOCHS),
            "--warmup_epochs", "1"]
PROGRESSIVE = ["--accum_steps", "1", "--loss", "gfl", "--augment", "strong", "--epochs", "11", "--warmup_epochs", "4",
               "--progressive", "48:32:5", "64:18:4", "96:8:2"]
OFFICIAL = ["--batch_size", "8", "--accum_steps", "4", "--patch_size", "48", "--loss", "l1", "--augment", "views",
            "--epochs", str(EPOCHS * 4), "--warmup_epochs", "4"]
ORIGINAL_NAME = "original (whole tiles, b2 x 4, GFL, strong aug.)"
OFFICIAL_NAME = "official (48 crops, b8 x 4, L1, views)"
RECIPES = {
    ORIGINAL_NAME: ORIGINAL,
    OFFICIAL_NAME: OFFICIAL,
    "original + EMA (0.999, warm-up)": ORIGINAL + ["--ema", "0.999"],
    "original + EMA (0.999, constant: no warm-up)": ORIGINAL + ["--ema", "0.999", "--ema_no_warmup"],
    "original + progressive (48/32, 64/18, 96/8)": PROGRESSIVE,
    "together (progressive + EMA)": PROGRESSIVE + ["--ema", "0.999", "--keep_last", "3"],
    "official + FFT loss 0.05": OFFICIAL + ["--fft_weight", "0.05"],
    "official + FFT loss 0.1": OFFICIAL + ["--fft_weight", "0.1"],
}
TOGETHER = "together (progressive + EMA)"
# Recipes whose model is also restored in the --views ways: 8x TTA, test-time local statistics, both.
OFFICIAL_FAMILY = (OFFICIAL_NAME, "official + FFT loss 0.05", "official + FFT loss 0.1")
VIEWS = {"tta": ("  inference: 8x TTA", 8, False), "tlc": ("  inference: TLC", 1, True),
         "tlc_tta": ("  inference: TLC, 8x TTA", 8, True)}


@dataclass
class Row:
    name: str
    seed: int
    updates: int | None
    megapixels: float | None
    rain: float
    snow: float
    overall: float
    overall_y: float
    seconds: float


def _tiles(image: Image.Image, tile: int) -> list[Image.Image]:
    w, h = image.size
    nx, ny = (TILES_X, TILES_Y) if w >= h else (TILES_Y, TILES_X)
    xs = np.linspace(0, w - tile, nx).round().astype(int)
    ys = np.linspace(0, h - tile, ny).round().astype(int)
    return [image.crop((x, y, x + tile, y + tile)) for y in ys for x in xs]


def _centre(image: Image.Image, side: int) -> Image.Image:
    w, h = image.size
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def prepare(data: Path, out: Path, *, smoke: bool) -> tuple[Path, Path]:
    """Write the training tiles (homework layout, ``out/train``) and the test centres (``out/test``); a smoke run
    takes a few images, at half the sides."""
    tile, test_side = (TILE // 2, TEST_SIDE // 2) if smoke else (TILE, TEST_SIDE)
    for kind, (folder, train_ids, test_ids) in SPLITS.items():
        source = data / folder
        if not (source / "degraded").is_dir():
            raise utils.ConfigError(f"{source} is missing: pass --data (the folder holding "
                                    f"{', '.join(f for f, _, _ in SPLITS.values())})")
        train_ids, test_ids = (list(train_ids)[:4], list(test_ids)[:2]) if smoke else (train_ids, test_ids)
        number = 0
        for i in train_ids:
            pair = [Image.open(source / side / f"{i}.png").convert("RGB") for side in ("degraded", "clean")]
            for lq, gt in zip(*(_tiles(img, tile) for img in pair)):
                number += 1
                for split, name, img in (("degraded", f"{kind}-{number}.png", lq),
                                         ("clean", f"{kind}_clean-{number}.png", gt)):
                    (out / "train" / split).mkdir(parents=True, exist_ok=True)
                    img.save(out / "train" / split / name)
        for i in test_ids:
            for split, name in (("degraded", f"{kind}-{i}.png"), ("clean", f"{kind}_clean-{i}.png")):
                (out / "test" / split).mkdir(parents=True, exist_ok=True)
                _centre(Image.open(source / split / f"{i}.png").convert("RGB"), test_side).save(
                    out / "test" / split / name)
    return out / "train", out / "test"


def test_psnr(checkpoints: Sequence[Path], test: Path, work: Path, *, tta: int,
              tlc: bool = False) -> tuple[float, float, float, float]:
    """(rain, snow, overall RGB PSNR, overall Y PSNR) of restoring the test set with ``checkpoints``; ``tlc``: with
    test-time local statistics (``tlc.enable_tlc``, windows of 1.5 x each checkpoint's training crop)."""
    with _tlc_models() if tlc else contextlib.nullcontext():
        scores = inference.main(["--checkpoint", *map(str, checkpoints), "--data_dir", str(test), "--tta", str(tta),
                                 "--output_npz", str(work / "pred.npz"), "--device", "cpu", "--no_progress"])
    by_kind = {kind: statistics.mean(s.psnr for s in scores if s.kind == kind) for kind in SPLITS}
    return (by_kind["rain"], by_kind["snow"], statistics.mean(s.psnr for s in scores),
            statistics.mean(s.psnr_y for s in scores))


@contextlib.contextmanager
def _tlc_models():
    """While open, every model ``inference.load_model`` builds computes its global statistics over local windows
    of 1.5 x the training crop its checkpoint records (the prototype in benchmarks/tlc.py)."""
    from benchmarks import tlc
    load_model = inference.load_model

    def load_with_tlc(checkpoint, **kwargs):
        model = load_model(checkpoint, **kwargs)
        crop = utils.load_checkpoint(checkpoint, mmap=True)["args"].get("patch_size")
        return tlc.enable_tlc(model, window=tlc.window_for_crop(crop)) if crop else model

    inference.load_model = load_with_tlc
    try:
        yield
    finally:
        inference.load_model = load_model


def degraded_psnr(test: Path) -> tuple[float, float, float, float]:
    """(rain, snow, overall RGB PSNR, overall Y PSNR) of the degraded test images against their clean partners."""
    scores = []
    for path in sorted((test / "degraded").iterdir()):
        kind = degradation_type(path)
        clean = read_image_uint8(test / "clean" / path.name.replace(f"{kind}-", f"{kind}_clean-"))
        scores.append(score_image(path.name, kind, read_image_uint8(path), clean))
    by_kind = {kind: statistics.mean(s.psnr for s in scores if s.kind == kind) for kind in SPLITS}
    return (by_kind["rain"], by_kind["snow"], statistics.mean(s.psnr for s in scores),
            statistics.mean(s.psnr_y for s in scores))


def train(name: str, extra: list[str], seed: int, train_dir: Path, run: Path, *, smoke: bool,
          reuse: bool = False) -> tuple:
    argv = ["--data_dir", str(train_dir), "--save_dir", str(run), "--seed", str(seed), *COMMON, *extra]
    if smoke:  # two epochs of each phase at most: a check of the code, not a measurement
        argv = _shortened(argv)
    if reuse and (finished := _finished_run(run, argv)) is not None:
        log.info("%s, seed %d: reusing the finished run in %s", name, seed, run)
        return finished
    start = time.perf_counter()
    result = trainer.train(trainer.parse_args(trainer.build_parser(), argv))
    seconds = time.perf_counter() - start
    log.info("%s, seed %d: %d updates in %.0f s", name, seed, result.step, seconds)
    return result, seconds


def _finished_run(run: Path, argv: list[str]) -> tuple | None:
    """(Result, training seconds) of a run folder that finished the training ``argv`` describes (same options in its
    args.json, every epoch logged), else None."""
    try:
        saved = json.loads((run / "args.json").read_text())
        records = read_log(run)
    except (OSError, ValueError, utils.ToolkitError):
        return None
    args = trainer.parse_args(trainer.build_parser(), argv)
    same = all(saved.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
               if k not in trainer.PER_INVOCATION and k in saved and v is not None)  # None: resolved on start
    if not same or not records or records[-1]["epoch"] != args.epochs or not (run / "last.pth").is_file():
        return None
    result = trainer.Result(run, records[-1]["epoch"], records[-1]["step"], float("nan"))
    return result, sum(r.get("time_s") or 0.0 for r in records)


def _shortened(argv: list[str]) -> list[str]:
    """A smoke run's options: at most two epochs (one per progressive phase), crops at half the side as the tiles
    are, micro-batches of at most 4, no warm-up."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--epochs":
            out += ["--epochs", str(min(int(argv[i + 1]), 3 if "--progressive" in argv else 2))]
            i += 2
        elif argv[i] == "--progressive":
            out.append("--progressive")
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                patch, batch, _ = argv[i].split(":")
                out.append(f"{int(patch) // 2}:{min(int(batch), 4)}:1")
                i += 1
        elif argv[i] == "--patch_size":
            out += ["--patch_size", str(int(argv[i + 1]) // 2)]
            i += 2
        elif argv[i] == "--warmup_epochs":
            out += ["--warmup_epochs", "0"]
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def table(rows: list[Row]) -> str:
    lines = ["| recipe | seed | updates | training Mpx | rain | snow | overall (RGB) | overall (Y) | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        updates = "-" if r.updates is None else str(r.updates)
        mpx = "-" if r.megapixels is None else f"{r.megapixels:.1f}"
        lines.append(f"| {r.name} | {r.seed} | {updates} | {mpx} | {r.rain:.2f} | {r.snow:.2f} | {r.overall:.2f} | "
                     f"{r.overall_y:.2f} | {r.seconds:.0f} |")
    return "\n".join(lines)


def training_pixels(run: Path, accum: int, tile: int) -> float:
    """Megapixels of degraded input the run trained on, from its log: per epoch, its updates x micro-batch x
    accumulation x the patch's area (the tile's for whole images)."""
    total, step = 0.0, 0
    for record in read_log(run):
        side = record.get("patch_size") or tile
        total += (record["step"] - step) * record["batch_size"] * accum * side * side
        step = record["step"]
    return total / 1e6


def _accum(extra: list[str]) -> int:
    return int(extra[extra.index("--accum_steps") + 1]) if "--accum_steps" in extra else 4


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with rain100h/ and snow_synthetic/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every training row (default 0)")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES), metavar="RECIPE")
    parser.add_argument("--out", type=Path, help="also write the table here (rewritten after every row)")
    parser.add_argument("--smoke", action="store_true", help="a few images and epochs: checks the code")
    parser.add_argument("--work", type=Path, help="keep the data and runs here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --work: a run folder there that finished the same training is restored again, "
                             "not retrained (for adding inference rows)")
    parser.add_argument("--views", nargs="*", choices=list(VIEWS), default=["tta"],
                        help="how the official-family runs are also restored, beside whole: tta (8x TTA), tlc "
                             "(test-time local statistics, benchmarks/tlc.py), tlc_tta (both) (default: tta)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="PyTorch threads (default 1: on a machine shared with other jobs more threads wait on "
                             "each other; the PSNR figures do not depend on it)")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    return run_cli(parser.prog, lambda: run(args))


def run(args: argparse.Namespace) -> str:
    """Prepare the data, train every recipe per seed, restore the test set; the table."""
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        text = table(rows)
        print(text.splitlines()[-1], file=sys.stderr, flush=True)
        if args.out is not None:
            args.out.write_text(text + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.reuse and (work / "data" / "train").is_dir() and (work / "data" / "test").is_dir():
            train_dir, test = work / "data" / "train", work / "data" / "test"  # as an earlier run wrote them
        else:
            train_dir, test = prepare(args.data, work / "data", smoke=args.smoke)
        add(Row("degraded input (no restoration)", 0, None, None, *degraded_psnr(test), 0.0))
        for seed in args.seeds:
            for name in args.recipes:
                run_dir = work / f"run_{list(RECIPES).index(name)}_seed{seed}"
                result, seconds = train(name, RECIPES[name], seed, train_dir, run_dir, smoke=args.smoke,
                                        reuse=args.reuse)
                if result.signal is not None:
                    raise KeyboardInterrupt  # stopped by a signal: the rows so far are in --out
                start = time.perf_counter()
                pixels = training_pixels(run_dir, _accum(RECIPES[name]), TILE // 2 if args.smoke else TILE)
                add(Row(name, seed, result.step, pixels, *test_psnr([run_dir / "last.pth"], test, run_dir, tta=1),
                        seconds + time.perf_counter() - start))
                if name in OFFICIAL_FAMILY:
                    for label, tta, tlc in (VIEWS[view] for view in args.views):
                        start = time.perf_counter()
                        add(Row(label, seed, None, None, *test_psnr([run_dir / "last.pth"], test, run_dir, tta=tta,
                                                                    tlc=tlc), time.perf_counter() - start))
                if name != TOGETHER:
                    continue
                snapshots = avg_checkpoints.run_snapshots(run_dir)
                for label, checkpoints in (("  inference: 8x TTA", [run_dir / "last.pth"]),
                                           (f"  inference: ensemble of {len(snapshots)} snapshots, 8x TTA", snapshots)):
                    start = time.perf_counter()
                    add(Row(label, seed, None, None, *test_psnr(checkpoints, test, run_dir, tta=8),
                            time.perf_counter() - start))
                start = time.perf_counter()
                averaged = avg_checkpoints.main(["--out", str(run_dir / "averaged.pth"), "--overwrite",
                                                 *map(str, snapshots)])
                add(Row(f"  inference: average of {len(snapshots)} snapshots, 8x TTA", seed, None, None,
                        *test_psnr([averaged], test, run_dir, tta=8), time.perf_counter() - start))
    text = table(rows)
    print(text)
    return text


if __name__ == "__main__":
    main()
