"""Synthetic rain and snow: render them onto clean photographs and write a dataset in the homework layout.

Run as a script to write a small dataset for the demo or the tests::

    python synthetic.py --out datasets_synth --train_per_type 32 --test_per_type 8 --size 64 --seed 0
    python synthetic.py --out my_synth --clean_dir ~/Pictures --size 256 --train_per_type 200 --overwrite

The layout is the homework's (``train/degraded/rain-1.png`` beside ``train/clean/rain_clean-1.png``; ``test/degraded``
holds ``0.png``, ``1.png``, ... with rain and snow shuffled together), plus ``test/clean`` with the same names so
results can be scored, and ``synthetic.json`` recording the settings and which test image is which type. That file
also marks the folder as this script's: ``--overwrite`` replaces only such a folder, never other files.

Clean images are square crops, at random positions, scales (1x to 4x zoom-out) and horizontal flips, of photographs:
by default the two sample photographs matplotlib installs (``grace_hopper.jpg``, ``Minduka_Present_Blue_Pack.png``),
or every PNG/JPEG under ``--clean_dir`` (hidden files skipped). Nothing is downloaded. Train and test crops never
share a pixel: the left third of every photograph feeds the test set and the rest the training set.

Everything is deterministic: each image draws from its own ``numpy.random.Generator`` seeded with
``(seed, split, type, number)``, so one image does not depend on how many others are rendered.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from dataloader import to_8bit
from run import terminate_as_interrupt
from utils import ConfigError, positive_int, run_cli, setup_logging, to_uint8

KINDS = ("rain", "snow")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MARKER = "synthetic.json"  # written last into every dataset; marks a folder this script may replace
MIN_IMAGE_SIZE = 16
DEFAULT_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
TEST_FRACTION = 1 / 3  # the left third of every photograph is kept for the test set
MAX_ZOOM_OUT = 4.0  # a crop spans between 1 and 4 output sizes of the photograph
REFERENCE_SIZE = 128  # the styles' sizes and densities are given for a 128-pixel image and scale with the image
MIN_SIGMA = 0.35  # thinnest Gaussian profile in pixels, so that thin streaks and flakes stay anti-aliased


# ------------------------------------------------------------------------------------------------------------ styles
@dataclass(frozen=True)
class RainStyle:
    """Ranges the rain renderer draws from. Each ``(low, high)`` pair is sampled uniformly; pass ``(v, v)`` to fix it.

    Rain is rendered as 1-3 layers of anti-aliased streaks, screen-blended onto the photograph (bright,
    semi-transparent, stronger on dark backgrounds), after an optional veil. Density and blur are given for a
    128-pixel image and scale with it, so a larger image holds more streaks of the same thin width.

    Args:
        angle: Fall direction of the image in degrees from vertical (positive leans right).
        angle_jitter: Each layer deviates from the image's angle by up to this many degrees.
        layers: Fewest and most streak layers (inclusive).
        density: Streaks per pixel of a layer at 128 pixels (times 128 / size at other sizes).
        length: Streak length as a fraction of the shorter image side.
        width: Streak thickness (Gaussian sigma across it) in pixels of the image, whatever its size.
        blur: Motion blur in pixels: the length of the soft fade at both ends of a streak.
        opacity: Peak opacity of a layer.
        brightness: Per-streak factor on the layer's opacity.
        veil_prob: Probability of a veil (rain haze) behind the streaks.
        veil: Veil strength, the weight of the veil colour.
        veil_colour: Grey level of the veil.
    """

    angle: tuple[float, float] = (-25.0, 25.0)
    angle_jitter: float = 4.0
    layers: tuple[int, int] = (1, 3)
    density: tuple[float, float] = (0.001, 0.004)
    length: tuple[float, float] = (0.08, 0.3)
    width: tuple[float, float] = (0.4, 0.9)
    blur: tuple[float, float] = (0.5, 2.5)
    opacity: tuple[float, float] = (0.2, 0.45)
    brightness: tuple[float, float] = (0.5, 1.0)
    veil_prob: float = 0.5
    veil: tuple[float, float] = (0.01, 0.05)
    veil_colour: tuple[float, float] = (0.7, 0.9)


@dataclass(frozen=True)
class FlakeLayer:
    """One layer of snowflakes of similar size (pixel sizes for a 128-pixel image).

    Args:
        radius: Flake radius in pixels (sigma of its soft Gaussian disc).
        density: Flakes per pixel at 128 pixels (times (128 / size)^2 at other sizes).
        opacity: Per-flake peak opacity before motion blur spreads it.
        motion: Length of the motion blur in pixels, along the fall direction.
    """

    radius: tuple[float, float]
    density: tuple[float, float]
    opacity: tuple[float, float]
    motion: tuple[float, float]


@dataclass(frozen=True)
class SnowStyle:
    """Ranges the snow renderer draws from, following the Snow100K model ``y = x (1 - z) + z c``.

    ``z`` is the union of the flake layers' opacity masks, ``c`` the snow colour; a light veil of the same colour is
    laid over the photograph first. Pixel sizes are for a 128-pixel image and scale with it.

    Args:
        angle: Fall direction of the image in degrees from vertical (60 to 120 degrees from horizontal by default).
        angle_jitter: Each layer deviates from the image's angle by up to this many degrees.
        layers: Flake layers, small to large; every image gets all of them.
        colour: Grey level of the snow and the veil.
        veil: Veil strength, the weight of the snow colour over the photograph.
    """

    angle: tuple[float, float] = (-30.0, 30.0)
    angle_jitter: float = 5.0
    layers: tuple[FlakeLayer, ...] = (
        FlakeLayer(radius=(0.35, 0.6), density=(0.003, 0.009), opacity=(0.6, 1.0), motion=(0.0, 3.0)),
        FlakeLayer(radius=(0.7, 1.2), density=(0.001, 0.003), opacity=(0.7, 1.0), motion=(1.0, 5.0)),
        FlakeLayer(radius=(1.5, 3.0), density=(0.0004, 0.0012), opacity=(0.35, 0.75), motion=(2.0, 8.0)),
    )
    colour: tuple[float, float] = (0.88, 1.0)
    veil: tuple[float, float] = (0.015, 0.06)


def _style(cls, opts: dict):
    """The default ``cls`` style with ``opts`` replacing fields, or a ``TypeError`` naming the valid fields."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(opts) - names)
    if unknown:
        raise TypeError(f"synthetic.py: unknown {cls.__name__} option(s) {unknown}; valid: {sorted(names)}")
    return replace(cls(), **opts)


# ------------------------------------------------------------------------------------------------------- rendering
def _as_float(clean_uint8_hwc: np.ndarray) -> np.ndarray:
    """Check that the input is a uint8 RGB image (H, W, 3) and return it as float64 in [0, 1]."""
    arr = np.asarray(clean_uint8_hwc)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"synthetic.py: expected a uint8 RGB image of shape (H, W, 3), got {arr.dtype} "
                         f"{arr.shape}; convert with np.asarray(Image.open(path).convert('RGB'))")
    return arr.astype(np.float64) / 255.0


def _finish(image: np.ndarray) -> np.ndarray:
    """Float (H, W, 3) in [0, 1] to uint8 through the project's one conversion (clamp, x255, round)."""
    return to_uint8(torch.from_numpy(image)).numpy()


def _direction(angle_deg: float) -> tuple[float, float]:
    """Unit vector (dx, dy) of a fall direction given in degrees from vertical; image y points down."""
    t = math.radians(angle_deg)
    return math.sin(t), math.cos(t)


def _streak_kernel(length: float, sigma: float, blur: float, angle_deg: float) -> np.ndarray:
    """A rain streak with peak 1: a line of ``length`` pixels, Gaussian across (``sigma``), fading over ``blur`` at
    both ends, and slightly brighter in its middle."""
    half = length / 2
    r = math.ceil(half + 3 * max(sigma, blur))
    y, x = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    dx, dy = _direction(angle_deg)
    along, across = x * dx + y * dy, x * dy - y * dx
    outside = np.clip(np.abs(along) - half, 0, None)
    kernel = np.exp(-0.5 * (across / sigma) ** 2 - 0.5 * (outside / max(blur, MIN_SIGMA)) ** 2)
    kernel *= 1 - 0.4 * np.clip(np.abs(along) / (half + blur), 0, 1) ** 2
    return kernel / kernel.max()


def _flake_kernel(radius: float, motion: float, angle_deg: float) -> np.ndarray:
    """A soft flake (Gaussian of sigma ``radius``) averaged along ``motion`` pixels of the fall direction.

    Its integral is that of the unblurred flake (2 pi radius^2 with peak 1), so a sub-pixel or fast flake is faint.
    """
    sigma = max(radius, MIN_SIGMA)
    r = math.ceil(motion / 2 + 3 * sigma + 1)
    y, x = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    dx, dy = _direction(angle_deg)
    steps = np.linspace(-motion / 2, motion / 2, max(1, math.ceil(2 * motion) + 1))
    kernel = sum(np.exp(-0.5 * ((x - s * dx) ** 2 + (y - s * dy) ** 2) / sigma**2) for s in steps)
    return kernel * (2 * math.pi * radius**2 / kernel.sum())


def _scatter(rng: np.random.Generator, shape: tuple[int, int], kernel: np.ndarray, density: float,
             values: tuple[float, float]) -> np.ndarray:
    """A layer of copies of ``kernel`` at Poisson-random positions, each scaled by a value drawn from ``values``.

    Positions cover the image plus a kernel-sized margin, so streaks and flakes also enter from outside the frame; the
    copies are summed by an FFT convolution in float64 (deterministic) and clipped to [0, 1].
    """
    (h, w), (kh, kw) = shape, kernel.shape
    ch, cw = h + kh - 1, w + kw - 1
    count = rng.poisson(density * ch * cw)
    seeds = np.zeros((ch, cw))
    np.add.at(seeds, (rng.integers(0, ch, count), rng.integers(0, cw, count)), rng.uniform(*values, count))
    layer = np.fft.irfft2(np.fft.rfft2(seeds) * np.fft.rfft2(kernel, s=(ch, cw)), s=(ch, cw))
    return np.clip(layer[kh - 1:, kw - 1:], 0, 1)


def _veil(image: np.ndarray, amount: float, colour: float) -> np.ndarray:
    """Blend the whole image towards a grey ``colour`` with weight ``amount`` (haze)."""
    return image * (1 - amount) + amount * colour


def _start(style_cls, opts: dict, clean_uint8_hwc: np.ndarray):
    """What both renderers begin with: the style with ``opts`` applied, the clean image as float, its (H, W), and
    its size relative to ``REFERENCE_SIZE`` (lengths and densities are given for that size)."""
    image = _as_float(clean_uint8_hwc)
    return _style(style_cls, opts), image, image.shape[:2], min(image.shape[:2]) / REFERENCE_SIZE


def render_rain(clean_uint8_hwc: np.ndarray, rng: np.random.Generator, **opts) -> np.ndarray:
    """Render rain streaks onto a clean photograph.

    Args:
        clean_uint8_hwc (ndarray): Clean RGB image, uint8, shape (H, W, 3).
        rng (numpy.random.Generator): Source of every random choice; the same state gives the same image.
        **opts: Fields of :class:`RainStyle` to override, e.g. ``veil_prob=0`` or ``angle=(10, 10)``.

    Returns:
        ndarray: The rainy image, uint8, shape (H, W, 3).
    """
    style, image, (h, w), scale = _start(RainStyle, opts, clean_uint8_hwc)
    if rng.random() < style.veil_prob:
        image = _veil(image, rng.uniform(*style.veil), rng.uniform(*style.veil_colour))
    base_angle = rng.uniform(*style.angle)
    rain = np.zeros((h, w))
    for _ in range(rng.integers(style.layers[0], style.layers[1] + 1)):
        kernel = _streak_kernel(length=max(rng.uniform(*style.length) * min(h, w), 2.0),
                                sigma=max(rng.uniform(*style.width), MIN_SIGMA),
                                blur=rng.uniform(*style.blur) * scale,
                                angle_deg=base_angle + rng.uniform(-style.angle_jitter, style.angle_jitter))
        opacity = rng.uniform(*style.opacity)
        layer = _scatter(rng, (h, w), kernel, rng.uniform(*style.density) / scale,
                         (opacity * style.brightness[0], opacity * style.brightness[1]))
        rain = 1 - (1 - rain) * (1 - layer)
    return _finish(1 - (1 - image) * (1 - rain[..., None]))


def render_snow(clean_uint8_hwc: np.ndarray, rng: np.random.Generator, **opts) -> np.ndarray:
    """Render falling snow onto a clean photograph (``y = x (1 - z) + z c`` over a light veil).

    Args:
        clean_uint8_hwc (ndarray): Clean RGB image, uint8, shape (H, W, 3).
        rng (numpy.random.Generator): Source of every random choice; the same state gives the same image.
        **opts: Fields of :class:`SnowStyle` to override, e.g. ``veil=(0, 0)`` or ``layers=(FlakeLayer(...),)``.

    Returns:
        ndarray: The snowy image, uint8, shape (H, W, 3).
    """
    style, image, (h, w), scale = _start(SnowStyle, opts, clean_uint8_hwc)
    colour = rng.uniform(*style.colour)
    image = _veil(image, rng.uniform(*style.veil), colour)
    angle = rng.uniform(*style.angle)
    clear = np.ones((h, w))  # the fraction of each pixel that no flake covers
    for spec in style.layers:
        kernel = _flake_kernel(radius=rng.uniform(*spec.radius) * scale, motion=rng.uniform(*spec.motion) * scale,
                               angle_deg=angle + rng.uniform(-style.angle_jitter, style.angle_jitter))
        clear *= 1 - _scatter(rng, (h, w), kernel, rng.uniform(*spec.density) / scale**2, spec.opacity)
    z = (1 - clear)[..., None]
    return _finish(image * (1 - z) + z * colour)


RENDERERS = {"rain": render_rain, "snow": render_snow}


# ---------------------------------------------------------------------------------------------- clean photographs
def _load_photo(path: Path) -> Image.Image:
    """Decode a photograph as shown (EXIF orientation applied) as RGB, or RGBA when it has transparency (16-bit
    greyscale is brought to 8 bits by the data module's one rule, ``dataloader.to_8bit``)."""
    try:
        with Image.open(path) as opened:
            img = ImageOps.exif_transpose(opened)
            if img.mode in ("I", "I;16", "I;16B", "I;16L"):
                return Image.fromarray(to_8bit(np.asarray(img))).convert("RGB")
            alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            return img.convert("RGBA" if alpha else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"synthetic.py: cannot read {path} ({err}); remove it or point --clean_dir at a folder of "
                         "PNG/JPEG photographs") from err


class PhotoCrops:
    """Random square crops of clean photographs, with the train and test sets drawn from disjoint regions.

    Each photograph is cut at a third of its width: crops for ``"test"`` come from the left part, crops for
    ``"train"`` from the right part, so no pixel is shared (on the default portrait the test part holds the flag and
    the left edge of the face, the training part the face, cap, ribbons and sky). A photograph is chosen with
    probability proportional to its area; a crop spans 1 to 4 times the output size (log-uniform, smaller when the
    part is smaller, upscaling a part narrower than the output), sits at a uniform position, is resized with bicubic
    filtering and mirrored with probability 1/2. Transparent areas get a plain random background colour.

    Args:
        clean_dir (str | Path | None): Folder searched recursively for PNG/JPEG photographs; None uses the sample
            photographs installed with matplotlib.
    """

    def __init__(self, clean_dir: str | os.PathLike | None = None):
        if clean_dir is None:
            folder = Path(matplotlib.get_data_path()) / "sample_data"
            self.paths = [folder / name for name in DEFAULT_PHOTOS if (folder / name).is_file()]
            if not self.paths:
                raise FileNotFoundError(f"synthetic.py: matplotlib's sample photographs {DEFAULT_PHOTOS} are not in "
                                        f"{folder}; pass --clean_dir with a folder of your own photographs")
        else:
            folder = Path(clean_dir)
            if not folder.is_dir():
                raise FileNotFoundError(f"synthetic.py: --clean_dir {folder} is not a folder")
            self.paths = sorted(p for p in folder.rglob("*")
                                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if not self.paths:
                raise FileNotFoundError(f"synthetic.py: no PNG/JPEG images under --clean_dir {folder}")
        areas = np.array([w * h for w, h in (self._size(p) for p in self.paths)], dtype=np.float64)
        self.weights = areas / areas.sum()
        self._load = functools.lru_cache(maxsize=8)(_load_photo)  # per instance, so edited files are read again

    @staticmethod
    def _size(path: Path) -> tuple[int, int]:
        """Width and height from the file header, failing early with the file's name when it is not an image."""
        try:
            with Image.open(path) as img:
                return img.size
        except (OSError, ValueError, Image.DecompressionBombError) as err:  # a bomb: too large to decode safely
            raise ValueError(f"synthetic.py: cannot read {path} ({err}); remove it or point --clean_dir at a folder "
                             "of PNG/JPEG photographs") from err

    def crop(self, rng: np.random.Generator, split: str, size: int) -> np.ndarray:
        """A clean ``size`` x ``size`` RGB crop (uint8, H x W x 3) from the ``split`` region of a photograph."""
        if split not in SPLITS:
            raise ValueError(f"synthetic.py: split must be one of {SPLITS}, got {split!r}")
        photo = self._load(self.paths[rng.choice(len(self.paths), p=self.weights)])
        cut = round(photo.width * TEST_FRACTION)
        part = photo.crop((0, 0, cut, photo.height) if split == "test" else (cut, 0, photo.width, photo.height))
        largest = min(part.width, part.height, MAX_ZOOM_OUT * size)
        side = min(math.exp(rng.uniform(math.log(min(size, largest)), math.log(largest))), largest)
        left, top = rng.uniform(0, part.width - side), rng.uniform(0, part.height - side)
        crop = part.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if crop.mode == "RGBA":
            background = Image.new("RGBA", crop.size, tuple(int(v) for v in rng.integers(40, 230, 3)) + (255,))
            crop = Image.alpha_composite(background, crop)
        return np.asarray(crop.convert("RGB"))


# ----------------------------------------------------------------------------------------------------------- dataset
def _image_rng(seed: int, split: str, kind: str, number: int) -> np.random.Generator:
    """The generator of one image, from (seed, split, type, number) only."""
    return np.random.default_rng([seed, SPLITS.index(split), KINDS.index(kind), number])


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def replaceable_output(out: str | os.PathLike, marker: str, *, what: str) -> bool:
    """The one check before synthetic.py or demo.py writes its output folder: whether ``out`` holds an earlier output
    of the command, which it may replace. Nothing else is ever replaced.

    Args:
        out (str | Path): the output folder.
        marker (str): the name of the file that only the command writes into its output (``synthetic.json``,
            ``demo.json``).
        what (str): the command's output in words, for the message (e.g. "an earlier demo's output").

    Returns:
        bool: False when ``out`` is absent or an empty folder (write it), True when it is a folder holding ``marker``.

    Raises:
        FileExistsError: ``out`` is a file, a folder of other files (it lacks ``marker``), or the current folder or
            one above it (replacing it would remove the folder the command runs in).
    """
    path, cwd = Path(out).resolve(), Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise FileExistsError(f"--out {out} is the current folder or one above it, which is never replaced: name a "
                              "new folder")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder name")
    if not path.is_dir() or not any(path.iterdir()):
        return False
    if (path / marker).is_file():
        return True
    raise FileExistsError(f"--out {out} exists and is not {what} (it has no {marker}), so it is left as it is: "
                          "choose another --out")


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0 (a seed)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def image_side(text: str) -> int:
    """argparse type: an image side of at least ``MIN_IMAGE_SIZE`` pixels."""
    value = int(text)
    if value < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"expected at least {MIN_IMAGE_SIZE} pixels, got {text}")
    return value


def _check_args(out: Path, train_per_type: int, test_per_type: int, size: int, seed: int, overwrite: bool) -> None:
    """Fail before any work on bad numbers or an output folder that is not this script's to replace."""
    for name, value, low in (("train_per_type", train_per_type, 1), ("test_per_type", test_per_type, 1),
                             ("size", size, MIN_IMAGE_SIZE), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"synthetic.py: --{name} must be an integer >= {low}, got {value!r}")
    if replaceable_output(out, MARKER, what="a dataset written by synthetic.py") and not overwrite:
        raise FileExistsError(f"synthetic.py: --out {out} holds an earlier dataset; pass --overwrite to replace it "
                              "or choose another --out")


def make_dataset(out: str | os.PathLike, *, train_per_type: int, test_per_type: int, size: int, seed: int,
                 clean_dir: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Render a rain-and-snow dataset in the homework layout and return its folder.

    The dataset is written into a temporary folder beside ``out`` and renamed into place at the end, so ``out`` is
    either absent, the previous dataset, or the complete new one; an interrupted run leaves no half-written dataset.

    Args:
        out (str | Path): Folder to create. An existing non-empty folder is refused unless it holds an earlier
            dataset (``synthetic.json``) and ``overwrite`` is given; the current folder is never replaced.
        train_per_type (int): Training pairs per type (``rain-1 ... rain-N``, ``snow-1 ... snow-N``).
        test_per_type (int): Test pairs per type; the test set holds ``2 * test_per_type`` images ``0 ... 2M-1``.
        size (int): Side of the square images, at least 16.
        seed (int): Non-negative seed; each image's generator is seeded from (seed, split, type, number).
        clean_dir (str | Path | None): Folder of clean photographs; None uses matplotlib's sample photographs.
        overwrite (bool): Replace an earlier dataset at ``out``.
        progress (bool): Show a tqdm progress bar.

    Returns:
        Path: ``out``.
    """
    out = Path(out)
    _check_args(out, train_per_type, test_per_type, size, seed, overwrite)
    target = Path(os.path.abspath(out))  # has a name and a parent even for "out/.."
    photos = PhotoCrops(clean_dir)
    # the shuffle of the test set has its own stream, which no image uses (their split indices are 0 and 1)
    order = np.random.default_rng([seed, len(SPLITS)]).permutation(len(KINDS) * test_per_type)
    test_items = [(KINDS[j // test_per_type], j % test_per_type + 1) for j in order]
    jobs = [("train", kind, n, f"{kind}-{n}.png", f"{kind}_clean-{n}.png")
            for kind in KINDS for n in range(1, train_per_type + 1)]
    jobs += [("test", kind, n, f"{i}.png", f"{i}.png") for i, (kind, n) in enumerate(test_items)]

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        for split in SPLITS:
            for side in ("degraded", "clean"):
                (tmp / split / side).mkdir(parents=True)
        for split, kind, n, degraded_name, clean_name in tqdm(jobs, desc="synthetic", unit="img", disable=not progress):
            rng = _image_rng(seed, split, kind, n)
            clean = photos.crop(rng, split, size)
            _save_png(RENDERERS[kind](clean, rng), tmp / split / "degraded" / degraded_name)
            _save_png(clean, tmp / split / "clean" / clean_name)
        meta = {"seed": seed, "size": size, "train_per_type": train_per_type, "test_per_type": test_per_type,
                "clean_photos": [str(p) for p in photos.paths], "test_fraction_of_width": TEST_FRACTION,
                "test_kinds": {f"{i}.png": kind for i, (kind, _) in enumerate(test_items)}}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists():  # empty, or an earlier dataset: move it aside, put the new one in place, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render synthetic rain and snow onto clean photographs and write "
                                                 "a dataset in the homework layout (train/ and test/, each with "
                                                 "degraded/ and clean/).")
    parser.add_argument("--out", default="datasets_synth", help="folder to create (default: datasets_synth)")
    parser.add_argument("--train_per_type", type=positive_int, default=32,
                        help="training pairs per type (default: 32)")
    parser.add_argument("--test_per_type", type=positive_int, default=8, help="test pairs per type (default: 8)")
    parser.add_argument("--size", type=image_side, default=64,
                        help=f"side of the square images in pixels, at least {MIN_IMAGE_SIZE} (default: 64)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="non-negative seed (default: 0)")
    parser.add_argument("--clean_dir", default=None,
                        help="folder of clean PNG/JPEG photographs, searched recursively (default: the sample "
                             "photographs installed with matplotlib)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it holds an earlier dataset of this script (nothing else is replaced)")
    args = parser.parse_args(argv)
    setup_logging()

    def work() -> Path:
        try:
            with terminate_as_interrupt():  # SIGTERM removes the half-made data set, as Ctrl-C does
                return make_dataset(args.out, train_per_type=args.train_per_type, test_per_type=args.test_per_type,
                                    size=args.size, seed=args.seed, clean_dir=args.clean_dir,
                                    overwrite=args.overwrite)
        except (ValueError, FileExistsError, FileNotFoundError) as err:  # what the options point at: usage errors
            raise ConfigError(str(err)) from None

    print(run_cli(parser.prog, work))


if __name__ == "__main__":
    main()
