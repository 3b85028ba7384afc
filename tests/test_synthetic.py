"""synthetic.py: deterministic rain and snow, the homework layout, realistic strength, safe writing."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import synthetic
from synthetic import PhotoCrops, make_dataset, render_rain, render_snow
from scoring import psnr_per_image

SMALL = dict(train_per_type=3, test_per_type=2, size=32, seed=0, progress=False)
DEGRADED_NAME = re.compile(r"(rain|snow)-([1-9][0-9]*)\.png")


def _psnr(degraded, clean):
    """The grader's PSNR of two uint8 (H, W, 3) arrays."""
    chw = lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1)  # noqa: E731
    return psnr_per_image(chw(degraded), chw(clean))[0]


def _files(root):
    """Relative path -> bytes of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def _clean_photo():
    return np.asarray(Image.open(PhotoCrops().paths[0]).convert("RGB"))[100:164, 100:164]


def test_renderers_are_deterministic_per_generator():
    """The same generator state gives the same image; another seed gives another image."""
    clean = _clean_photo()
    for render in (render_rain, render_snow):
        first = render(clean, np.random.default_rng(5))
        assert np.array_equal(first, render(clean, np.random.default_rng(5)))
        assert not np.array_equal(first, render(clean, np.random.default_rng(6)))
        assert first.dtype == np.uint8 and first.shape == clean.shape


def test_dataset_bytes_depend_only_on_seed_and_image(tmp_path):
    """Same seed -> byte-identical files; a different seed -> different files; an image does not depend on how many
    others are rendered (each has its own generator)."""
    a = _files(make_dataset(tmp_path / "a", **SMALL))
    b = _files(make_dataset(tmp_path / "b", **SMALL))
    assert a == b
    other = _files(make_dataset(tmp_path / "c", **{**SMALL, "seed": 1}))
    assert other.keys() == a.keys()
    assert all(other[name] != a[name] for name in a if name.endswith(".png"))
    more = _files(make_dataset(tmp_path / "d", **{**SMALL, "train_per_type": 4}))
    assert more["train/degraded/rain-3.png"] == a["train/degraded/rain-3.png"]
    assert more["train/clean/snow_clean-1.png"] == a["train/clean/snow_clean-1.png"]


def test_cli_writes_the_homework_layout(tmp_path, capsys):
    """The command line writes exactly the homework's names, every degraded image has a clean partner of the same
    size, test images are numbered 0..n-1 without their type, and nothing temporary is left beside the output."""
    out = tmp_path / "synth"
    synthetic.main(["--out", str(out), "--train_per_type", "3", "--test_per_type", "2", "--size", "48", "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(out)
    assert _names(tmp_path) == ["synth"]
    assert _names(out) == ["synthetic.json", "test", "train"]
    n = range(1, 4)
    assert _names(out / "train/degraded") == sorted([f"rain-{i}.png" for i in n] + [f"snow-{i}.png" for i in n])
    assert _names(out / "train/clean") == sorted([f"{kind}_clean-{i}.png" for kind in ("rain", "snow") for i in n])
    assert _names(out / "test/degraded") == _names(out / "test/clean") == [f"{i}.png" for i in range(4)]
    kinds = json.loads((out / "synthetic.json").read_text())["test_kinds"]
    assert sorted(kinds) == _names(out / "test/degraded") and sorted(kinds.values()) == ["rain"] * 2 + ["snow"] * 2

    pairs = []
    for path in (out / "train/degraded").iterdir():
        kind, number = DEGRADED_NAME.fullmatch(path.name).groups()
        pairs.append((path, out / "train/clean" / f"{kind}_clean-{number}.png"))
    pairs += [(p, out / "test/clean" / p.name) for p in (out / "test/degraded").iterdir()]
    for degraded_path, clean_path in pairs:
        with Image.open(degraded_path) as degraded, Image.open(clean_path) as clean:
            assert degraded.mode == clean.mode == "RGB" and degraded.size == clean.size == (48, 48)
            assert not np.array_equal(np.asarray(degraded), np.asarray(clean)), f"{degraded_path.name} is unchanged"


def test_rain_and_snow_only_add_light_without_a_veil():
    """Rain is screen-blended and snow is y = x(1 - z) + z c with c = 1: neither darkens a pixel, white stays white
    under rain, and on black only a minority of pixels light up (streaks and flakes, not a wash)."""
    clean = _clean_photo()
    rain = render_rain(clean, np.random.default_rng(0), veil_prob=0.0)
    snow = render_snow(clean, np.random.default_rng(0), veil=(0.0, 0.0), colour=(1.0, 1.0))
    assert (rain >= clean).all() and (snow >= clean).all()
    white = np.full((64, 64, 3), 255, np.uint8)
    assert np.array_equal(render_rain(white, np.random.default_rng(1), veil_prob=0.0), white)
    black = np.zeros((64, 64, 3), np.uint8)
    for lit in (render_rain(black, np.random.default_rng(2), veil_prob=0.0, layers=(2, 2)),
                render_snow(black, np.random.default_rng(2), veil=(0.0, 0.0))):
        covered = (lit.max(axis=2) > 10).mean()
        assert 0.005 < covered < 0.5, f"{covered:.3f} of the pixels are lit"


def test_mean_input_psnr_of_default_crops_lies_in_the_stated_band():
    """Rendered the way the dataset is, rain averages 22-26 dB and snow 22-25 dB input PSNR (light rain is about
    25 dB, the Snow100K-style reference set 23.9 dB; heavy Rain100H is 12.1 dB)."""
    photos = PhotoCrops()
    means = {}
    for kind, render in (("rain", render_rain), ("snow", render_snow)):
        values = []
        for number in range(1, 41):
            rng = synthetic._image_rng(0, "train", kind, number)
            clean = photos.crop(rng, "train", 64)
            values.append(_psnr(render(clean, rng), clean))
        means[kind] = float(np.mean(values))
    assert 22.0 <= means["rain"] <= 26.0, means
    assert 22.0 <= means["snow"] <= 25.0, means


def test_strength_matches_the_reference_sets_on_their_backgrounds(shared):
    """On the Rain100 backgrounds our rain is far lighter than heavy Rain100H (12.1 dB) and within the light-rain
    range, and our snow is within 2 dB of the reference synthetic snow set on the same ten images."""
    rain100h, snow_ref = shared("data", "rain100h"), shared("data", "snow_synthetic")
    rain, snow, reference = [], [], []
    for number in range(51, 61):
        clean = np.asarray(Image.open(rain100h / "clean" / f"{number}.png").convert("RGB"))
        rain.append(_psnr(render_rain(clean, np.random.default_rng(number)), clean))
        snow.append(_psnr(render_snow(clean, np.random.default_rng(number)), clean))
        reference.append(_psnr(np.asarray(Image.open(snow_ref / "degraded" / f"{number}.png").convert("RGB")),
                               np.asarray(Image.open(snow_ref / "clean" / f"{number}.png").convert("RGB"))))
    assert 21.0 <= np.mean(rain) <= 28.0, np.mean(rain)
    assert abs(np.mean(snow) - np.mean(reference)) <= 2.0, (np.mean(snow), np.mean(reference))


def test_clean_dir_is_used_and_train_and_test_regions_are_disjoint(tmp_path):
    """--clean_dir photographs (found recursively, PNG and JPEG, other and hidden files ignored) are the only clean
    source, and test crops come from the left third of a photograph, train crops from the rest."""
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    split = np.zeros((96, 240, 3), np.uint8)
    split[:, :80] = (30, 30, 200)  # the test region; the edge falls on a JPEG block boundary
    split[:, 80:] = (200, 30, 30)  # the train region
    Image.fromarray(split).save(photos / "split.png")
    Image.fromarray(np.repeat(split, 2, axis=0)).save(photos / "nested" / "tall.PNG")
    Image.fromarray(split).save(photos / "nested" / "also.jpg", quality=95, subsampling=0)
    (photos / "notes.txt").write_text("not an image")
    (photos / "._split.png").write_bytes(b"macOS metadata, not an image")
    out = make_dataset(tmp_path / "synth", clean_dir=photos, **{**SMALL, "train_per_type": 4, "test_per_type": 3})
    used = json.loads((out / "synthetic.json").read_text())["clean_photos"]
    assert sorted(used) == sorted(str(p) for p in (photos / "split.png", photos / "nested/tall.PNG",
                                                   photos / "nested/also.jpg"))
    for split_name, colour in (("train", (200, 30, 30)), ("test", (30, 30, 200))):
        for path in (out / split_name / "clean").iterdir():
            pixels = np.asarray(Image.open(path), dtype=np.int16)
            assert np.abs(pixels - colour).max() <= 6, f"{split_name}/{path.name} is not from its region"


def test_bad_clean_dir_and_bad_options_fail_before_writing(tmp_path):
    """An unreadable image is named in the error, a folder without images and invalid numbers or style options are
    refused, and none of these leaves an output folder behind."""
    photos = tmp_path / "photos"
    photos.mkdir()
    with pytest.raises(FileNotFoundError, match="no PNG/JPEG"):
        make_dataset(tmp_path / "out", clean_dir=photos, **SMALL)
    (photos / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        make_dataset(tmp_path / "out", clean_dir=photos, **SMALL)
    with pytest.raises(ValueError, match="--size"):
        make_dataset(tmp_path / "out", **{**SMALL, "size": 8})
    with pytest.raises(TypeError, match="density"):
        render_rain(_clean_photo(), np.random.default_rng(0), dnesity=(0.1, 0.2))
    assert _names(tmp_path) == ["photos"]


def test_refuses_to_overwrite_and_replaces_only_when_asked(tmp_path, capsys):
    """A non-empty output folder is kept as it is unless overwrite is asked for (the CLI says how); an empty one is
    filled; with --overwrite the old content is gone and the new dataset is complete."""
    out = tmp_path / "synth"
    out.mkdir()
    make_dataset(out, **SMALL)  # empty folder: fine
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_dataset(out, **SMALL)
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(out), "--size", "32"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep me"
    make_dataset(out, overwrite=True, **{**SMALL, "seed": 2})
    assert not (out / "mine.txt").exists() and len(_names(out / "train/degraded")) == 6
    assert _names(tmp_path) == ["synth"]


def test_an_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    """A failure while rendering removes the temporary folder and never creates the output folder."""
    def broken(clean, rng, **opts):
        raise RuntimeError("renderer failed")

    monkeypatch.setitem(synthetic.RENDERERS, "snow", broken)
    with pytest.raises(RuntimeError, match="renderer failed"):
        make_dataset(tmp_path / "synth", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_a_16_bit_photograph_is_read_by_the_data_modules_one_rule(tmp_path):
    """A 16-bit greyscale --clean_dir photograph becomes 8 bits exactly as training reads the same file
    (dataloader.to_8bit, the high byte), not by a rule of its own."""
    from dataloader import read_image_uint8
    from synthetic import _load_photo

    values = np.array([[0, 255, 256, 32767, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    mine = np.asarray(_load_photo(path)).transpose(2, 0, 1)
    assert np.array_equal(mine, read_image_uint8(path).numpy())
    assert mine[0, 0].tolist() == [0, 0, 1, 127, 128, 255]
