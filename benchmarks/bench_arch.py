"""PromptIR beside AdaIR (``--arch``), measured: parameters, CPU time per image, and test PSNR under one recipe.

::

    python benchmarks/bench_arch.py --seeds 0 1 --out arch.md     # tiny preset: 4 trainings, about 40 min on 2 cores
    python benchmarks/bench_arch.py --speed_only                   # parameters and CPU times only, a minute or two
    python benchmarks/bench_arch.py --smoke                        # the same code on a few images

Speed: each preset's parameters (trainable ones apart), and the CPU time to restore one 256x256 image without TTA,
plain (the official formulation) and on the fast path, measured in one process, one after the other, median of
``--repeats`` after a warm-up. Quality: ``bench_recipe.py``'s data (held-out test split), recipe, updates and
training pixels, each network trained by the same ``trainer.train`` from the same seed; only ``--arch`` differs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_recipe  # noqa: E402 (after the path set-up)
from fast_path import enable_fast_path  # noqa: E402
from model import ARCHS, build_model  # noqa: E402
from utils import positive_int, run_cli, setup_logging  # noqa: E402

RECIPE = "official (48 crops, b8 x 4, L1, views)"  # bench_recipe's best row, and AdaIR's own training recipe
SIDE = 256


def seconds_per_image(model: torch.nn.Module, *, repeats: int) -> float:
    """Median seconds of one forward pass of a 256x256 image (after one warm-up pass)."""
    x = torch.rand(1, 3, SIDE, SIDE)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            model(x)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed_table(presets: Sequence[str], *, repeats: int) -> str:
    lines = ["| preset | network | parameters | trainable | CPU s / 256x256 image, plain | fast | fast vs plain | "
             "vs PromptIR (fast) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for preset in presets:
        fast_promptir = None
        for arch in ARCHS:
            torch.manual_seed(0)
            model = build_model(preset, arch=arch).eval()
            params = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            plain = seconds_per_image(model, repeats=repeats)
            fast = seconds_per_image(enable_fast_path(model), repeats=repeats)
            fast_promptir = fast_promptir or fast
            lines.append(f"| {preset} | {arch} | {params:,} | {trainable:,} | {plain:.3f} | {fast:.3f} | "
                         f"{plain / fast:.2f}x | {fast / fast_promptir:.2f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def quality_table(args: argparse.Namespace) -> str:
    """bench_recipe's rows for ``RECIPE`` with each network, per seed."""
    rows: list[bench_recipe.Row] = []
    extra = bench_recipe.RECIPES[RECIPE]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        train_dir, test = bench_recipe.prepare(args.data, work / "data", smoke=args.smoke)
        rows.append(bench_recipe.Row("degraded input (no restoration)", 0, None, None,
                                     *bench_recipe.degraded_psnr(test), 0.0))
        for seed in args.seeds:
            for arch in args.archs:
                name = f"{arch}, {RECIPE}"
                run_dir = work / f"run_{arch}_seed{seed}"
                result, seconds = bench_recipe.train(name, [*extra, "--arch", arch], seed, train_dir, run_dir,
                                                     smoke=args.smoke)
                if result.signal is not None:
                    raise KeyboardInterrupt
                tile = bench_recipe.TILE // 2 if args.smoke else bench_recipe.TILE
                rows.append(bench_recipe.Row(name, seed, result.step,
                                             bench_recipe.training_pixels(run_dir, bench_recipe._accum(extra), tile),
                                             *bench_recipe.test_psnr([run_dir / "last.pth"], test, run_dir, tta=1),
                                             seconds))
                text = bench_recipe.table(rows)
                print(text.splitlines()[-1], file=sys.stderr, flush=True)
                if args.out is not None:
                    args.out.write_text(text + "\n")
    return bench_recipe.table(rows)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=bench_recipe.DEFAULT_DATA,
                        help="folder with rain100h/ and snow_synthetic/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the training rows (default 0)")
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS), help="networks (default both)")
    parser.add_argument("--presets", nargs="+", default=["tiny"], help="presets of the speed table (default tiny)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed passes per case (default 5)")
    parser.add_argument("--speed_only", action="store_true", help="parameters and CPU times only, no training")
    parser.add_argument("--quality_only", action="store_true", help="the training rows only")
    parser.add_argument("--out", type=Path, help="also write the tables here (the quality rows as they come)")
    parser.add_argument("--smoke", action="store_true", help="a few images and epochs: checks the code")
    parser.add_argument("--work", type=Path, help="keep the data and runs here (default: a temporary folder)")
    parser.add_argument("--threads", type=positive_int, default=1, help="PyTorch threads (default 1)")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)

    def work() -> str:
        tables = [] if args.quality_only else [speed_table(args.presets, repeats=args.repeats)]
        if not args.speed_only:
            tables.insert(0, quality_table(args))
        text = "\n\n".join(tables)
        print(text)
        if args.out is not None:
            args.out.write_text(text + "\n")
        return text

    return run_cli(parser.prog, work)


if __name__ == "__main__":
    main()
