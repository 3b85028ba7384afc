"""What users meet with their data, each answered by one DataError naming the file and the fix, never a traceback and
never a silently wrong result: ambiguous names, EXIF-rotated photos, macOS metadata files, folders that cannot be
listed, broken links, clean files named like degraded ones, images too small to validate, files that change during
training, empty, huge or misnamed files; and the output folders synthetic.py and demo.py replace."""
import contextlib
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import demo
import synthetic
from dataloader import (DataChangedError, DataError, PairedDataset, _image_size, build_loaders, check_pairs,
                        find_pairs, list_images, read_image_uint8, stratified_split)
from model import MIN_SIZE
from scoring import psnr_per_image


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _pattern(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h, w):
    """A smooth colour image, which JPEG keeps nearly exact (a misaligned copy of it is far off)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // (h + w - 2)],
                    axis=-1).astype(np.uint8)


def _homework(root, counts, size=(16, 16)):
    for kind, count in counts.items():
        for n in range(1, count + 1):
            clean = _pattern(zlib.crc32(f"{kind}-{n}".encode()), *size)
            _save(root / "train" / "clean" / f"{kind}_clean-{n}.png", clean)
            _save(root / "train" / "degraded" / f"{kind}-{n}.png", 255 - clean)
    return root


def _problems(fn, *args, error=DataError, **kwargs):
    with pytest.raises(error) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "Traceback" not in message
    return message


# ----------------------------------------------------------------------------------------------- 1. one stem, two files
def test_a_stem_with_several_extensions_on_either_side_is_an_error_listing_them(tmp_path):
    """rain_clean-1.png beside rain_clean-1.tif (which one is the target?) and rain-1.png beside rain-1.jpg (two
    inputs for one target) are refused, naming every such pair of files, on both sides at once."""
    root = _homework(tmp_path / "data", {"rain": 3})
    _save(root / "train" / "clean" / "rain_clean-1.tif", _pattern(7, 16, 16))
    message = _problems(find_pairs, root)
    assert "rain_clean-1.png and rain_clean-1.tif" in message and "keep one" in message
    _save(root / "train" / "degraded" / "rain-2.jpg", _pattern(8, 16, 16))
    message = _problems(find_pairs, root)
    assert "2 problem(s)" in message
    assert "rain-2.jpg" in message and "rain-2.png" in message and "rain_clean-1.tif" in message
    (root / "train" / "clean" / "rain_clean-1.tif").unlink()
    (root / "train" / "degraded" / "rain-2.jpg").unlink()
    assert len(find_pairs(root)) == 3


# --------------------------------------------------------------------------------------------------- 2. EXIF rotation
def _rotated_jpeg(path, shown, orientation=6):
    """Write ``shown`` as a JPEG whose pixels are stored so that the EXIF orientation tag turns them into ``shown``."""
    stored = {6: np.rot90(shown, 1), 8: np.rot90(shown, -1), 3: shown[::-1, ::-1]}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    _save(path, np.ascontiguousarray(stored), exif=exif, quality=98, subsampling=0)


def _psnr(a, b):
    return psnr_per_image(a.unsqueeze(0), b.unsqueeze(0))[0]


def test_an_exif_rotated_jpeg_is_read_and_sized_as_shown(tmp_path):
    """A phone photo stored sideways with Orientation 6 is read as shown: a square one matches its clean partner
    (about 48 dB, not the 12 dB of the unrotated pixels) and a non-square one passes the size check, its header size
    being the shown one, decoded or not."""
    square = tmp_path / "square"
    shown = _smooth(32, 32)
    _save(square / "clean" / "1.png", shown)
    _rotated_jpeg(square / "degraded" / "1.jpg", shown)
    _save(square / "clean" / "2.png", shown[:24])
    _rotated_jpeg(square / "degraded" / "2.jpg", shown[:24])
    pairs = find_pairs(square)
    assert check_pairs(pairs) == [(32, 32), (24, 32)]
    for pair in pairs:
        assert _psnr(read_image_uint8(pair.degraded), read_image_uint8(pair.clean)) > 40
        assert _image_size(pair.degraded, decode=False) == _image_size(pair.degraded, decode=True)
    assert tuple(read_image_uint8(pairs[1].degraded).shape) == (3, 24, 32)
    train, _ = build_loaders(square, batch_size=2, num_workers=0, patch_size=16, val_per_type=0, seed=0)
    assert next(iter(train))["lq"].shape == (2, 3, 16, 16)


def test_every_exif_orientation_is_applied_as_pillow_shows_it(tmp_path):
    """All eight orientations, on a non-square lossless PNG, give exactly ImageOps.exif_transpose's pixels and size."""
    stored = _pattern(3, 5, 9)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"
        _save(path, stored, exif=exif)
        with Image.open(path) as img:
            expected = torch.from_numpy(np.asarray(ImageOps.exif_transpose(img).convert("RGB")).copy())
        got = read_image_uint8(path)
        assert torch.equal(got, expected.permute(2, 0, 1)), orientation
        assert _image_size(path, decode=False) == tuple(expected.shape[:2]), orientation


# ------------------------------------------------------------------------------------------- 3. macOS metadata files
def test_appledouble_and_hidden_files_are_skipped(tmp_path):
    """macOS's ._rain-1.png beside every image (and .DS_Store) is metadata, not an image: skipped everywhere."""
    root = _homework(tmp_path / "data", {"rain": 2})
    for side in ("degraded", "clean"):
        for image in list((root / "train" / side).iterdir()):
            (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
        (root / "train" / side / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".hidden_set" / "degraded").mkdir(parents=True)
    pairs = find_pairs(root)
    assert [p.name for p in pairs] == ["rain-1.png", "rain-2.png"]
    assert check_pairs(pairs) == [(16, 16), (16, 16)]
    assert [p.name for p in list_images(root / "train" / "degraded")] == ["rain-1.png", "rain-2.png"]


# ------------------------------------------------------------------------------------ 4. a folder that cannot be listed
def _deny_listing(monkeypatch, denied):
    real = Path.iterdir

    def iterdir(self):
        if self == denied:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)
    monkeypatch.setattr(Path, "iterdir", iterdir)


@pytest.mark.parametrize("where", ["folder of sets", "train", "clean"])
def test_a_folder_that_cannot_be_listed_is_named_with_the_fix(tmp_path, monkeypatch, where):
    """PermissionError while listing the data folder, its train/ folder or one of its halves names that folder and
    says how to fix it."""
    root = _homework(tmp_path / "data", {"rain": 2})
    if where == "folder of sets":
        root = tmp_path / "sets"
        root.mkdir()
        (tmp_path / "data" / "train").rename(root / "hw")
    denied = {"folder of sets": root, "train": root / "train", "clean": root / "train" / "clean"}[where]
    _deny_listing(monkeypatch, denied)
    message = _problems(find_pairs, root)
    assert f"{denied} cannot be listed (permission denied)" in message and "chmod" in message


def test_an_entry_that_cannot_be_examined_is_named_with_the_fix(tmp_path, monkeypatch):
    """A folder that can be listed but not searched (read without execute permission) lets no entry be examined:
    the file is named as a data problem with the fix (before: a PermissionError that no DataError named)."""
    root = _homework(tmp_path / "data", {"rain": 2})
    denied = root / "train" / "clean" / "rain_clean-2.png"
    real = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: (_ for _ in ()).throw(PermissionError(
        13, "Permission denied", str(self))) if self == denied else real(self))
    message = _problems(find_pairs, root)
    assert f"{denied} cannot be read (permission denied)" in message and "chmod" in message


def test_an_unreadable_image_is_named_with_the_fix(tmp_path, monkeypatch):
    """A file that cannot be opened for reading says permission denied and how to fix it."""
    path = tmp_path / "1.png"
    _save(path, _pattern(0, 8, 8))
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(fp))) if Path(fp) == path else real(fp, *a, **k))
    message = _problems(read_image_uint8, path)
    assert f"{path} cannot be read (permission denied)" in message and "chmod" in message


# ------------------------------------------------------------------------------------------------- 5. broken links
def test_a_dangling_symlink_is_reported_as_a_broken_link_with_its_target(tmp_path):
    """ls shows rain_clean-2.png, but it points nowhere: the error says so instead of "no clean partner"."""
    root = _homework(tmp_path / "data", {"rain": 2})
    link = root / "train" / "clean" / "rain_clean-2.png"
    link.unlink()
    link.symlink_to(tmp_path / "elsewhere" / "rain_clean-2.png")
    message = _problems(find_pairs, root)
    assert f"{link} is a broken link: it points to {tmp_path / 'elsewhere' / 'rain_clean-2.png'}" in message
    assert "no clean partner" not in message


# ------------------------------------------------------------------------------- 6. clean files with degraded names
def test_clean_files_carrying_the_degraded_names_keep_the_types_of_the_names(tmp_path):
    """train/clean/rain-1.png beside train/degraded/rain-1.png: the types are rain and snow (from the names), not
    the folder's name "train", so validation keeps its per-type split and PSNR."""
    root = tmp_path / "data"
    for kind in ("rain", "snow"):
        for n in range(1, 6):
            clean = _pattern(zlib.crc32(f"{kind}{n}".encode()), 16, 16)
            _save(root / "train" / "clean" / f"{kind}-{n}.png", clean)
            _save(root / "train" / "degraded" / f"{kind}-{n}.png", 255 - clean)
    for data_dir in (root, root / "train"):
        pairs = find_pairs(data_dir)
        assert [p.kind for p in pairs] == ["rain"] * 5 + ["snow"] * 5
        assert all(p.clean.name == p.degraded.name for p in pairs)
    _, val = stratified_split(pairs, val_per_type=1)
    assert sorted(p.kind for p in val) == ["rain", "snow"]


# ------------------------------------------------------------------------------------------ 7. too small to validate
def test_a_validation_image_too_small_for_the_network_is_refused_before_work(tmp_path):
    """A 4x4 pair drawn into the validation split is named (with the network's minimum) before any loader exists,
    instead of crashing training after its first epoch; training images are checked against --patch_size with it."""
    root = _homework(tmp_path / "data", {"rain": 10}, size=(16, 16))
    val_pair = stratified_split(find_pairs(root), val_per_type=2, seed=0)[1][0]
    _save(val_pair.degraded, _pattern(1, 4, 4))
    _save(val_pair.clean, _pattern(2, 4, 4))
    message = _problems(build_loaders, root, batch_size=2, num_workers=0, patch_size=8, val_per_type=2, seed=0,
                        min_size=MIN_SIZE)
    assert f"{val_pair.degraded} is 4x4 (WxH): validation image smaller than {MIN_SIZE}x{MIN_SIZE}" in message
    assert "1 problem(s)" in message
    train_pair = next(p for p in find_pairs(root) if p != val_pair)
    _save(train_pair.degraded, _pattern(3, 6, 6))
    _save(train_pair.clean, _pattern(4, 6, 6))
    message = _problems(build_loaders, root, batch_size=2, num_workers=0, patch_size=8, val_per_type=2, seed=0,
                        min_size=MIN_SIZE)
    assert "2 problem(s)" in message and f"{train_pair.degraded} is 6x6 (WxH): training image smaller than " \
        "--patch_size 8" in message
    with pytest.raises(DataError, match="validation image smaller"):
        PairedDataset([val_pair], train=False, min_size=MIN_SIZE)
    assert PairedDataset([val_pair], train=False).sizes == [(4, 4)], "the data alone need no network's minimum"


# ------------------------------------------------------------------------------------- 8. output folders replaced
SMALL = ["--train_per_type", "1", "--test_per_type", "1", "--size", "16"]


def test_overwrite_replaces_only_a_dataset_synthetic_wrote(tmp_path, capsys):
    """--overwrite on a folder of someone's files (a thesis) refuses and keeps every file; on an earlier dataset it
    replaces it."""
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("three years of work")
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(thesis), "--overwrite"] + SMALL)
    assert exit_info.value.code == 2
    assert "is not a dataset written by synthetic.py (it has no synthetic.json)" in capsys.readouterr().err
    assert sorted(p.name for p in thesis.iterdir()) == ["thesis.tex"]
    out = tmp_path / "synth"
    synthetic.main(["--out", str(out)] + SMALL)
    synthetic.main(["--out", str(out), "--overwrite", "--seed", "1"] + SMALL)
    assert (out / synthetic.MARKER).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["synth", "thesis"]


@pytest.mark.parametrize("empty", [True, False])
@pytest.mark.parametrize("out", [".", "..", "sub/.."])
def test_out_naming_the_current_folder_is_refused_without_a_trace(tmp_path, monkeypatch, capsys, empty, out):
    """--out . (or a folder above the current one) is refused with a message, with and without --overwrite, and
    leaves nothing behind (no stray temporary folder)."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    if not empty:
        (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exit_info:
            synthetic.main(["--out", out] + extra + SMALL)
        assert exit_info.value.code == 2 and "current folder" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_demo_rejects_a_small_size_and_a_negative_seed_in_its_parser(tmp_path, capsys):
    """demo.py --size 8 and --seed -1 are parser errors (exit 2, naming the option) before anything is written."""
    out = tmp_path / "demo_output"
    for option, value in (("--size", "8"), ("--seed", "-1")):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--out", str(out), option, value])
        assert exit_info.value.code == 2 and f"argument {option}" in capsys.readouterr().err
    assert not out.exists()


class Stop(Exception):
    """Ends a demo at its first step."""


def test_demo_and_synthetic_share_one_replacement_rule(tmp_path, monkeypatch, capsys):
    """demo.py decides through synthetic.replaceable_output with its own marker: --out . is refused there too."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", "."])
    assert exit_info.value.code == 2 and "current folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    seen = []
    monkeypatch.setattr(synthetic, "replaceable_output", lambda out, marker, what: seen.append(marker) or False)
    monkeypatch.setattr(synthetic, "make_dataset", lambda out, **kwargs: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        demo.main(["--out", str(tmp_path / "d")])
    assert seen == [demo.MARKER]


# --------------------------------------------------------------------------------- 9. files that change while training
@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_deleted_or_replaced_during_training_is_named(tmp_path, workers):
    """A clean file deleted after the loaders were built, or replaced by an image of another size, raises a
    DataChangedError naming it (exit code 1: the work failed, where a problem found before the work is 2), with a
    plain message also from a worker process (nothing of the worker's traceback), picklable."""
    root = _homework(tmp_path / "data", {"rain": 4})
    train, _ = build_loaders(root, batch_size=4, num_workers=workers, patch_size=8, val_per_type=0, seed=0)
    gone = root / "train" / "clean" / "rain_clean-3.png"
    gone.unlink()
    message = _problems(lambda: next(iter(train)), error=DataChangedError)
    assert DataChangedError.exit_code == 1 and DataError.exit_code == 2
    assert message.startswith(f"{gone} does not exist") and "put it back" in message
    err = DataError(message)
    assert str(pickle.loads(pickle.dumps(err))) == message
    _save(gone, _pattern(0, 12, 20))
    message = _problems(lambda: next(iter(train)), error=DataChangedError)
    assert f"{gone} is now 20x12 (WxH), but" in message and "replaced" in message
    if workers:  # stop the workers now: left to the garbage collector, joining them after the failures takes 10 s
        train._iterator._shutdown_workers()


# --------------------------------------------------------------------------------------------- other broken files
def test_an_empty_file_says_it_is_empty(tmp_path):
    """A 0-byte image (an interrupted copy) is named as empty, not as an unknown format."""
    root = _homework(tmp_path / "data", {"rain": 2})
    empty = root / "train" / "clean" / "rain_clean-2.png"
    empty.write_bytes(b"")
    message = _problems(check_pairs, find_pairs(root))
    assert f"{empty} is empty (0 bytes" in message and "copy it again" in message


@pytest.mark.parametrize("side", ["degraded", "clean"])
def test_a_folder_named_like_an_image_is_named(tmp_path, side):
    """A folder called rain-2.png (or rain_clean-2.png) is not skipped silently nor reported as a missing partner."""
    root = _homework(tmp_path / "data", {"rain": 2})
    name = "rain-2.png" if side == "degraded" else "rain_clean-2.png"
    path = root / "train" / side / name
    path.unlink()
    path.mkdir()
    message = _problems(find_pairs, root)
    assert f"{path} is a folder, not an image file" in message and "no clean partner" not in message


@pytest.mark.parametrize("pixels, what", [(12 * 12, "warned"), (16 * 16, "refused")])
def test_an_image_over_pillows_pixel_limit_is_named(tmp_path, monkeypatch, pixels, what):
    """An image over Pillow's decompression-bomb limit (lowered here to 100 pixels; Pillow warns above it and refuses
    above twice that) is named with its size and the fix, whether Pillow only warned or refused."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    side = int(pixels ** 0.5)
    path = tmp_path / "huge.png"
    _save(path, _pattern(0, side, side))
    with pytest.warns(Image.DecompressionBombWarning) if what == "warned" else contextlib.nullcontext():
        message = _problems(read_image_uint8, path)
    assert message.startswith(f"{path} is too large to decode safely") and "downscale it" in message


def test_names_with_spaces_and_unicode_pair_and_read(tmp_path):
    """Homework-style names with spaces and non-ASCII letters pair, get their types and read like any other."""
    root = tmp_path / "données"
    for kind in ("heavy rain", "雪"):
        for n in (1, 2):
            clean = _pattern(n, 16, 16)
            _save(root / "train" / "clean" / f"{kind}_clean-{n}.png", clean)
            _save(root / "train" / "degraded" / f"{kind}-{n}.png", 255 - clean)
    pairs = find_pairs(root)
    assert [p.kind for p in pairs] == ["heavy rain"] * 2 + ["雪"] * 2
    assert check_pairs(pairs) == [(16, 16)] * 4
    assert torch.equal(read_image_uint8(pairs[3].degraded), 255 - read_image_uint8(pairs[3].clean))


def test_a_file_as_data_folder_and_a_file_gone_before_the_check(tmp_path):
    """--data_dir naming a file says it is a file; a degraded file deleted between finding and checking is named."""
    root = _homework(tmp_path / "data", {"rain": 2})
    message = _problems(find_pairs, root / "train" / "clean" / "rain_clean-1.png")
    assert "is a file, not a folder" in message
    pairs = find_pairs(root)
    pairs[0].degraded.unlink()
    message = _problems(check_pairs, pairs)
    assert f"{pairs[0].degraded} does not exist" in message


def test_a_partner_of_an_unsupported_type_is_pointed_out(tmp_path):
    """rain_clean-2.gif where rain_clean-2.png is expected: the missing-partner message names the .gif and says
    the type is not supported."""
    root = _homework(tmp_path / "data", {"rain": 2})
    (root / "train" / "clean" / "rain_clean-2.png").rename(root / "train" / "clean" / "rain_clean-2.gif")
    message = _problems(check_pairs, find_pairs(root))
    assert "has no clean partner" in message
    assert "holds rain_clean-2.gif, which is not a supported image type" in message


def test_an_unreadable_file_is_named_with_what_to_do(tmp_path):
    """Bytes that are no image are named with the reader's complaint and what to do."""
    path = tmp_path / "1.png"
    path.write_bytes(b"not an image at all")
    message = _problems(read_image_uint8, path)
    assert message.startswith(f"{path}: cannot be read as an image") and "remove it" in message
    assert os.path.getsize(path) > 0
