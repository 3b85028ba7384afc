"""vis.py: side-by-side grids from a prediction file, and clear errors when the file does not fit the folder."""

import numpy as np
import pytest
import torch
from PIL import Image

import vis
from inference import write_npz
from scoring import psnr

SIZES = {"rain-1.png": (40, 56), "rain-2.png": (37, 45), "snow-1.png": (40, 56)}  # (H, W)


def _array(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)


@pytest.fixture
def workdir(tmp_path):
    """The layout right after inference.py: datasets/test/degraded, datasets/test/clean (homework partner names)
    and pred.npz whose restorations are the clean images plus a little noise."""
    degraded, clean = tmp_path / "datasets" / "test" / "degraded", tmp_path / "datasets" / "test" / "clean"
    degraded.mkdir(parents=True)
    clean.mkdir(parents=True)
    preds = {}
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        target = _array(h, w, i)
        Image.fromarray(target.transpose(1, 2, 0)).save(clean / name.replace("-", "_clean-"))
        Image.fromarray(_array(h, w, 10 + i).transpose(1, 2, 0)).save(degraded / name)
        preds[name] = np.clip(target.astype(int) + np.random.default_rng(i).integers(-8, 9, target.shape), 0,
                              255).astype(np.uint8)
    write_npz(tmp_path / "pred.npz", preds)
    return tmp_path


def test_default_command_draws_degraded_beside_restored(workdir, monkeypatch):
    """Plain `python vis.py` (no options) reads pred.npz and datasets/test/degraded from the working folder and writes
    PNG grids into vis/: two panels per row, one row per image, all images when fewer than --num."""
    monkeypatch.chdir(workdir)
    paths = vis.main([])
    assert [p.name for p in paths] == ["grid_1.png"]
    with Image.open(workdir / "vis" / "grid_1.png") as img:
        width, height = img.size
    assert width == 2 * vis.PANEL_INCHES * 100 and height > 3 * vis.PANEL_INCHES * 100 * 0.7


def test_with_clean_images_four_panels_and_error_map(workdir):
    """With --gt_folder each row has degraded | restored | clean | error map, chosen by --names, split into grids of
    --per_grid rows; the files open as images of the expected width."""
    out = workdir / "vis_gt"
    paths = vis.main(["--pred_npz", str(workdir / "pred.npz"), "--input_folder",
                      str(workdir / "datasets/test/degraded"), "--gt_folder", str(workdir / "datasets/test/clean"),
                      "--out_dir", str(out), "--names", "snow-1.png", "rain-2.png", "rain-1.png", "--per_grid", "2"])
    assert [p.name for p in paths] == ["grid_1.png", "grid_2.png"]
    for path in paths:
        with Image.open(path) as img:
            assert img.size[0] == 4 * vis.PANEL_INCHES * 100 and img.size[1] > 100


def test_examples_follow_folder_order_and_seeded_sampling(workdir):
    """--names are drawn in folder order; a random sample of --num names is the same for the same --seed."""
    folder = workdir / "datasets/test/degraded"
    examples = vis.load_examples(workdir / "pred.npz", folder, names=["snow-1.png", "rain-1.png"])
    assert [ex.name for ex in examples] == ["rain-1.png", "snow-1.png"] and examples[0].clean is None
    available = sorted(SIZES)
    first = vis.choose_names(available, num=2, seed=3)
    assert len(first) == 2 and first == vis.choose_names(available, num=2, seed=3)
    assert {tuple(vis.choose_names(available, num=2, seed=s)) for s in range(20)} != {tuple(first)}


def test_psnr_in_titles_is_the_graders(workdir):
    """The PSNR in a restored panel's title is utils.psnr of the npz array against the clean image."""
    examples = vis.load_examples(workdir / "pred.npz", workdir / "datasets/test/degraded",
                                 gt_folder=workdir / "datasets/test/clean", names=["rain-1.png"])
    ex = examples[0]
    expected = psnr(torch.from_numpy(ex.restored), torch.from_numpy(ex.clean))
    assert vis._psnr_title(ex.restored, ex.clean) == f"\nPSNR {expected:.2f} dB"
    assert 25 < expected < 40  # noise of +-8 levels


def test_missing_npz_is_named(workdir, capsys):
    """A missing prediction file stops with exit code 2 and an error naming it."""
    with pytest.raises(SystemExit) as exit_info:
        vis.main(["--pred_npz", str(workdir / "nope.npz"), "--input_folder", str(workdir / "datasets/test/degraded")])
    assert exit_info.value.code == 2 and "nope.npz" in capsys.readouterr().err


def test_keys_not_matching_the_folder_are_named(workdir, capsys):
    """A prediction file made from another folder stops with an error naming the missing and unexpected keys."""
    (workdir / "datasets/test/degraded/snow-1.png").rename(workdir / "datasets/test/degraded/snow-9.png")
    with pytest.raises(SystemExit):
        vis.main(["--pred_npz", str(workdir / "pred.npz"), "--input_folder", str(workdir / "datasets/test/degraded"),
                  "--out_dir", str(workdir / "vis")])
    err = capsys.readouterr().err
    assert "missing (1): snow-9.png" in err and "not expected (1): snow-1.png" in err
    assert not (workdir / "vis").exists()


def test_unknown_names_are_named(workdir, capsys):
    """--names that are not in the input folder stop with an error listing them."""
    with pytest.raises(SystemExit):
        vis.main(["--pred_npz", str(workdir / "pred.npz"), "--input_folder", str(workdir / "datasets/test/degraded"),
                  "--names", "rain-1.png", "rain-7.png"])
    assert "rain-7.png" in capsys.readouterr().err


def test_pred_npz_without_suffix_gets_npz_appended(workdir):
    """--pred_npz out/pred finds out/pred.npz, as inference.py --output_npz out/pred writes it."""
    paths = vis.main(["--pred_npz", str(workdir / "pred"), "--input_folder", str(workdir / "datasets/test/degraded"),
                      "--out_dir", str(workdir / "vis"), "--names", "rain-1.png"])
    assert [p.name for p in paths] == ["grid_1.png"] and not (workdir / "pred").exists()
