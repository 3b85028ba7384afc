"""Finding degraded/clean pairs on disk, checking them, the stratified split, datasets and loaders.

Layouts ``find_pairs`` understands (``root`` is what ``--data_dir`` names):

1. the homework release: ``root/train/degraded/<type>-<N>.<ext>`` paired with
   ``root/train/clean/<type>_clean-<N>.<ext>`` (``root/test/degraded`` holds the unpaired test images; read it
   with ``list_images``);
2. one paired set: ``root/degraded`` and ``root/clean`` with identical file names, or homework-style names (so
   ``--data_dir .../train`` works too);
3. a folder of such sets: ``root/<set>/degraded`` and ``root/<set>/clean`` (like ``../shared/data``), or the same
   under ``root/train/`` (Restormer's ``Datasets/train/Rain13K``).

The two halves of a set may carry the names public sets ship with instead of ``degraded``/``clean``: the table
``PAIRED_FOLDERS`` (``input``/``target`` of Rain13K, ``lq``/``gt`` of BasicSR, ``rain``/``norain``, ``synthetic``/``gt``
of Snow100K, ``Snow``/``Gt`` of CSD), used by every layout; ``train/`` may also be ``Train/`` (CSD).

The degradation type ("kind") of a pair is its set's folder name in layout 3; otherwise ``degradation_type``: the
``<type>`` prefix of a homework-style name, or the set folder's name when the file has none.

Hidden files (any name starting with ".", such as macOS's ``.DS_Store`` and ``._rain-1.png``) are skipped. A stem
that several files share (``rain-1.png`` beside ``rain-1.jpg``), a broken link, or a folder named like an image is
an error naming the files, never a silent choice.

Every image is read by ``read_image_uint8``: the EXIF orientation is applied (as image viewers do; the header check
``check_pairs`` reports the size as shown), grayscale and palette images become RGB, an alpha channel is dropped
(the stored colours are kept, not composited), and 16-bit samples keep their high byte (``to_8bit``: ``v >> 8``,
which is what Pillow itself does for 16-bit RGB PNGs), so the same file gives the same pixels everywhere.

The data need no network: the smallest whole image a network takes is given as ``min_size`` (``model.MIN_SIZE``).
"""
import copy
import logging
import math
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
from utils import UserError, WorkError, listing, same_path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
HOMEWORK_NAME = re.compile(r"^(?P<kind>.+)-(?P<number>[0-9]+)$")  # degraded stem "<type>-<N>"
MAX_LISTED_PROBLEMS = 50
VAL_FRACTION_CAP = 0.2
# (degraded, clean) folder names of a paired set, as public data sets ship them; names match exactly (case too).
PAIRED_FOLDERS = (("degraded", "clean"), ("input", "target"), ("lq", "gt"), ("LQ", "GT"), ("rain", "norain"),
                  ("synthetic", "gt"), ("Snow", "Gt"))
DEGRADED_FOLDERS = tuple(dict.fromkeys(degraded for degraded, _ in PAIRED_FOLDERS))
TRAIN_FOLDERS = ("train", "Train")
_HALF_NAMES = frozenset(name for pair in PAIRED_FOLDERS for name in pair)
_LAYOUTS = ("  - root/train/degraded + root/train/clean (homework: rain-1.png <-> rain_clean-1.png)\n"
            "  - root/degraded + root/clean (identical file names, or homework-style names)\n"
            "  - root/<set>/degraded + root/<set>/clean for several sets (kind = set name), also under root/train/\n"
            "  degraded/ + clean/ may be named " + ", ".join(f"{d}/ + {c}/" for d, c in PAIRED_FOLDERS))
# EXIF orientation -> what turns the stored (H, W, C) pixels into the image as shown (ImageOps.exif_transpose's table)
_ORIENTATIONS = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: np.rot90(a, -1),  # shown rotated 90 degrees clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transversed
    8: lambda a: np.rot90(a, 1),  # shown rotated 90 degrees counter-clockwise
}
_EXIF_ORIENTATION = 0x0112
_WORKER_ERROR = re.compile(r"^(?:[\w.]+\.)?Data(?:Changed)?Error: ", re.MULTILINE)


class DataError(UserError, ValueError):
    """A problem with the data on disk, found before any work (exit 2: what the user gave is wrong); the message
    names the files and what to do.

    Args:
        message (str): the problem and its fix.
    """

    def __init__(self, message: str = ""):
        # A DataLoader worker's exception is raised again in the main process as this type, built from the worker's
        # whole traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): keep only the
        # message, which is what a user needs.
        if message.startswith("Caught Data") and "Traceback" in message:
            found = list(_WORKER_ERROR.finditer(message))
            if found:
                message = message[found[-1].end():].rstrip("\n")
        super().__init__(message)


class DataChangedError(DataError, WorkError):
    """A file that vanished or changed after the data were checked, met while the work runs (exit 1: the work
    failed)."""

    exit_code = 1


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


def _access_problem(path: Path, err: OSError, action: str = "read") -> str:
    """What is wrong when ``path`` cannot be read or listed, and the fix."""
    if isinstance(err, PermissionError):
        return (f"{path} cannot be {action} (permission denied): give your user read access (chmod -R u+rX {path}), "
                "or copy the data somewhere you can read")
    return f"{path} cannot be {action} ({err.strerror or err}): check the disk or copy the data elsewhere"


def _entries(folder: Path) -> list[Path]:
    """The entries of ``folder``; a DataError naming it and the fix when it cannot be listed."""
    try:
        return list(folder.iterdir())
    except OSError as err:
        raise DataError(_access_problem(folder, err, "listed")) from err


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _entry_problem(path: Path) -> str | None:
    """None when ``path`` (an entry named like an image) is a file; otherwise what is wrong with it."""
    try:
        if path.is_file():
            return None
        if path.is_symlink() and not path.exists():
            return (f"{path} is a broken link: it points to {os.readlink(path)}, which does not exist (fix the link or "
                    "remove it)")
        if path.is_dir():
            return f"{path} is a folder, not an image file (rename it or move it out of {path.parent})"
        return f"{path} is not a regular file (remove it or replace it with the image)"
    except OSError as err:  # a folder that can be listed but not searched (read without execute permission)
        return _access_problem(path, err)


def list_images(folder: str | Path) -> list[Path]:
    """The image files in ``folder``, natural-sorted, hidden files skipped.

    Raises:
        DataError: the folder is missing, cannot be listed or holds no images; a broken link or a folder carries an
            image's name (all named at once).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder" + ("" if folder.exists() else " (it does not exist)"))
    images, problems = [], []
    for path in _entries(folder):
        if _hidden(path) or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        problem = _entry_problem(path)
        if problem is None:
            images.append(path)
        else:
            problems.append(problem)
    _raise_problems(problems, f"the files of {folder}")
    if not images:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(images, key=lambda p: natural_key(p.name))


def _by_stem(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The images of ``folder`` by file stem, and a problem for every stem that several files share."""
    groups = defaultdict(list)
    for path in list_images(folder):
        groups[path.stem].append(path)
    problems = [f"{folder}: {' and '.join(p.name for p in paths)} share one name, so which is meant is unclear "
                "(keep one, move the others out of the folder)" for paths in groups.values() if len(paths) > 1]
    return {stem: paths[0] for stem, paths in groups.items()}, problems


def images_by_stem(folder: str | Path) -> dict[str, Path]:
    """``{file stem: image}`` of the images in ``folder`` (as ``list_images`` finds them): the rule ``find_pairs``
    reads each half of a set by, for ``scoring.find_clean``'s folder of clean images.

    Raises:
        DataError: as ``list_images``, or naming every stem that several files share (``rain-1.png`` beside
            ``rain-1.jpg``): pairing by name could not tell which one is meant.
    """
    by_stem, problems = _by_stem(Path(folder))
    _raise_problems(problems, f"the file names of {folder}")
    return by_stem


def _halves(folder: Path) -> tuple[str, str] | None:
    """The (degraded, clean) folder names of ``folder`` when it is a paired set (``PAIRED_FOLDERS``), else None."""
    present = _present_halves(folder)
    found = [(d, c) for d, c in PAIRED_FOLDERS if d in present and c in present]
    if len(found) > 1:
        raise DataError(f"{folder} holds several pairs of degraded/clean folders ("
                        f"{', '.join(f'{d}/ + {c}/' for d, c in found)}): keep one pair in it (move the others into "
                        "a set folder of their own)")
    return found[0] if found else None


def _present_halves(folder: Path) -> set[str]:
    """The names of ``PAIRED_FOLDERS`` that ``folder`` holds as folders (compared exactly, as listed)."""
    if not folder.is_dir():
        return set()
    return {p.name for p in _entries(folder) if p.name in _HALF_NAMES and p.is_dir()}


def _one_sided(folder: Path) -> str | None:
    """What is wrong with a folder that holds one half of a set but not the other, or None."""
    present = _present_halves(folder)
    if not present or _halves(folder):
        return None
    clauses = []
    for name in sorted(present):
        partners = list(dict.fromkeys(c if d == name else d for d, c in PAIRED_FOLDERS if name in (d, c)))
        clauses.append(f"it has {name}/ but no {' or '.join(p + '/' for p in partners)} beside it")
    return "; ".join(clauses)


def clean_partner_stem(stem: str, clean_stems: Container[str]) -> str:
    """The file stem of the clean partner of the degraded image ``stem``: ``<type>_clean-<N>`` for a homework name
    ``<type>-<N>``, unless only a clean file of the identical stem exists; the identical stem for other names."""
    match = HOMEWORK_NAME.match(stem)
    if not match:
        return stem
    homework_stem = f"{match['kind']}_clean-{match['number']}"
    return stem if stem in clean_stems and homework_stem not in clean_stems else homework_stem


def degradation_type(degraded: str | Path) -> str:
    """The degradation type of a degraded image: the one rule for training logs, validation and scoring.

    The ``<type>`` prefix of a homework-style name ``<type>-<N>`` (``rain-12.png`` -> ``rain``), whatever its clean
    partner is called; otherwise the name of the set it belongs to: the folder above its degraded folder (any
    degraded name of ``PAIRED_FOLDERS``: ``rain100h/degraded/1.png`` and ``Rain13K/input/1.jpg`` -> ``rain100h`` and
    ``Rain13K``), or its own folder when that has another name.
    """
    degraded = Path(degraded)
    match = HOMEWORK_NAME.match(degraded.stem)
    if match:
        return match["kind"]
    folder = degraded.absolute().parent
    return folder.parent.name if folder.name in DEGRADED_FOLDERS else folder.name


def _set_pairs(folder: Path, halves: tuple[str, str], *, set_kind: str | None = None, prefix: str = "") -> list[Pair]:
    """Pairs of one set; ``set_kind`` overrides the kind taken from names (folder-of-sets layout)."""
    degraded_folder, clean_folder = folder / halves[0], folder / halves[1]
    _check_halves_apart(degraded_folder, clean_folder)
    degraded_by_stem, problems = _by_stem(degraded_folder)
    clean_by_stem, clean_problems = _by_stem(clean_folder)
    _raise_problems(problems + clean_problems, f"the file names of {folder}")
    pairs = []
    for degraded in sorted(degraded_by_stem.values(), key=lambda p: natural_key(p.name)):
        stem = clean_partner_stem(degraded.stem, clean_by_stem)
        clean = clean_by_stem.get(stem, clean_folder / (stem + degraded.suffix))
        kind = set_kind or degradation_type(degraded)
        pairs.append(Pair(degraded, clean, kind, prefix + degraded.name))
    same = [p.name for p in pairs if same_path(p.degraded, p.clean)]
    if same:
        raise DataError(f"{len(same)} degraded image(s) in {degraded_folder} are the same file as their clean partner "
                        f"in {clean_folder} (links?): {listing(same, limit=5)}; every image would be trained "
                        "against itself. Give the clean images themselves")
    used = {p.clean for p in pairs}
    unused = [p.name for p in sorted(clean_by_stem.values(), key=lambda p: natural_key(p.name)) if p not in used]
    if unused:
        log.warning("%d clean image(s) in %s have no degraded partner and are ignored: %s", len(unused), clean_folder,
                    listing(unused, limit=10))
    return pairs


def _check_halves_apart(degraded_folder: Path, clean_folder: Path) -> None:
    """Refuse a set whose clean folder is its degraded folder (a link to it): every image would be its own target."""
    if same_path(degraded_folder, clean_folder):
        raise DataError(f"{clean_folder} and {degraded_folder} are the same folder (a link?): every image would be "
                        "trained or scored against itself. Put the clean images in a folder of their own")


def _folder_of_sets(root: Path) -> list[Pair]:
    """The pairs of every set folder in ``root`` (layout 3); empty when it holds none."""
    folders = sorted((d for d in _entries(root) if not _hidden(d) and d.is_dir()), key=lambda d: natural_key(d.name))
    sets = [(d, halves) for d in folders if (halves := _halves(d))]
    if sets:
        for d in folders:
            problem = _one_sided(d)
            if problem:
                log.warning("skipping %s: %s (a set needs both folders of one of: %s)", d, problem,
                            ", ".join(f"{a}/ + {b}/" for a, b in PAIRED_FOLDERS))
    return [pair for d, halves in sets for pair in _set_pairs(d, halves, set_kind=d.name, prefix=f"{d.name}/")]


def find_pairs(root: str | Path) -> list[Pair]:
    """All (degraded, clean) pairs under ``root`` in one of the layouts of the module docstring.

    Pairs whose clean partner is missing are returned with the expected path; ``check_pairs`` reports them.

    Raises:
        DataError: no layout fits (the message lists what ``root`` holds and the layouts and folder names accepted),
            a folder cannot be listed, or file names are ambiguous or broken (see ``list_images``).
    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"data folder {root} {what}; expected one of these layouts:\n{_LAYOUTS}")
    for train in TRAIN_FOLDERS:
        halves = _halves(root / train)
        if halves:
            return _set_pairs(root / train, halves)
    halves = _halves(root)
    if halves:
        return _set_pairs(root, halves)
    pairs = _folder_of_sets(root)
    for train in TRAIN_FOLDERS:
        if not pairs and (root / train).is_dir():
            pairs = _folder_of_sets(root / train)
    if not pairs:
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in _entries(root) if not _hidden(p))
        shown = listing(found, limit=10) if found else "nothing"
        hint = _one_sided(root)
        raise DataError(f"no degraded/clean pairs found in {root} (it holds {shown}{'; ' + hint if hint else ''}); "
                        f"expected one of these layouts:\n{_LAYOUTS}")
    return pairs


def _too_large(path: str | Path, detail: str) -> str:
    return (f"{path} is too large to decode safely ({detail}; Pillow refuses such files as possible decompression "
            "bombs): downscale it or remove it")


_SAID_FIRST_FRAME: set[str] = set()


def _say_first_frame(path: str | Path, img: Image.Image) -> None:
    """Say once per file that only the first frame of a multi-page or animated image (TIFF, WebP, GIF) is used."""
    if getattr(img, "is_animated", False) and str(path) not in _SAID_FIRST_FRAME:
        _SAID_FIRST_FRAME.add(str(path))
        log.warning("%s holds %d frames (a multi-page or animated image): only the first is used", path,
                    getattr(img, "n_frames", 2))


def _open(path: str | Path, fn: Callable):
    """``fn(image)`` on the opened file; every failure (Pillow raises many types) becomes a DataError naming the file
    and the fix."""
    try:
        with Image.open(path) as img:
            if img.mode == "F":
                raise DataError(f"{path}: floating-point images are not supported; save it as 8- or 16-bit")
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise DataError(_too_large(path, f"{img.width}x{img.height} (WxH), {img.width * img.height:,} "
                                                 f"pixels, more than {limit:,}"))
            _say_first_frame(path, img)
            return fn(img)
    except DataError:
        raise
    except Image.DecompressionBombError as err:
        raise DataError(_too_large(path, str(err))) from err
    except FileNotFoundError as err:
        raise DataError(f"{path} does not exist (deleted, moved or renamed after the data were found?): put it back, "
                        "or start again so that the data are found anew") from err
    except IsADirectoryError as err:
        raise DataError(f"{path} is a folder, not an image file: rename it or move it away") from err
    except PermissionError as err:
        raise DataError(_access_problem(Path(path), err)) from err
    except Exception as err:
        try:
            empty = os.path.getsize(path) == 0
        except OSError:
            empty = False
        if empty:
            raise DataError(f"{path} is empty (0 bytes; an interrupted copy or download?): copy it again or remove "
                            "it") from err
        raise DataError(f"{path}: cannot be read as an image ({type(err).__name__}: {err}); copy it again, re-save "
                        "it, or remove it") from err


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (2 to 8) the file's header stores, or 1 (shown as stored): none, an invalid one, a
    malformed EXIF block (viewers show such files as stored), or a TIFF (Pillow's reader applies it itself)."""
    if img.format == "TIFF":
        return 1
    try:
        # The base method reads what the header holds; PngImageFile's own would decode the whole file first.
        value = Image.Image.getexif(img).get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - any EXIF parsing failure means "no usable orientation"
        return 1
    return value if value in _ORIENTATIONS else 1


def to_8bit(samples: np.ndarray) -> np.ndarray:
    """The one rule from 16-bit samples (0..65535) to 8 bits: the high byte (``v >> 8``), which is what Pillow
    itself does for 16-bit RGB files, so 16-bit gray and colour files of one picture read alike."""
    return (np.asarray(samples).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit grayscale
        return np.repeat(to_8bit(img)[..., None], 3, axis=-1)
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def _shown_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 pixels as the image is shown: the EXIF orientation applied."""
    orient = _ORIENTATIONS.get(_orientation(img))  # before decoding, as _image_size reads it
    pixels = _to_rgb_array(img)
    return pixels if orient is None else orient(pixels)


def read_image_uint8(path: str | Path) -> Tensor:
    """Decode an image file to a uint8 RGB tensor (3, H, W) as it is shown (EXIF orientation applied); DataError
    naming the file and the fix when it cannot be read."""
    return torch.from_numpy(np.ascontiguousarray(_open(path, _shown_rgb).transpose(2, 0, 1)))  # one copy


def read_image(path: str | Path) -> Tensor:
    """Read an image as a float RGB tensor (3, H, W) in [0, 1] (see the module docstring for the conversions)."""
    return read_image_uint8(path).float().div_(255)


def _image_size(path: Path, decode: bool) -> tuple[int, int]:
    """(H, W) as shown (EXIF orientation applied) from the header; with ``decode`` the whole file is decoded, which
    finds truncated data."""
    def size(img: Image.Image) -> tuple[int, int]:
        swapped = _orientation(img) >= 5  # orientations 5 to 8 swap height and width
        if decode:
            img.load()
        return (img.width, img.height) if swapped else (img.height, img.width)
    return _open(path, size)


def threaded(fn: Callable, items: Sequence) -> list:
    """``[fn(item) for item in items]`` on a few threads (Pillow decodes without the GIL); a DataError is returned in
    its item's place."""
    def safe(item):
        try:
            return fn(item)
        except DataError as err:
            return err
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(safe, items))


def _raise_problems(problems: list[str], what: str) -> None:
    if problems:
        listed = listing(problems, limit=MAX_LISTED_PROBLEMS, sep="\n", prefix="  - ")
        raise DataError(f"{len(problems)} problem(s) with {what}; fix them and start again:\n{listed}")


def _missing_partner(pair: Pair, others: dict[Path, dict[str, list[str]]]) -> str:
    """The problem of a pair whose clean partner is missing, naming files of that name that are not images."""
    if pair.clean is None:
        return f"{pair.degraded} has no clean partner"
    folder = pair.clean.parent
    if folder not in others:
        names = defaultdict(list)
        for path in (_entries(folder) if folder.is_dir() else []):
            if not _hidden(path):
                names[path.stem].append(path.name)
        others[folder] = names
    text = f"{pair.degraded} has no clean partner (expected {pair.clean})"
    unsupported = others[folder].get(pair.clean.stem)
    if unsupported:
        text += (f"; {folder} holds {', '.join(unsupported)}, which is not a supported image type "
                 f"({', '.join(IMAGE_EXTENSIONS)})")
    return text


def check_pairs(pairs: Sequence[Pair], *, decode: bool = True) -> list[tuple[int, int]]:
    """Check every pair before any training starts and return the (H, W) of each, as shown (EXIF orientation
    applied).

    Finds clean partners that are missing, unreadable files, pairs of different sizes and, with ``decode`` (slower:
    it decodes every file), truncated or corrupt image data. All problems are raised together in one DataError.

    Args:
        pairs (Sequence[Pair]): pairs from ``find_pairs``.
        decode (bool): decode every image fully instead of reading only headers. Default: True.
    """
    if not pairs:
        raise DataError("no image pairs to check")
    files = list(dict.fromkeys(path for p in pairs for path in (p.degraded, p.clean)
                               if path is not None and (path == p.degraded or path.is_file())))
    size_of = dict(zip(files, threaded(lambda path: _image_size(path, decode), files)))
    problems, listed = [], {}
    for pair in pairs:
        lq_size, gt_size = size_of[pair.degraded], size_of.get(pair.clean)
        if gt_size is None:
            problems.append(_missing_partner(pair, listed))
        problems += [str(r) for r in (lq_size, gt_size) if isinstance(r, DataError)]
        if isinstance(lq_size, tuple) and isinstance(gt_size, tuple) and lq_size != gt_size:
            problems.append(f"sizes differ: {pair.degraded} is {lq_size[1]}x{lq_size[0]} (WxH) but {pair.clean} is "
                            f"{gt_size[1]}x{gt_size[0]}")
    _raise_problems(list(dict.fromkeys(problems)), "the data set")
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


def _check_patch_size(patch_size: int | None) -> None:
    if patch_size is not None and patch_size < 1:
        raise ValueError(f"patch_size must be a positive number of pixels or None, got {patch_size}")


def _small_images(pairs: Sequence[Pair], sizes: Sequence[tuple[int, int]], *, train: bool,
                  patch_size: int | None, min_size: int) -> list[str]:
    """A problem for every image too small to use: training crops need ``patch_size``, whole images (validation, or
    training without crops) the network's smallest input, ``min_size``."""
    if train and patch_size is not None:
        need, reason = patch_size, f"smaller than --patch_size {patch_size} (use a smaller patch or remove it)"
    else:
        need, reason = min_size, (f"smaller than {min_size}x{min_size}, the network's smallest input (remove or "
                                  "enlarge it)")
    role = "training" if train else "validation"
    return [f"{p.degraded} is {w}x{h} (WxH): {role} image {reason}" for p, (h, w) in zip(pairs, sizes)
            if min(h, w) < need]


class PairedDataset(Dataset):
    """Pairs as dicts ``{"lq", "gt", "kind", "name"}`` with float (3, H, W) images in [0, 1].

    For training (``train=True``) each item is a random ``patch_size`` crop at the same place in both images, then
    one random dihedral view of both; whole images when ``patch_size`` is None, which needs all images to share one
    size. A crop is square, so all 8 views are used; whole non-square images use only the 4 views that keep their
    shape, so that they still batch. An image smaller than the patch is an error (no padding: a model should not
    learn from invented borders), and so is a whole image smaller than ``min_size``. The randomness of
    an item comes from a seed the sampler gives with its index (``dataset[(index, seed)]``, see ``SeededSampler``); a
    plain integer index draws a seed from torch's generator. For validation (``train=False``) items are whole images,
    unchanged. A file that is deleted or replaced (another size) after the dataset was made raises a DataChangedError
    naming it when it is read, also from a DataLoader worker.

    Args:
        pairs (Sequence[Pair]): pairs with their clean partners (checked with ``check_pairs``).
        train (bool): random crops and views when True, whole unchanged images when False. Default: True.
        patch_size (int | None): side of the square training crops; None for whole images. Default: None.
        cache (bool): decode every image once, up front, and keep it in memory as uint8 (3 bytes per pixel per
            image, about 1.3 GB for 3,200 pairs of 256x256). Default: False.
        min_size (int): the smallest side of a whole image the network takes (``model.MIN_SIZE``). Default: 1.
        sizes (Sequence[tuple[int, int]] | None): the (H, W) of each pair as ``check_pairs`` returned them, so that
            no header is read again; None reads them. Default: None.
    """

    def __init__(self, pairs: Sequence[Pair], *, train: bool = True, patch_size: int | None = None,
                 cache: bool = False, min_size: int = 1, sizes: Sequence[tuple[int, int]] | None = None):
        _check_patch_size(patch_size)
        self.pairs, self.train, self.patch_size, self.min_size = list(pairs), train, patch_size, min_size
        self.cache = None
        if cache:
            results = threaded(read_image_uint8, [path for p in self.pairs for path in (p.degraded, p.clean)])
            _raise_problems([str(r) for r in results if isinstance(r, DataError)], "the images to cache")
            self.cache = list(zip(results[0::2], results[1::2]))
            self.sizes = [tuple(lq.shape[-2:]) for lq, _ in self.cache]
        else:
            self.sizes = list(sizes) if sizes is not None else [_image_size(p.degraded, decode=False)
                                                                 for p in self.pairs]
        self._check_sizes()

    def with_patch_size(self, patch_size: int | None) -> "PairedDataset":
        """A copy of this dataset that crops ``patch_size`` (None: whole images), sharing its pairs, sizes and cache
        (nothing is read again); the sizes are checked as on construction.

        Args:
            patch_size (int | None): side of the square training crops; None for whole images.
        """
        _check_patch_size(patch_size)
        other = copy.copy(self)
        other.patch_size = patch_size
        other._check_sizes()
        return other

    def _check_sizes(self) -> None:
        _raise_problems(_small_images(self.pairs, self.sizes, train=self.train, patch_size=self.patch_size,
                                      min_size=self.min_size), "the image sizes")
        if self.train and self.patch_size is None:
            distinct = sorted(set(self.sizes))
            if len(distinct) > 1:
                shown = listing([f"{w}x{h}" for h, w in distinct], limit=5)
                raise DataError(f"training images come in {len(distinct)} sizes (WxH {shown}): whole images cannot "
                                "be batched; pass --patch_size to train on random crops")

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        if self.cache is not None:
            return self.cache[index]
        pair = self.pairs[index]
        try:
            lq, gt = read_image_uint8(pair.degraded), read_image_uint8(pair.clean)
        except DataError as err:  # every file was read when the data were checked
            raise DataChangedError(str(err)) from None
        (h, w) = self.sizes[index]
        for path, image in ((pair.degraded, lq), (pair.clean, gt)):
            if tuple(image.shape[-2:]) != (h, w):
                raise DataChangedError(f"{path} is now {image.shape[-1]}x{image.shape[-2]} (WxH), but {pair.degraded} "
                                       f"was {w}x{h} when the data were checked: a file was replaced since; put the "
                                       "original back (then continue the run with --resume), or start again")
        return lq, gt

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


def _loader_options(num_workers: int) -> dict:
    return {"num_workers": num_workers, "pin_memory": torch.cuda.is_available(), "persistent_workers": num_workers > 0}


def close_workers(*loaders: DataLoader | None) -> None:
    """End the loaders' persistent worker processes now; a loader iterated again starts new ones. Left to the garbage
    collector, a loader inside a reference cycle (a trainer holds its loaders) can lose its queues before its workers
    hear the end, and then waits 5 s per worker before killing it."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def make_train_loader(dataset: Dataset, *, batch_size: int, num_workers: int, seed: int, world: int = 1,
                      rank: int = 0) -> DataLoader:
    """The training loader of ``dataset``: ``batch_size`` samples per step (per process) drawn by a ``SeededSampler``
    (exposed as ``loader.sampler``), the last incomplete batch dropped, workers kept alive between epochs, batches in
    pinned memory when CUDA is present. Its batches depend only on the dataset, ``seed``, the epoch and the rank.

    Args:
        dataset (Dataset): a training ``PairedDataset`` (or any dataset taking ``(index, seed)`` items).
        batch_size (int): samples per step and process.
        num_workers (int): loader worker processes (0: load in the main process).
        seed (int): base seed of the order, the crops and the views, >= 0.
        world (int): number of processes sharing the data. Default: 1.
        rank (int): this process's rank. Default: 0.

    Raises:
        DataError: this process's share of the data holds fewer samples than one batch.
    """
    sampler = SeededSampler(dataset, seed=seed, num_replicas=world, rank=rank)
    if len(sampler) < batch_size:
        raise DataError(f"{len(sampler)} training pairs per process is fewer than --batch_size {batch_size} "
                        f"({len(dataset)} training pairs, {world} process(es)): lower --batch_size")
    # Workers draw nothing at random themselves (the sampler hands out seeds); this generator only keeps the
    # loader from consuming the global RNG when it seeds them.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      generator=torch.Generator().manual_seed(seed), **_loader_options(num_workers))


def build_loaders(data_dir: str | Path, *, batch_size: int, num_workers: int, patch_size: int | None = None,
                  val_per_type: int = 320, seed: int = 42, cache: bool = False, distributed: bool = False,
                  decode_check: bool = True, min_size: int = 1) -> tuple[DataLoader, DataLoader | None]:
    """Find, check and split the pairs under ``data_dir``; return ``(train_loader, val_loader)``.

    All data problems are raised in one DataError before any loader exists: ``check_pairs`` reads every header, and
    decodes every file too when ``decode_check`` (skipped with ``cache``, whose up-front decode finds the same);
    training images smaller than ``patch_size`` and validation images smaller than the network's smallest input
    (``min_size``: pass ``model.MIN_SIZE``) are named together. The training loader is ``make_train_loader``'s.
    The validation loader gives whole images, in batches of ``batch_size`` when all validation images share one
    size, else one at a time; it is None when
    ``val_per_type=0``. With ``distributed`` each process trains on its own shard and validates its own share
    (images ``rank, rank + world, ...``, each image exactly once, no padding): sum the per-kind results across
    processes. Workers are kept alive between epochs, and batches go to pinned memory when CUDA is present.
    """
    pairs = find_pairs(data_dir)
    size_of = dict(zip(pairs, check_pairs(pairs, decode=decode_check and not cache)))
    train_pairs, val_pairs = stratified_split(pairs, val_per_type=val_per_type, seed=seed)
    small = _small_images(train_pairs, [size_of[p] for p in train_pairs], train=True, patch_size=patch_size,
                          min_size=min_size)
    small += _small_images(val_pairs, [size_of[p] for p in val_pairs], train=False, patch_size=None,
                           min_size=min_size)
    _raise_problems(small, "the image sizes")
    world, rank = _world() if distributed else (1, 0)
    per_process = math.ceil(len(train_pairs) / world)  # what the sampler gives each process
    if per_process < batch_size:
        raise DataError(f"{per_process} training pairs per process is fewer than --batch_size {batch_size} ("
                        f"{len(pairs)} pairs found, {len(val_pairs)} kept for validation, {world} process(es)): "
                        "lower --batch_size, or --val_per_type (0 trains on every pair)")
    train_set = PairedDataset(train_pairs, train=True, patch_size=patch_size, cache=cache, min_size=min_size,
                              sizes=[size_of[p] for p in train_pairs])
    train_loader = make_train_loader(train_set, batch_size=batch_size, num_workers=num_workers, seed=seed,
                                     world=world, rank=rank)
    if not val_pairs:
        return train_loader, None
    val_set = PairedDataset(val_pairs, train=False, cache=cache, min_size=min_size,
                            sizes=[size_of[p] for p in val_pairs])
    val_batch = batch_size if len(set(val_set.sizes)) == 1 else 1
    # its own generator too: a loader without one draws its workers' base seed from the global RNG, which the
    # augmentation policy uses, so validating would change the training that follows (and differ with workers)
    val_loader = DataLoader(val_set, batch_size=val_batch, sampler=range(rank, len(val_set), world),
                            generator=torch.Generator().manual_seed(seed), **_loader_options(num_workers))
    return train_loader, val_loader
