"""Benchmark the data loader alone: images per second by patch size, workers and caching, as a markdown table.

    python benchmarks/bench_loader.py [DATA_DIR] [--pairs 1600] [--batch_size 8] [--batches 40]

Without DATA_DIR it builds a temporary homework-layout set (rain and snow, 256x256 PNG pairs cut from
../shared/data) in the system's temporary folder and deletes it afterwards. It also times ``check_pairs`` on the whole
set, reading headers only and decoding every file.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the project root: the modules measured here live there
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dataloader import build_loaders, check_pairs, find_pairs, read_image_uint8

SHARED_DATA = ROOT.parent / "shared" / "data"
SOURCES = {"rain": "rain100h", "snow": "snow_synthetic"}


def make_homework_set(root: Path, pairs: int, size: int = 256, seed: int = 0) -> Path:
    """Write ``pairs`` homework-style pairs (half rain, half snow) of random ``size`` crops of the shared sets."""
    rng = np.random.default_rng(seed)
    jobs = []
    for kind, source in SOURCES.items():
        sources = find_pairs(SHARED_DATA / source)
        for n in range(1, pairs // len(SOURCES) + 1):
            jobs.append((kind, n, sources[rng.integers(len(sources))], rng.random(2)))
    for sub in ("degraded", "clean"):
        (root / "train" / sub).mkdir(parents=True, exist_ok=True)

    def write(job):
        kind, n, pair, (fy, fx) = job
        lq, gt = read_image_uint8(pair.degraded), read_image_uint8(pair.clean)
        top, left = int(fy * (lq.shape[1] - size + 1)), int(fx * (lq.shape[2] - size + 1))
        for image, path in ((lq, f"degraded/{kind}-{n}.png"), (gt, f"clean/{kind}_clean-{n}.png")):
            crop = image[:, top:top + size, left:left + size].permute(1, 2, 0).numpy()
            Image.fromarray(crop).save(root / "train" / path)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, jobs))
    return root


def time_check(root: Path) -> list[str]:
    pairs = find_pairs(root)
    rows = []
    for decode in (False, True):
        start = time.perf_counter()
        check_pairs(pairs, decode=decode)
        seconds = time.perf_counter() - start
        rows.append(f"| {'full decode' if decode else 'headers only'} | {2 * len(pairs)} | {seconds:.2f} | "
                    f"{2 * len(pairs) / seconds:.0f} |")
    return rows


def time_loader(root: Path, *, patch: int, workers: int, cache: bool, batch_size: int, batches: int) -> str:
    start = time.perf_counter()
    train, _ = build_loaders(root, batch_size=batch_size, num_workers=workers, patch_size=patch, val_per_type=0,
                             cache=cache, decode_check=False)
    setup = time.perf_counter() - start
    batches = min(batches, len(train) - 1)
    iterator = iter(train)
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * batch_size / (time.perf_counter() - start)
    del iterator, train  # stops the persistent workers before the next configuration
    return (f"| {patch} | {workers} | {'yes' if cache else 'no'} | {setup:.2f} | {first:.2f} | {rate:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", nargs="?", help="dataset to read (default: a temporary set cut from shared data)")
    parser.add_argument("--pairs", type=int, default=1600, help="pairs in the temporary set (3,200 images)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40, help="batches timed per configuration, after the first")
    parser.add_argument("--patches", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--threads", type=int, help="torch threads of the main process (what num_workers=0 uses)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_dir is None and not SHARED_DATA.is_dir():
        parser.error(f"{SHARED_DATA} is absent: pass a dataset folder")

    temp = None if args.data_dir else Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        if temp:
            start = time.perf_counter()
            root = make_homework_set(temp, args.pairs)
            print(f"Built {args.pairs} pairs of 256x256 PNG in {temp} in {time.perf_counter() - start:.0f} s")
        else:
            root = Path(args.data_dir)
        print(f"\n{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
              f"load average {os.getloadavg()[0]:.1f}, data {root}\n")
        print("| check_pairs | images | seconds | images/s |\n|---|---|---|---|")
        print("\n".join(time_check(root)))
        print(f"\nLoader alone, batch {args.batch_size}, {args.batches} batches timed after the first; setup is "
              "finding the pairs, reading headers and (cache) decoding everything.\n")
        print("| patch | workers | cache | setup s | first batch s | images/s |\n|---|---|---|---|---|---|")
        for patch in args.patches:
            for workers in args.workers:
                for cache in (False, True):
                    print(time_loader(root, patch=patch, workers=workers, cache=cache, batch_size=args.batch_size,
                                      batches=args.batches), flush=True)
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
