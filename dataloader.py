"""Finding degraded/clean pairs on disk, checking them, the stratified split, datasets and loaders.

Layouts ``find_pairs`` understands (``root`` is what ``--data_dir`` names):

1. the homework release: ``root/train/degraded/<type>-<N>.<ext>`` paired with
   ``root/train/clean/<type>_clean-<N>.<ext>`` (``root/test/degraded`` holds the unpaired test images; read it
   with ``list_images``);
2. one paired set: ``root/degraded`` and ``root/clean`` with identical file names, or homework-style names (so
   ``--data_dir .../train`` works too);
3. a folder of such sets: ``root/<set>/degraded`` and ``root/<set>/clean`` (like ``../shared/data``).

The degradation type ("kind") of a pair is its set's folder name in layout 3; otherwise the ``<type>`` prefix of a
homework-style name, or the set folder's name when the file has none.

Every image is read by ``read_image_uint8``: grayscale and palette images become RGB, an alpha channel is dropped
(the stored colours are kept, not composited), and 16-bit samples keep their high byte (``v >> 8``, which is what
Pillow itself does for 16-bit RGB PNGs), so the same file gives the same pixels everywhere.
"""
import logging
import os
import random
import re
from collections import defaultdict
from collections.abc import Callable, Container, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from augment import NUM_VIEWS, SHAPE_PRESERVING_VIEWS, dihedral

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
HOMEWORK_NAME = re.compile(r"^(?P<kind>.+)-(?P<number>[0-9]+)$")  # degraded stem "<type>-<N>"
MAX_LISTED_PROBLEMS = 50
VAL_FRACTION_CAP = 0.2
_LAYOUTS = ("  - root/train/degraded + root/train/clean (homework: rain-1.png <-> rain_clean-1.png)\n"
            "  - root/degraded + root/clean (identical file names, or homework-style names)\n"
            "  - root/<set>/degraded + root/<set>/clean for several sets (kind = set name)")


class DataError(ValueError):
    """A problem with the data on disk; the message names the files and what to do."""


@dataclass(frozen=True)
class Pair:
    """One degraded image and the clean image it should become.

    Args:
        degraded (Path): the degraded image.
        clean (Path | None): its expected clean partner (it may be missing until ``check_pairs`` has passed);
            None for unpaired test images.
        kind (str): degradation type, e.g. "rain" or "snow".
        name (str): the degraded file name, prefixed with ``<set>/`` in a folder of sets.
    """

    degraded: Path
    clean: Path | None
    kind: str
    name: str


def natural_key(name: str) -> list:
    """Sort key that orders "rain-2" before "rain-10" (digit runs compare as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"([0-9]+)", name)]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path) -> list[Path]:
    """The image files in ``folder``, natural-sorted; DataError when the folder is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    images = sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: natural_key(p.name))
    if not images:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def _is_set(folder: Path) -> bool:
    return (folder / "degraded").is_dir() and (folder / "clean").is_dir()


def clean_partner_stem(stem: str, clean_stems: Container[str]) -> str:
    """The file stem of the clean partner of the degraded image ``stem``: ``<type>_clean-<N>`` for a homework name
    ``<type>-<N>``, unless only a clean file of the identical stem exists; the identical stem for other names."""
    match = HOMEWORK_NAME.match(stem)
    if not match:
        return stem
    homework_stem = f"{match['kind']}_clean-{match['number']}"
    return stem if stem in clean_stems and homework_stem not in clean_stems else homework_stem


DEGRADED_FOLDER = "degraded"


def degradation_type(degraded: str | Path) -> str:
    """The degradation type of a degraded image: the one rule for training logs, validation and scoring.

    The ``<type>`` prefix of a homework-style name ``<type>-<N>`` (``rain-12.png`` -> ``rain``), whatever its clean
    partner is called; otherwise the name of the set it belongs to: the folder above its ``degraded/`` folder
    (``rain100h/degraded/1.png`` -> ``rain100h``), or its own folder when that has another name.
    """
    degraded = Path(degraded)
    match = HOMEWORK_NAME.match(degraded.stem)
    if match:
        return match["kind"]
    folder = degraded.absolute().parent
    return folder.parent.name if folder.name == DEGRADED_FOLDER else folder.name


def _set_pairs(folder: Path, *, set_kind: str | None = None, prefix: str = "") -> list[Pair]:
    """Pairs of one set; ``set_kind`` overrides the kind taken from names (folder-of-sets layout)."""
    degraded_images = list_images(folder / "degraded")
    clean_by_stem = {p.stem: p for p in list_images(folder / "clean")}
    pairs = []
    for degraded in degraded_images:
        stem = clean_partner_stem(degraded.stem, clean_by_stem)
        clean = clean_by_stem.get(stem, folder / "clean" / (stem + degraded.suffix))
        kind = set_kind or degradation_type(degraded)
        pairs.append(Pair(degraded, clean, kind, prefix + degraded.name))
    unused = set(clean_by_stem.values()) - {p.clean for p in pairs}
    if unused:
        log.warning("%d clean image(s) in %s have no degraded partner and are ignored", len(unused), folder / "clean")
    return pairs


def find_pairs(root: str | Path) -> list[Pair]:
    """All (degraded, clean) pairs under ``root`` in one of the layouts of the module docstring.

    Pairs whose clean partner is missing are returned with the expected path; ``check_pairs`` reports them.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; expected one of these layouts:\n{_LAYOUTS}")
    if _is_set(root / "train"):
        return _set_pairs(root / "train")
    if _is_set(root):
        return _set_pairs(root)
    folders = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name))
    sets = [d for d in folders if _is_set(d)]
    for d in folders:
        halves = [name for name in ("degraded", "clean") if (d / name).is_dir()]
        if sets and len(halves) == 1:
            log.warning("skipping %s: it has %s/ but no %s/ beside it (name its folders degraded/ and clean/ to "
                        "use it)", d, halves[0], "clean" if halves[0] == "degraded" else "degraded")
    if not sets:
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        shown = ", ".join(found[:10]) + (", ..." if len(found) > 10 else "") if found else "nothing"
        raise DataError(f"no degraded/clean pairs found in {root} (it holds {shown}); expected one of these "
                        f"layouts:\n{_LAYOUTS}")
    return [pair for s in sets for pair in _set_pairs(s, set_kind=s.name, prefix=f"{s.name}/")]


def _open(path: str | Path, fn: Callable):
    """``fn(image)`` on the opened file; every Pillow failure (it raises many types) becomes a DataError."""
    try:
        with Image.open(path) as img:
            if img.mode == "F":
                raise DataError(f"{path}: floating-point images are not supported; save it as 8- or 16-bit")
            return fn(img)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot be read as an image ({type(err).__name__}: {err})") from err


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit grayscale
        high_byte = (np.asarray(img).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return np.repeat(high_byte[..., None], 3, axis=-1)
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def read_image_uint8(path: str | Path) -> Tensor:
    """Decode an image file to a uint8 RGB tensor (3, H, W); DataError naming the file when it cannot be read."""
    return torch.from_numpy(np.ascontiguousarray(_open(path, _to_rgb_array).transpose(2, 0, 1)))  # one copy


def read_image(path: str | Path) -> Tensor:
    """Read an image as a float RGB tensor (3, H, W) in [0, 1] (see the module docstring for the conversions)."""
    return read_image_uint8(path).float().div_(255)


def _image_size(path: Path, decode: bool) -> tuple[int, int]:
    """(H, W) from the header; with ``decode`` the whole file is decoded, which finds truncated data."""
    def size(img: Image.Image) -> tuple[int, int]:
        if decode:
            img.load()
        return img.height, img.width
    return _open(path, size)


def _threaded(fn: Callable, items: Sequence) -> list:
    """``[fn(item) for item in items]`` on a few threads (Pillow decodes without the GIL); exceptions are returned."""
    def safe(item):
        try:
            return fn(item)
        except DataError as err:
            return err
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(safe, items))


def _raise_problems(problems: list[str], what: str) -> None:
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise DataError(f"{len(problems)} problem(s) with {what}; fix them and start again:\n{listed}{more}")


def check_pairs(pairs: Sequence[Pair], *, decode: bool = True) -> list[tuple[int, int]]:
    """Check every pair before any training starts and return the (H, W) of each.

    Finds clean partners that are missing, unreadable files, pairs of different sizes and, with ``decode`` (slower:
    it decodes every file), truncated or corrupt image data. All problems are raised together in one DataError.

    Args:
        pairs (Sequence[Pair]): pairs from ``find_pairs``.
        decode (bool): decode every image fully instead of reading only headers. Default: True.
    """
    if not pairs:
        raise DataError("no image pairs to check")
    files = [path for p in pairs for path in (p.degraded, p.clean) if path is not None and path.is_file()]
    size_of = dict(zip(files, _threaded(lambda path: _image_size(path, decode), files)))
    problems = []
    for pair in pairs:
        lq_size, gt_size = size_of[pair.degraded], size_of.get(pair.clean)
        if gt_size is None:
            problems.append(f"{pair.degraded} has no clean partner (expected {pair.clean})")
        problems += [str(r) for r in (lq_size, gt_size) if isinstance(r, DataError)]
        if isinstance(lq_size, tuple) and isinstance(gt_size, tuple) and lq_size != gt_size:
            problems.append(f"sizes differ: {pair.degraded} is {lq_size[1]}x{lq_size[0]} (WxH) but {pair.clean} is "
                            f"{gt_size[1]}x{gt_size[0]}")
    _raise_problems(problems, "the data set")
    return [size_of[p.degraded] for p in pairs]


def stratified_split(pairs: Sequence[Pair], *, val_per_type: int = 320, seed: int = 42) -> tuple[list, list]:
    """Split pairs into (train, val), drawing the validation pairs of each kind separately.

    Per kind, ``min(val_per_type, floor(20 % of that kind))`` pairs go to validation, but at least one when the kind
    has two or more pairs; a kind with a single pair stays in training. A warning says when a kind gets fewer than
    ``val_per_type``. The draw uses ``random.Random`` seeded with the seed and the kind, on the natural-sorted names,
    so it is the same on every machine and does not change when other kinds are added. ``val_per_type=0`` gives no
    validation set. Both lists keep the input order.
    """
    if val_per_type < 0:
        raise ValueError(f"val_per_type must be >= 0, got {val_per_type}")
    by_kind = defaultdict(list)
    for pair in pairs:
        by_kind[pair.kind].append(pair)
    val = set()
    for kind in sorted(by_kind):
        members = sorted(by_kind[kind], key=lambda p: natural_key(p.name))
        count = min(val_per_type, max(int(VAL_FRACTION_CAP * len(members)), 1 if len(members) >= 2 else 0))
        if val_per_type and count < val_per_type:
            log.warning("kind %r has %d pairs: %d go to validation instead of %d (at most %d %% of a kind)",
                        kind, len(members), count, val_per_type, round(VAL_FRACTION_CAP * 100))
        val.update(random.Random(f"{seed}/{kind}").sample(members, count))
    return [p for p in pairs if p not in val], [p for p in pairs if p in val]


class PairedDataset(Dataset):
    """Pairs as dicts ``{"lq", "gt", "kind", "name"}`` with float (3, H, W) images in [0, 1].

    For training (``train=True``) each item is a random ``patch_size`` crop at the same place in both images, then
    one random dihedral view of both; whole images when ``patch_size`` is None, which needs all images to share one
    size. A crop is square, so all 8 views are used; whole non-square images use only the 4 views that keep their
    shape, so that they still batch. An image smaller than the patch is an error (no padding: a model should not
    learn from invented borders). The randomness of an item comes from a seed the sampler gives with its index
    (``dataset[(index, seed)]``, see ``SeededSampler``); a plain integer index draws a seed from torch's generator.
    For validation (``train=False``) items are whole images, unchanged.

    Args:
        pairs (Sequence[Pair]): pairs with their clean partners (checked with ``check_pairs``).
        train (bool): random crops and views when True, whole unchanged images when False. Default: True.
        patch_size (int | None): side of the square training crops; None for whole images. Default: None.
        cache (bool): decode every image once, up front, and keep it in memory as uint8 (3 bytes per pixel per
            image, about 1.3 GB for 3,200 pairs of 256x256). Default: False.
    """

    def __init__(self, pairs: Sequence[Pair], *, train: bool = True, patch_size: int | None = None,
                 cache: bool = False):
        if patch_size is not None and patch_size < 1:
            raise ValueError(f"patch_size must be a positive number of pixels or None, got {patch_size}")
        self.pairs, self.train, self.patch_size = list(pairs), train, patch_size
        self.cache = None
        if cache:
            results = _threaded(read_image_uint8, [path for p in self.pairs for path in (p.degraded, p.clean)])
            _raise_problems([str(r) for r in results if isinstance(r, DataError)], "the images to cache")
            self.cache = list(zip(results[0::2], results[1::2]))
            self.sizes = [tuple(lq.shape[-2:]) for lq, _ in self.cache]
        else:
            self.sizes = [_image_size(p.degraded, decode=False) for p in self.pairs]
        if train:
            self._check_train_sizes()

    def _check_train_sizes(self) -> None:
        if self.patch_size is None:
            distinct = sorted(set(self.sizes))
            if len(distinct) > 1:
                shown = ", ".join(f"{w}x{h}" for h, w in distinct[:5]) + (", ..." if len(distinct) > 5 else "")
                raise DataError(f"training images come in {len(distinct)} sizes (WxH {shown}): whole images cannot "
                                "be batched; pass --patch_size to train on random crops")
            return
        small = [f"{p.degraded} is {w}x{h} (WxH)" for p, (h, w) in zip(self.pairs, self.sizes)
                 if min(h, w) < self.patch_size]
        _raise_problems(small, f"training images smaller than --patch_size {self.patch_size} (use a smaller patch "
                               "or remove them)")

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        if self.cache is not None:
            return self.cache[index]
        pair = self.pairs[index]
        return read_image_uint8(pair.degraded), read_image_uint8(pair.clean)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, None)
        lq, gt = self._load(index)
        if self.train:
            lq, gt = self._random_view(lq, gt, seed)
        pair = self.pairs[index]
        return {"lq": lq.float().div_(255), "gt": gt.float().div_(255), "kind": pair.kind, "name": pair.name}

    def _random_view(self, lq: Tensor, gt: Tensor, seed: int | None) -> tuple[Tensor, Tensor]:
        rng = random.Random(int(torch.randint(2**62, (1,))) if seed is None else seed)
        h, w = lq.shape[-2:]
        if self.patch_size is not None:
            top, left = rng.randrange(h - self.patch_size + 1), rng.randrange(w - self.patch_size + 1)
            box = (..., slice(top, top + self.patch_size), slice(left, left + self.patch_size))
            lq, gt, h, w = lq[box], gt[box], self.patch_size, self.patch_size
        k = rng.randrange(NUM_VIEWS) if h == w else rng.choice(SHAPE_PRESERVING_VIEWS)
        return dihedral(lq, k), dihedral(gt, k)


class SeededSampler(Sampler):
    """Shuffles the training set and gives every drawn index its own seed for its crop and view.

    Yields ``(index, seed)``. The order comes from a ``DistributedSampler`` (one replica unless distributed), the
    seeds from ``numpy`` seeded with (seed, epoch, rank): so an epoch's batches depend only on the seed, the epoch
    and the rank, never on the number of workers, and resuming at epoch ``e`` is ``set_epoch(e)``. Each pass
    advances the epoch by one, so forgetting ``set_epoch`` still gives every epoch new crops.

    Args:
        dataset (Dataset): the dataset to draw from.
        seed (int): base seed, >= 0. Default: 42.
        num_replicas (int): number of processes sharing the data. Default: 1.
        rank (int): this process's rank. Default: 0.
    """

    def __init__(self, dataset: Dataset, *, seed: int = 42, num_replicas: int = 1, rank: int = 0):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.order = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        self.order.set_epoch(epoch)
        indices = list(self.order)
        seeds = np.random.default_rng((self.seed, epoch, self.rank)).integers(2**62, size=len(indices))
        return iter([(i, int(s)) for i, s in zip(indices, seeds)])


def _world() -> tuple[int, int]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("build_loaders(distributed=True) needs torch.distributed initialised first "
                           "(start with torchrun and call torch.distributed.init_process_group)")
    return torch.distributed.get_world_size(), torch.distributed.get_rank()


def build_loaders(data_dir: str | Path, *, batch_size: int, num_workers: int, patch_size: int | None = None,
                  val_per_type: int = 320, seed: int = 42, cache: bool = False, distributed: bool = False,
                  decode_check: bool = True) -> tuple[DataLoader, DataLoader | None]:
    """Find, check and split the pairs under ``data_dir``; return ``(train_loader, val_loader)``.

    All data problems are raised in one DataError before any loader exists: ``check_pairs`` reads every header, and
    decodes every file too when ``decode_check`` (skipped with ``cache``, whose up-front decode finds the same).
    The training loader draws ``batch_size`` samples per step (per process), drops the last incomplete batch and
    exposes its ``SeededSampler`` as ``loader.sampler``. The validation loader gives whole images, in batches of
    ``batch_size`` when all validation images share one size, else one at a time; it is None when
    ``val_per_type=0``. With ``distributed`` each process trains on its own shard and validates its own share
    (images ``rank, rank + world, ...``, each image exactly once, no padding): sum the per-kind results across
    processes. Workers are kept alive between epochs, and batches go to pinned memory when CUDA is present.
    """
    pairs = find_pairs(data_dir)
    check_pairs(pairs, decode=decode_check and not cache)
    train_pairs, val_pairs = stratified_split(pairs, val_per_type=val_per_type, seed=seed)
    world, rank = _world() if distributed else (1, 0)
    train_set = PairedDataset(train_pairs, train=True, patch_size=patch_size, cache=cache)
    sampler = SeededSampler(train_set, seed=seed, num_replicas=world, rank=rank)
    if len(sampler) < batch_size:
        raise DataError(f"{len(sampler)} training pairs per process is fewer than --batch_size {batch_size} ("
                        f"{len(pairs)} pairs found, {len(val_pairs)} kept for validation, {world} process(es)): "
                        "lower --batch_size, or --val_per_type (0 trains on every pair)")
    common = {"num_workers": num_workers, "pin_memory": torch.cuda.is_available(),
              "persistent_workers": num_workers > 0}
    # Workers draw nothing at random themselves (the sampler hands out seeds); this generator only keeps the
    # loader from consuming the global RNG when it seeds them.
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(seed), **common)
    if not val_pairs:
        return train_loader, None
    val_set = PairedDataset(val_pairs, train=False, cache=cache)
    val_batch = batch_size if len(set(val_set.sizes)) == 1 else 1
    # its own generator too: a loader without one draws its workers' base seed from the global RNG, which the
    # augmentation policy uses, so validating would change the training that follows (and differ with workers)
    val_loader = DataLoader(val_set, batch_size=val_batch, sampler=range(rank, len(val_set), world),
                            generator=torch.Generator().manual_seed(seed), **common)
    return train_loader, val_loader
