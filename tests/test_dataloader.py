"""dataloader.py: layouts, error reports, image modes, the split, crops and views, seeding, caching, distribution."""
import logging
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from augment import NUM_VIEWS, SHAPE_PRESERVING_VIEWS, dihedral
from dataloader import (PAIRED_FOLDERS, DataError, Pair, PairedDataset, SeededSampler, build_loaders, check_pairs,
                        degradation_type, find_pairs, list_images, make_train_loader, read_image, stratified_split)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pattern(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _homework(root, counts, size=(16, 16)):
    """root/train/{degraded,clean} with <kind>-<N>.png / <kind>_clean-<N>.png; degraded = 255 - clean."""
    for kind, count in counts.items():
        for n in range(1, count + 1):
            clean = _pattern(zlib.crc32(f"{kind}-{n}".encode()), *size)
            _save(root / "train" / "clean" / f"{kind}_clean-{n}.png", clean)
            _save(root / "train" / "degraded" / f"{kind}-{n}.png", 255 - clean)
    return root


def _plain_set(folder, count, size=(16, 16), ext="png"):
    for n in range(1, count + 1):
        clean = _pattern(n, *size)
        _save(folder / "clean" / f"{n}.{ext}", clean)
        _save(folder / "degraded" / f"{n}.{ext}", 255 - clean)
    return folder


def _png16(array):
    """A 16-bit PNG (grayscale for (H, W), RGB for (H, W, 3)), which Pillow cannot write itself."""
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    header = struct.pack(">IIBBBBB", w, h, 16, 2 if array.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_list_images_sorts_numbers_naturally_and_skips_other_files(tmp_path):
    """"2.png" comes before "10.png", non-image files are skipped, and a folder without images is a DataError."""
    for name in ["10.png", "2.png", "1.jpg"]:
        _save(tmp_path / name, _pattern(0, 4, 4))
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["1.jpg", "2.png", "10.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        list_images(tmp_path / "empty")


def test_homework_layout_pairs_by_name_with_kinds_from_the_prefix(tmp_path):
    """rain-N pairs with rain_clean-N, numbers sort numerically, kinds come from the prefix, test/ is ignored, and
    pointing at train/ itself gives the same pairs."""
    root = _homework(tmp_path / "hw4_realse_dataset", {"rain": 11, "snow": 2})
    _save(root / "test" / "degraded" / "0.png", _pattern(0, 16, 16))
    pairs = find_pairs(root)
    assert [p.name for p in pairs][:11] == [f"rain-{n}.png" for n in range(1, 12)]
    assert [p.kind for p in pairs] == ["rain"] * 11 + ["snow"] * 2
    assert all(p.clean.name == p.name.replace("-", "_clean-") for p in pairs)
    assert find_pairs(root / "train") == pairs
    assert [p.name for p in list_images(root / "test" / "degraded")] == ["0.png"]


def test_plain_set_and_folder_of_sets_take_their_kind_from_the_folder(tmp_path):
    """A plain set with identical names gets its folder's name as kind; in a folder of sets each set's name is the
    kind and prefixes the pair names, so names stay unique."""
    plain = _plain_set(tmp_path / "sets" / "drops", 3)
    _plain_set(tmp_path / "sets" / "haze", 2, ext="jpg")
    (tmp_path / "sets" / "not_a_set").mkdir()
    assert {p.kind for p in find_pairs(plain)} == {"drops"}
    pairs = find_pairs(tmp_path / "sets")
    assert [(p.kind, p.name) for p in pairs] == [("drops", "drops/1.png"), ("drops", "drops/2.png"),
                                                 ("drops", "drops/3.png"), ("haze", "haze/1.jpg"),
                                                 ("haze", "haze/2.jpg")]


def test_a_set_folder_with_only_one_half_is_named_in_a_warning(tmp_path, caplog):
    """In a folder of sets, a subfolder with degraded/ but no clean/ (a typo such as gt/) is skipped with a warning
    that names it and the missing folder, instead of vanishing silently."""
    _plain_set(tmp_path / "sets" / "rain", 2)
    _plain_set(tmp_path / "sets" / "snow", 2)
    (tmp_path / "sets" / "snow" / "clean").rename(tmp_path / "sets" / "snow" / "gt")
    with caplog.at_level(logging.WARNING, logger="dataloader"):
        pairs = find_pairs(tmp_path / "sets")
    assert {p.kind for p in pairs} == {"rain"}
    assert any("snow: it has degraded/ but no clean/" in r.getMessage() for r in caplog.records), caplog.text


def test_the_shared_data_folder_is_read_as_a_folder_of_sets(shared):
    """../shared/data gives its five sets as kinds with their documented pair counts, and the header check passes
    with rain100h's two orientations (480x320 and 320x480)."""
    root = shared("data")
    pairs = find_pairs(root)
    counts = {kind: sum(p.kind == kind for p in pairs) for kind in {p.kind for p in pairs}}
    assert counts == {"outdoorrain": 2, "rain100h": 100, "rain13k_sample": 40, "raindrop_real": 10,
                      "snow_synthetic": 50}
    sizes = check_pairs(pairs, decode=False)
    rain100h = {s for p, s in zip(pairs, sizes) if p.kind == "rain100h"}
    assert rain100h == {(320, 480), (480, 320)}


def test_wrong_roots_say_which_layouts_were_expected(tmp_path):
    """A missing folder and a folder without sets both raise a DataError listing the layouts; the second also says
    what the folder holds. A set with an empty degraded folder names that folder."""
    with pytest.raises(DataError, match=r"(?s)does not exist.*root/train/degraded"):
        find_pairs(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"(?s)holds images/.*root/degraded \+ root/clean"):
        find_pairs(tmp_path)
    (tmp_path / "set" / "degraded").mkdir(parents=True)
    (tmp_path / "set" / "clean").mkdir()
    with pytest.raises(DataError, match=r"set/degraded holds no images"):
        find_pairs(tmp_path / "set")


def _alias_set(folder, halves, count, homework=False):
    """A set with the folder names ``halves``: identical names 1..count, or homework names rain-N / rain_clean-N."""
    degraded, clean = halves
    for n in range(1, count + 1):
        image = _pattern(n, 16, 16)
        _save(folder / clean / (f"rain_clean-{n}.png" if homework else f"{n}.png"), image)
        _save(folder / degraded / (f"rain-{n}.png" if homework else f"{n}.png"), 255 - image)
    return folder


@pytest.mark.parametrize("halves", PAIRED_FOLDERS, ids="/".join)
def test_every_public_folder_name_pair_is_found_in_every_layout(tmp_path, halves):
    """Each (degraded, clean) name pair of PAIRED_FOLDERS (Rain13K's input/target, BasicSR's lq/gt and LQ/GT,
    rain/norain, Snow100K's synthetic/gt, CSD's Snow/Gt) is a set as shipped: as the root itself, as root/train
    (homework names), in a folder of sets beside a degraded/clean set, and in a folder of sets under root/train
    (Restormer's Datasets/train/Rain13K); a degraded image's type is the folder above its degraded folder."""
    degraded, clean = halves
    plain = _alias_set(tmp_path / "Rain13K", halves, 3)
    pairs = find_pairs(plain)
    assert [(p.kind, p.name) for p in pairs] == [("Rain13K", f"{n}.png") for n in (1, 2, 3)]
    assert all(p.degraded.parent.name == degraded and p.clean == plain / clean / p.name for p in pairs)
    assert check_pairs(pairs) == [(16, 16)] * 3
    assert degradation_type(plain / degraded / "1.png") == "Rain13K"

    homework = _alias_set(tmp_path / "hw" / "train", halves, 2, homework=True).parent
    pairs = find_pairs(homework)
    assert [(p.kind, p.name, p.clean.name) for p in pairs] == [("rain", f"rain-{n}.png", f"rain_clean-{n}.png")
                                                                for n in (1, 2)]

    sets = tmp_path / "sets"
    _alias_set(sets / "public", halves, 2)
    _plain_set(sets / "own", 1)
    pairs = find_pairs(sets)
    assert [(p.kind, p.name) for p in pairs] == [("own", "own/1.png"), ("public", "public/1.png"),
                                                 ("public", "public/2.png")]

    datasets = tmp_path / "Datasets"
    _alias_set(datasets / "train" / "Rain13K", halves, 2)
    _alias_set(datasets / "test" / "Rain100H", halves, 1)
    assert [(p.kind, p.name) for p in find_pairs(datasets)] == [("Rain13K", "Rain13K/1.png"),
                                                                ("Rain13K", "Rain13K/2.png")]


def test_train_may_be_spelt_train_and_test_sets_stay_out(tmp_path):
    """CSD ships Train/Snow + Train/Gt beside Test/Snow + Test/Gt: the root gives the training pairs only."""
    _alias_set(tmp_path / "CSD" / "Train", ("Snow", "Gt"), 3)
    _alias_set(tmp_path / "CSD" / "Test", ("Snow", "Gt"), 2)
    pairs = find_pairs(tmp_path / "CSD")
    assert [p.degraded.parent.parent.name for p in pairs] == ["Train"] * 3 and {p.kind for p in pairs} == {"Train"}


def test_wrong_roots_list_the_accepted_folder_names(tmp_path, caplog):
    """A root without pairs lists every accepted degraded/clean name pair and, when it holds one half, names the
    missing other; two name pairs in one folder are refused; a set with one half is skipped with a warning naming
    the partner folder it lacks."""
    (tmp_path / "only" / "input").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        find_pairs(tmp_path / "only")
    message = str(err.value)
    assert "it has input/ but no target/ beside it" in message
    assert all(f"{d}/ + {c}/" in message for d, c in PAIRED_FOLDERS)
    both = _alias_set(_plain_set(tmp_path / "both", 1), ("input", "target"), 1)
    with pytest.raises(DataError, match=r"several pairs of degraded/clean folders \(degraded/ \+ clean/, input/ \+ "
                                        r"target/\)"):
        find_pairs(both)
    sets = tmp_path / "sets"
    _plain_set(sets / "good", 1)
    (sets / "half" / "gt").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="dataloader"):
        assert [p.kind for p in find_pairs(sets)] == ["good"]
    assert any("half: it has gt/ but no lq/ or synthetic/ beside it" in m for m in caplog.messages), caplog.text


def test_check_pairs_reports_every_problem_at_once(tmp_path):
    """A missing partner, a size mismatch (both files, both sizes), an unreadable file and a truncated file are
    reported in one DataError; the header-only check misses only the truncated file."""
    root = _homework(tmp_path, {"rain": 6}, size=(32, 32))
    train = root / "train"
    (train / "clean" / "rain_clean-3.png").unlink()
    _save(train / "clean" / "rain_clean-4.png", _pattern(0, 30, 32))
    (train / "degraded" / "rain-5.png").write_bytes(b"not an image")
    whole = (train / "degraded" / "rain-6.png").read_bytes()
    (train / "degraded" / "rain-6.png").write_bytes(whole[: len(whole) // 2])
    pairs = find_pairs(root)
    with pytest.raises(DataError) as quick:
        check_pairs(pairs, decode=False)
    message = str(quick.value)
    degraded, clean = train / "degraded", train / "clean"
    assert "3 problem(s)" in message
    assert f"{degraded / 'rain-3.png'} has no clean partner (expected {clean / 'rain_clean-3.png'})" in message
    assert f"{degraded / 'rain-4.png'} is 32x32 (WxH) but {clean / 'rain_clean-4.png'} is 32x30" in message
    assert f"{degraded / 'rain-5.png'}: cannot be read" in message
    with pytest.raises(DataError) as full:
        check_pairs(pairs)
    assert "4 problem(s)" in str(full.value) and f"{degraded / 'rain-6.png'}: cannot be read" in str(full.value)
    assert check_pairs(pairs[:2]) == [(32, 32), (32, 32)]


def test_read_image_turns_every_mode_into_8bit_rgb_the_same_way(tmp_path):
    """Gray, palette, RGBA (alpha dropped, colours kept), LA, JPEG, 16-bit gray and 16-bit RGB all read as float
    (3, H, W) in [0, 1]; 16-bit samples keep their high byte in gray and colour files alike."""
    rgb = _pattern(1, 5, 7)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 10, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(rgb[..., 0]).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(rgb).quantize(16).save(tmp_path / "palette.png")
    Image.fromarray(rgb).save(tmp_path / "photo.jpg")
    sixteen = np.arange(5 * 7 * 3, dtype=np.uint16).reshape(5, 7, 3) * 613
    (tmp_path / "gray16.png").write_bytes(_png16(sixteen[..., 0]))
    (tmp_path / "rgb16.png").write_bytes(_png16(sixteen))
    images = {p.stem: read_image(p) for p in tmp_path.iterdir()}
    for name, image in images.items():
        assert image.dtype == torch.float32 and image.shape == (3, 5, 7), name
        assert 0 <= image.min() and image.max() <= 1, name

    def as_uint8(x):
        return (x * 255).round().to(torch.uint8)
    assert torch.equal(as_uint8(images["rgba"]), torch.from_numpy(rgb).permute(2, 0, 1))
    gray = torch.from_numpy(rgb[..., 0]).expand(3, 5, 7)
    assert torch.equal(as_uint8(images["gray"]), gray) and torch.equal(as_uint8(images["la"]), gray)
    high = torch.from_numpy((sixteen >> 8).astype(np.uint8)).permute(2, 0, 1)
    assert torch.equal(as_uint8(images["rgb16"]), high)
    assert torch.equal(as_uint8(images["gray16"]), high[0].expand(3, 5, 7))
    palette_colours = as_uint8(images["palette"]).flatten(1).T.unique(dim=0)
    assert 1 < len(palette_colours) <= 16


def _fake_pairs(counts):
    return [Pair(Path(f"{kind}-{n}.png"), Path(f"{kind}_clean-{n}.png"), kind, f"{kind}-{n}.png")
            for kind, count in counts.items() for n in range(1, count + 1)]


def test_stratified_split_is_per_kind_pinned_and_capped_for_small_kinds(caplog):
    """Per kind at most val_per_type and at most 20 % (at least one from two pairs up) go to validation, with a
    warning; the draw is pinned (the same on every machine and Python hash seed), independent of input order and
    of the other kinds; val_per_type=0 gives no validation."""
    pairs = _fake_pairs({"rain": 100, "snow": 10, "haze": 2, "fog": 1})
    with caplog.at_level(logging.WARNING, logger="dataloader"):
        train, val = stratified_split(pairs, val_per_type=5, seed=42)
    count = {k: sum(p.kind == k for p in val) for k in ("rain", "snow", "haze", "fog")}
    assert count == {"rain": 5, "snow": 2, "haze": 1, "fog": 0}
    assert {"'snow'", "'haze'", "'fog'"} <= {w.split()[1] for w in caplog.messages}
    assert set(train) | set(val) == set(pairs) and not set(train) & set(val) and len(train) + len(val) == len(pairs)
    assert [p.name for p in val] == PINNED_VAL
    shuffled = random.Random(0).sample(pairs, len(pairs))
    assert {p.name for p in stratified_split(shuffled, val_per_type=5, seed=42)[1]} == set(PINNED_VAL)
    rain_only = stratified_split(_fake_pairs({"rain": 100}), val_per_type=5, seed=42)[1]
    assert [p.name for p in rain_only] == [n for n in PINNED_VAL if n.startswith("rain")]
    assert {p.name for p in stratified_split(pairs, val_per_type=5, seed=43)[1]} != set(PINNED_VAL)
    assert stratified_split(pairs, val_per_type=0) == (pairs, [])
    with pytest.raises(ValueError, match=">= 0"):
        stratified_split(pairs, val_per_type=-1)


# Computed once; a change here means every existing split (and every reported validation PSNR) changes.
PINNED_VAL = ["rain-17.png", "rain-52.png", "rain-67.png", "rain-86.png", "rain-99.png", "snow-6.png", "snow-9.png",
              "haze-2.png"]


def _view_of(crop, image):
    """(top, left, view) such that crop == dihedral(image window, view), or None."""
    p = crop.shape[-1]
    for top in range(image.shape[-2] - crop.shape[-2] + 1):
        for left in range(image.shape[-1] - p + 1):
            window = image[..., top:top + crop.shape[-2], left:left + p]
            for k in range(NUM_VIEWS):
                view = dihedral(window, k)
                if view.shape == crop.shape and torch.equal(view, crop):
                    return top, left, k
    return None


def test_training_crops_are_at_the_same_place_and_view_in_both_images(tmp_path):
    """Each item is one window of the clean image seen through one dihedral view, the degraded side is the same
    window and view (degraded = 1 - clean here), and a square patch uses all 8 views."""
    root = _homework(tmp_path, {"rain": 1}, size=(12, 20))
    pairs = find_pairs(root)
    clean = read_image(pairs[0].clean)
    dataset = PairedDataset(pairs, train=True, patch_size=8)
    views = set()
    for seed in range(60):
        item = dataset[(0, seed)]
        assert item["lq"].shape == item["gt"].shape == (3, 8, 8) and item["kind"] == "rain"
        assert torch.allclose(item["lq"], 1 - item["gt"], atol=1e-6)
        found = _view_of(item["gt"], clean)
        assert found is not None
        views.add(found[2])
    assert views == set(range(NUM_VIEWS))
    assert torch.equal(dataset[(0, 7)]["gt"], dataset[(0, 7)]["gt"]), "an item is a function of its seed"


def test_whole_non_square_images_use_only_the_shape_preserving_views(tmp_path):
    """Without a patch size, 6x10 images keep their shape and show exactly the 4 shape-preserving views."""
    pairs = find_pairs(_homework(tmp_path, {"snow": 1}, size=(6, 10)))
    clean = read_image(pairs[0].clean)
    dataset = PairedDataset(pairs, train=True)
    views = {_view_of(dataset[(0, seed)]["gt"], clean)[2] for seed in range(40)}
    assert views == set(SHAPE_PRESERVING_VIEWS)


def test_small_images_and_mixed_sizes_without_a_patch_are_errors(tmp_path):
    """An image smaller than the patch is named with its size (no padding); mixed sizes without --patch_size say
    to pass it."""
    root = _homework(tmp_path, {"rain": 2}, size=(16, 16))
    _save(root / "train" / "degraded" / "rain-3.png", _pattern(0, 12, 20))
    _save(root / "train" / "clean" / "rain_clean-3.png", _pattern(0, 12, 20))
    pairs = find_pairs(root)
    with pytest.raises(DataError, match=r"rain-3\.png is 20x12 \(WxH\)") as err:
        PairedDataset(pairs, patch_size=14)
    assert "rain-1.png" not in str(err.value)
    with pytest.raises(DataError, match="--patch_size"):
        PairedDataset(pairs)
    assert len(PairedDataset(pairs, patch_size=12)) == 3


def _first_batch(root, seed, num_workers, **kwargs):
    train, _ = build_loaders(root, batch_size=4, num_workers=num_workers, patch_size=8, val_per_type=0, seed=seed,
                             **kwargs)
    return next(iter(train))


@pytest.fixture(scope="module")
def hw_root(tmp_path_factory):
    return _homework(tmp_path_factory.mktemp("hw"), {"rain": 8, "snow": 8}, size=(16, 16))


def test_loaders_repeat_from_their_seed_whatever_the_number_of_workers(hw_root):
    """Two loaders with the same seed give identical first batches and another seed differs, with 0 and 2 workers;
    0 and 2 workers also agree with each other (each sample's crop and view come from the sampler's seed)."""
    batches = {}
    for workers in (0, 2):
        a, b, c = (_first_batch(hw_root, seed, workers) for seed in (1, 1, 2))
        assert a["name"] == b["name"] and torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])
        assert not torch.equal(a["gt"], c["gt"])
        batches[workers] = a
    assert torch.equal(batches[0]["gt"], batches[2]["gt"])
    assert batches[0]["lq"].shape == (4, 3, 8, 8) and batches[0]["lq"].dtype == torch.float32


def test_the_cache_serves_the_same_batches_from_memory(hw_root, tmp_path):
    """A cached loader gives the same batch as an uncached one and keeps working once the files are gone."""
    copy = tmp_path / "copy"
    for path in hw_root.rglob("*.png"):
        _save(copy / path.relative_to(hw_root), np.asarray(Image.open(path)))
    cached, _ = build_loaders(copy, batch_size=4, num_workers=0, patch_size=8, val_per_type=0, seed=3, cache=True)
    for path in copy.rglob("*.png"):
        path.unlink()
    assert torch.equal(next(iter(cached))["gt"], _first_batch(hw_root, 3, 0)["gt"])


def test_epochs_differ_and_set_epoch_replays_one(hw_root):
    """Successive epochs draw new crops; set_epoch(e) replays epoch e exactly (resuming)."""
    train, _ = build_loaders(hw_root, batch_size=4, num_workers=0, patch_size=8, val_per_type=0, seed=0)
    first, second = next(iter(train))["gt"], next(iter(train))["gt"]
    assert not torch.equal(first, second)
    train.sampler.set_epoch(1)
    assert torch.equal(next(iter(train))["gt"], second)


def test_validation_gives_whole_unchanged_images_batched_only_when_sizes_match(hw_root, tmp_path):
    """Validation items are the files as read, never in training; batch_size when all share a size, else 1."""
    train, val = build_loaders(hw_root, batch_size=2, num_workers=0, patch_size=8, val_per_type=2, seed=0)
    assert val.batch_size == 2 and {p.kind for p in val.dataset.pairs} == {"rain", "snow"}
    assert len(val.dataset) == 2, "8 pairs per kind: 20 % caps validation at one each"
    assert not set(train.dataset.pairs) & set(val.dataset.pairs)
    batch = next(iter(val))
    for i, name in enumerate(batch["name"]):
        pair = next(p for p in val.dataset.pairs if p.name == name)
        assert torch.equal(batch["lq"][i], read_image(pair.degraded)) and torch.equal(batch["gt"][i],
                                                                                       read_image(pair.clean))
    mixed = tmp_path / "mixed"
    for n in range(1, 11):  # every image its own size
        _save(mixed / "train" / "degraded" / f"rain-{n}.png", _pattern(n, 16, 16 + n))
        _save(mixed / "train" / "clean" / f"rain_clean-{n}.png", _pattern(n, 16, 16 + n))
    assert build_loaders(mixed, batch_size=2, num_workers=0, patch_size=8, val_per_type=2)[1].batch_size == 1


def test_reading_the_validation_set_leaves_the_global_random_state_alone(hw_root):
    """Validation draws nothing from torch's global generator, which the augmentation policy uses: a pass over it
    (with 0 or 2 workers) leaves that state as it was, so validating cannot change the training after it."""
    for workers in (0, 2):
        _, val = build_loaders(hw_root, batch_size=2, num_workers=workers, patch_size=8, val_per_type=2, seed=0)
        before = torch.get_rng_state()
        for _ in range(2):
            assert len(list(val)) == 1
        assert torch.equal(torch.get_rng_state(), before), workers


def test_too_few_training_pairs_for_a_batch_says_where_they_went(tmp_path):
    """With 2 pairs, one goes to validation and the error says so and names both ways out."""
    root = _homework(tmp_path, {"rain": 2}, size=(16, 16))
    with pytest.raises(DataError, match=r"1 training pairs per process is fewer than --batch_size 2 \(2 pairs found, "
                                        r"1 kept for validation, 1 process\(es\)\): lower --batch_size, or "
                                        r"--val_per_type \(0 trains on every pair\)"):
        build_loaders(root, batch_size=2, num_workers=0, patch_size=8, val_per_type=320)


def test_seeded_sampler_shards_disjointly_and_validation_needs_a_process_group(hw_root):
    """Two ranks draw disjoint halves with different seeds; build_loaders(distributed=True) without
    torch.distributed says to use torchrun, and with a one-process group exposes its SeededSampler."""
    dataset = list(range(16))
    ranks = [list(SeededSampler(dataset, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]
    indices = [{i for i, _ in r} for r in ranks]
    assert len(indices[0]) == len(indices[1]) == 8 and indices[0] | indices[1] == set(range(16))
    assert not {s for _, s in ranks[0]} & {s for _, s in ranks[1]}
    with pytest.raises(RuntimeError, match="torchrun"):
        build_loaders(hw_root, batch_size=2, num_workers=0, patch_size=8, distributed=True)
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        train, val = build_loaders(hw_root, batch_size=2, num_workers=0, patch_size=8, val_per_type=2,
                                   distributed=True)
    finally:
        torch.distributed.destroy_process_group()
    assert isinstance(train.sampler, SeededSampler) and list(val.sampler) == [0, 1]


def test_jpeg_sets_of_mixed_large_sizes_give_patches(shared):
    """rain13k_sample (JPEG, 400x268 to 2560x1600, some portrait) trains on 64x64 patches in [0, 1]."""
    train, val = build_loaders(shared("data", "rain13k_sample"), batch_size=3, num_workers=0, patch_size=64,
                               val_per_type=8, decode_check=False)
    batch = next(iter(train))
    assert batch["lq"].shape == batch["gt"].shape == (3, 3, 64, 64)
    assert 0 <= batch["lq"].min() and batch["gt"].max() <= 1 and set(batch["kind"]) == {"rain13k_sample"}
    assert len(set(val.dataset.sizes)) > 1 and val.batch_size == 1 and len(val.dataset) == 8


def test_make_train_loader_and_with_patch_size_give_the_batches_of_build_loaders(hw_root):
    """make_train_loader over PairedDataset.with_patch_size(8) of a 12-pixel dataset gives build_loaders'
    patch_size=8 batches, epoch after epoch; the copy shares pairs, sizes and cache and checks its patch size."""
    train, _ = build_loaders(hw_root, batch_size=4, num_workers=0, patch_size=8, val_per_type=0, seed=5)
    dataset = PairedDataset(find_pairs(hw_root), train=True, patch_size=12, cache=True)
    smaller = dataset.with_patch_size(8)
    assert smaller.pairs is dataset.pairs and smaller.cache is dataset.cache and smaller.sizes is dataset.sizes
    assert dataset.patch_size == 12 and smaller.patch_size == 8
    loader = make_train_loader(smaller, batch_size=4, num_workers=0, seed=5)
    assert isinstance(loader.sampler, SeededSampler) and len(loader) == len(train) == 4
    for _ in range(2):
        for ours, theirs in zip(loader, train, strict=True):
            assert ours["name"] == theirs["name"] and torch.equal(ours["lq"], theirs["lq"])
            assert torch.equal(ours["gt"], theirs["gt"])
    with pytest.raises(DataError, match=r"rain-1\.png is 16x16 \(WxH\): training image smaller than --patch_size 17"):
        dataset.with_patch_size(17)
    with pytest.raises(ValueError, match="positive"):
        dataset.with_patch_size(0)
    assert dataset.with_patch_size(None)[(0, 1)]["gt"].shape == (3, 16, 16)
    with pytest.raises(DataError, match="fewer than --batch_size 17"):
        make_train_loader(dataset, batch_size=17, num_workers=0, seed=5)


def test_clean_partner_stem_rule():
    """Homework names pair with <type>_clean-<N> unless only the identical name exists; other names pair by stem."""
    from dataloader import clean_partner_stem

    assert clean_partner_stem("rain-12", {"rain_clean-12", "rain-12"}) == "rain_clean-12"
    assert clean_partner_stem("rain-12", {"rain-12"}) == "rain-12"
    assert clean_partner_stem("rain-12", set()) == "rain_clean-12"
    assert clean_partner_stem("12", {"12"}) == "12"


def test_the_data_module_needs_no_network():
    """dataloader.py imports neither model.py nor any network module: the smallest image a network takes comes in
    as min_size (the trainer passes model.MIN_SIZE), so reading data never builds or imports a model."""
    import ast

    tree = ast.parse((Path(__file__).parents[1] / "dataloader.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported.isdisjoint({"model", "adair", "fast_path", "trainer"}), imported
