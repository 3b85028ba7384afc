"""inference.py: the submission file, test-time augmentation, tiling, the out-of-memory retry and scoring."""
import csv
import gc
import logging
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import inference
from augment import VIEW_NAMES, dihedral, dihedral_inverse
from dataloader import find_pairs, read_image, read_image_uint8
from model import build_model
from scoring import psnr, ssim
from utils import save_checkpoint, to_uint8

SIZES = {"0.png": (40, 56), "1.png": (37, 45)}  # (H, W), one of them odd


def _random_image(h, w, seed):
    """A smooth random RGB image in [0, 1] (blurred noise, so it looks like a picture rather than static)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h // 4 + 2, w // 4 + 2, generator=g)
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0]


def _save_png(path, image, mode="RGB"):
    array = to_uint8(image).permute(1, 2, 0).numpy()
    img = Image.fromarray(array)
    if mode == "RGBA":
        img.putalpha(128)
    elif mode == "L":
        img = img.convert("L")
    img.save(path)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture
def checkpoint(tmp_path, tiny):
    path = tmp_path / "best.pth"
    save_checkpoint(path, {"format_version": 1, "model": tiny.state_dict(), "ema": None,
                           "model_config": {"preset": "tiny"}, "epoch": 1, "step": 1})
    return path


def _write_inputs(folder):
    folder.mkdir()
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        _save_png(folder / name, _random_image(h, w, i))
    _save_png(folder / "2.png", _random_image(33, 40, 2), "RGBA")
    _save_png(folder / "10.png", _random_image(32, 29, 3), "L")
    return folder


@pytest.fixture
def inputs(tmp_path):
    """Two RGB images (one of odd size), one RGBA and one grayscale, named like the homework's test set."""
    return _write_inputs(tmp_path / "degraded")


class SymmetricBlur(nn.Module):
    """A model exactly equivariant under the 8 dihedral views: a 3x3 kernel with the square's symmetries, reflect
    padding, and a pointwise nonlinearity."""

    def __init__(self):
        super().__init__()
        kernel = torch.tensor([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]])
        self.weight = nn.Parameter(kernel.expand(3, 1, 3, 3).clone())

    def forward(self, x):
        y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.weight, groups=3)
        return torch.sigmoid(4 * y - 2)


class Identity(nn.Module):
    """Returns its input (with a parameter, so restore() can find the model's device)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.dummy


class TileMean(Identity):
    """Replaces every pixel by the mean of what it is given: a hard-stitched tiling shows a step at each tile edge."""

    def forward(self, x):
        return x.mean(dim=(-3, -2, -1), keepdim=True).expand_as(x) + self.dummy


def test_cli_writes_the_submission_format(tmp_path, checkpoint, inputs, tiny):
    """The command line writes pred.npz with one uint8 (3, H, W) array per input, keyed by file name with extension
    (RGBA and grayscale inputs become RGB), leaves no temporary file, equals restore() of the checkpoint's model,
    and --save_images writes the same pixels as PNG."""
    out = tmp_path / "out" / "pred.npz"
    inference.main(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--output_npz", str(out),
                    "--tta", "1", "--device", "cpu", "--no_progress", "--save_images", str(tmp_path / "png")])
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.npz"]
    with np.load(out) as data:
        preds = {name: data[name] for name in data.files}
    expected = {**SIZES, "2.png": (33, 40), "10.png": (32, 29)}
    assert sorted(preds) == sorted(expected)
    for name, (h, w) in expected.items():
        assert preds[name].dtype == np.uint8 and preds[name].shape == (3, h, w), name
        own = to_uint8(inference.restore(tiny, read_image(inputs / name), tta=1)).numpy()
        assert np.array_equal(preds[name], own), name
        saved = np.asarray(Image.open(tmp_path / "png" / name)).transpose(2, 0, 1)
        assert np.array_equal(saved, preds[name]), name


def test_output_is_rounded_not_truncated(tiny, inputs):
    """predict_folder converts clamp -> x255 -> round (checked against numpy), which differs from truncation."""
    preds = inference.predict_folder(tiny, inputs, tta=1, progress=False)
    out = inference.restore(tiny, read_image(inputs / "0.png"), tta=1).numpy()
    scaled = np.clip(out, 0, 1) * 255
    assert np.array_equal(preds["0.png"], np.round(scaled).astype(np.uint8))
    assert not np.array_equal(preds["0.png"], scaled.astype(np.uint8)), "truncation would give the same: weak test"


@pytest.mark.parametrize("hw", [(24, 24), (21, 30)])
def test_tta_of_an_equivariant_model_equals_its_plain_output(hw):
    """For a model exactly equivariant under the dihedral group, every view mapped back by its inverse gives the
    plain output, so 8-view TTA equals no TTA (square and non-square images, whose rotated views change shape)."""
    model, x = SymmetricBlur(), _random_image(*hw, seed=5)
    plain = inference.restore(model, x, tta=1)
    assert not torch.allclose(plain, x, atol=1e-3), "the model must change the image for the test to mean anything"
    for tta in (2, 4, 8):
        assert torch.allclose(inference.restore(model, x, tta=tta), plain, atol=1e-6), tta


@pytest.mark.parametrize("tta", [2, 4, 8])
def test_tta_equals_the_manual_average_of_inverse_views(tiny, tta):
    """restore(tta=n) equals the mean over its views of inverse(model(view(x))), each view run alone, on an odd
    non-square image (rotated views batched apart by shape), also with at most 3 views per call; 2 and 4 are the
    flips-only sets of TTA_VIEWS."""
    x = _random_image(21, 30, seed=6)
    names = inference.TTA_VIEWS[tta]
    assert names[0] == "identity" and (tta == 8 or all("flip" in n or n == "rot180" for n in names[1:]))
    with torch.no_grad():
        manual = torch.stack([dihedral_inverse(tiny(dihedral(x, VIEW_NAMES.index(n))[None])[0], VIEW_NAMES.index(n))
                              for n in names]).mean(0)
    ours = inference.restore(tiny, x, tta=tta)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert torch.allclose(ours, manual, atol=1e-5)
    if tta == 8:  # --batch_views changes memory, not the result
        assert torch.allclose(inference.restore(tiny, x, tta=tta, batch_views=3), manual, atol=1e-5)
    assert not torch.allclose(ours, inference.restore(tiny, x, tta=1), atol=1e-3), "views must matter for this model"


def test_tiled_output_is_close_to_untiled(tiny):
    """Tiles of 24 px with 8 px overlap on a 40x56 image give nearly the whole-image output (PromptIR's channel
    attention and prompts see whole-image statistics, so not exactly); an identity model is reproduced exactly,
    so the blending weights sum to one everywhere."""
    x = _random_image(40, 56, seed=8)
    whole = inference.restore(tiny, x, tta=1)
    tiled = inference.restore(tiny, x, tta=1, tile=24, overlap=8)
    assert psnr(tiled, whole) > 30 and (tiled - whole).abs().mean() < 0.02
    assert torch.allclose(inference.restore(Identity(), x, tta=8, tile=24, overlap=8), x, atol=1e-6)


def test_tiles_are_blended_without_seams():
    """A model whose output is the mean of its tile jumps by about 0.29 between neighbouring tiles of a ramp image;
    the raised-cosine blend spreads that over the overlap (no step between neighbouring pixels bigger than a third
    of it), while hard stitching (no overlap) shows the step."""
    h, w = 16, 56
    ramp = torch.linspace(0, 1, w).expand(3, h, w).contiguous()
    blended = inference.restore(TileMean(), ramp, tta=1, tile=24, overlap=8)
    hard = inference.restore(TileMean(), ramp, tta=1, tile=24, overlap=0)
    jump = 16 / 55  # tile starts 16 px apart on a ramp of slope 1/55 per pixel
    assert blended.diff(dim=-1).abs().max() < jump / 3
    assert hard.diff(dim=-1).abs().max() > jump / 2


def test_out_of_memory_retries_one_view_at_a_time_then_tiled(tiny, monkeypatch, caplog):
    """A CUDA out-of-memory error (injected at the one model call) first retries the image one view at a time,
    which gives the plain TTA result, then in tiles of half the image size, which gives the tiled result; both say
    so in a warning. When even small tiles fail, the error is raised."""
    x = _random_image(24, 32, seed=9)
    expected_views = inference.restore(tiny, x, tta=2)
    expected_tiled = inference.restore(tiny, x, tta=2, tile=16, overlap=4)
    real = inference._run_model

    def fail_when(condition):
        def run(model, batch, autocast_dtype):
            if condition(batch):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return real(model, batch, autocast_dtype)
        return run

    with caplog.at_level(logging.WARNING, logger="inference"):
        monkeypatch.setattr(inference, "_run_model", fail_when(lambda b: b.shape[0] > 1))
        assert torch.allclose(inference.restore(tiny, x, tta=2), expected_views, atol=1e-5)
        assert "one view at a time" in caplog.text and "tiles" not in caplog.text

        monkeypatch.setattr(inference, "_run_model", fail_when(lambda b: max(b.shape[-2:]) > 16))
        assert torch.allclose(inference.restore(tiny, x, tta=2), expected_tiled, atol=1e-5)
        assert "16-pixel tiles" in caplog.text

        monkeypatch.setattr(inference, "_run_model", fail_when(lambda b: True))
        with pytest.raises(torch.cuda.OutOfMemoryError, match="16-pixel tiles"):
            inference.restore(tiny, x, tta=1)


def test_bf16_autocast_is_close_to_fp32(tiny):
    """bfloat16 autocast (--bf16) stays close to the fp32 result of the tiny model: PSNR above 40 dB against it
    and no pixel off by more than 0.03."""
    x = _random_image(40, 56, seed=10)
    fp32 = inference.restore(tiny, x, tta=1)
    bf16 = inference.restore(tiny, x, tta=1, autocast_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert psnr(bf16, fp32) > 40 and (bf16 - fp32).abs().max() < 0.03


def test_write_npz_is_atomic_and_checked(tmp_path):
    """write_npz appends .npz like numpy.savez, leaves only the finished file, and refuses (writing nothing) when
    the file does not match what the inputs expect; check_npz names every missing, extra and misshapen key."""
    preds = {"0.png": np.zeros((3, 4, 5), np.uint8), "1.png": np.ones((3, 6, 7), np.uint8)}
    path = inference.write_npz(tmp_path / "pred", preds)
    assert path == tmp_path / "pred.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["pred.npz"]
    inference.check_npz(path, {"0.png": (4, 5), "1.png": (6, 7)})
    with pytest.raises(inference.PredictionFileError) as err:
        inference.check_npz(path, {"0.png": (4, 6), "2.png": (6, 7)})
    assert "missing (1): 2.png" in str(err.value) and "not expected (1): 1.png" in str(err.value)
    assert "0.png: uint8 (3, 4, 5), expected uint8 (3, 4, 6)" in str(err.value)
    with pytest.raises(inference.PredictionFileError):
        inference.write_npz(tmp_path / "other.npz", preds, expected={"0.png": (4, 5)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.npz"]
    with pytest.raises(inference.PredictionFileError, match="does not exist"):
        inference.check_npz(tmp_path / "missing.npz", {})


def test_unreadable_input_is_named_before_any_work(tmp_path, checkpoint, inputs, monkeypatch, capsys):
    """A broken image stops the command line before the model runs, with an error naming the file; no npz."""
    (inputs / "5.png").write_bytes(b"not a png")
    monkeypatch.setattr(inference, "_run_model", lambda *a: pytest.fail("the model ran despite a broken input"))
    out = tmp_path / "pred.npz"
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--output_npz", str(out),
                        "--device", "cpu", "--no_progress"])
    assert exit_info.value.code == 2
    assert "5.png" in capsys.readouterr().err and not out.exists()


def test_ema_weights_and_preset_for_foreign_checkpoints(tmp_path, tiny):
    """A checkpoint's "ema" weights are used by default (use_ema=False / --no_ema takes "model"); a bare state dict
    (no model_config, DDP prefixes) is built from --preset."""
    ema = build_model("tiny")
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.5)
    ours = tmp_path / "ours.pth"
    save_checkpoint(ours, {"model": tiny.state_dict(), "ema": ema.state_dict(), "model_config": {"preset": "tiny"}})
    weight = "output.weight"
    assert torch.equal(inference.load_model(ours).state_dict()[weight], ema.state_dict()[weight])
    assert torch.equal(inference.load_model(ours, use_ema=False).state_dict()[weight], tiny.state_dict()[weight])
    bare = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in tiny.state_dict().items()}, bare)
    loaded = inference.load_model(bare, preset="tiny")
    assert torch.equal(loaded.state_dict()[weight], tiny.state_dict()[weight])


def _scores_from_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_gt_folder_scores_match_utils(tmp_path, checkpoint, capsys):
    """With --gt_folder on homework names (rain-1.png <-> rain_clean-1.png) the table and the CSV hold, per image,
    exactly utils.psnr/utils.ssim of the npz arrays against the clean images, per type their means, and overall the
    mean over all images."""
    degraded, clean = tmp_path / "degraded", tmp_path / "clean"
    degraded.mkdir()
    clean.mkdir()
    for i, name in enumerate(["rain-1", "rain-2", "snow-1"]):
        target = _random_image(32, 40, seed=20 + i)
        _save_png(clean / f"{name.replace('-', '_clean-')}.png", target)
        _save_png(degraded / f"{name}.png", (target + 0.1 * torch.randn(target.shape)).clamp(0, 1))
    out = tmp_path / "pred.npz"
    inference.main(["--checkpoint", str(checkpoint), "--input_folder", str(degraded), "--gt_folder", str(clean),
                    "--output_npz", str(out), "--tta", "1", "--device", "cpu", "--no_progress"])
    printed = capsys.readouterr().out
    rows = _scores_from_csv(tmp_path / "pred_scores.csv")
    with np.load(out) as data:
        expected = {name: (psnr(torch.from_numpy(data[name]), read_image_uint8(clean / name.replace("-", "_clean-"))),
                           ssim(torch.from_numpy(data[name]), read_image_uint8(clean / name.replace("-", "_clean-"))))
                    for name in data.files}
    images = {r["name"]: r for r in rows if r["level"] == "image"}
    assert sorted(images) == ["rain-1.png", "rain-2.png", "snow-1.png"]
    for name, (p, s) in expected.items():
        assert float(images[name]["psnr"]) == p and float(images[name]["ssim"]) == s
        assert images[name]["type"] == name.split("-")[0]
        assert f"{p:.3f}" in printed
    by_type = {r["type"]: r for r in rows if r["level"] == "type"}
    assert float(by_type["rain"]["psnr"]) == pytest.approx((expected["rain-1.png"][0] + expected["rain-2.png"][0]) / 2)
    assert by_type["rain"]["images"] == "2" and by_type["snow"]["images"] == "1"
    overall = next(r for r in rows if r["level"] == "overall")
    assert float(overall["psnr"]) == pytest.approx(sum(p for p, _ in expected.values()) / 3)


def test_plain_paired_folder_from_shared_data(tmp_path, checkpoint, shared):
    """--data_dir on a plain paired set (two real rain100h images, cropped small, same names in degraded/ and
    clean/) restores degraded/ and scores against clean/: the type is the set's name ("set", as the training log
    names it: dataloader.degradation_type), PSNR equal to scoring.psnr."""
    source = shared("data", "rain100h")
    names = sorted(p.name for p in (source / "degraded").iterdir())[:2]
    for sub in ("degraded", "clean"):
        (tmp_path / "set" / sub).mkdir(parents=True)
        for name in names:
            Image.open(source / sub / name).convert("RGB").crop((0, 0, 48, 40)).save(tmp_path / "set" / sub / name)
    out = tmp_path / "pred.npz"
    scores = inference.main(["--checkpoint", str(checkpoint), "--data_dir", str(tmp_path / "set"),
                             "--output_npz", str(out), "--tta", "1", "--device", "cpu", "--no_progress"])
    assert [s.name for s in scores] == names and {s.kind for s in scores} == {"set"}
    assert {p.kind for p in find_pairs(tmp_path / "set")} == {"set"}
    with np.load(out) as data:
        for score in scores:
            clean = read_image_uint8(tmp_path / "set" / "clean" / score.name)
            assert score.psnr == psnr(torch.from_numpy(data[score.name]), clean)
    assert len(_scores_from_csv(tmp_path / "pred_scores.csv")) == 2 + 2  # two images, the type "set", overall


def test_missing_clean_partner_is_named_before_any_work(tmp_path, checkpoint, inputs, capsys):
    """--gt_folder without a partner for some images stops before the model runs and names those images."""
    clean = tmp_path / "clean"
    clean.mkdir()
    _save_png(clean / "0.png", _random_image(*SIZES["0.png"], seed=0))
    with pytest.raises(SystemExit):
        inference.main(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--gt_folder",
                        str(clean), "--output_npz", str(tmp_path / "pred.npz"), "--device", "cpu", "--no_progress"])
    err = capsys.readouterr().err
    assert "1.png" in err and "10.png" in err and not (tmp_path / "pred.npz").exists()


@pytest.mark.parametrize("extra, message", [(["--tile", "4"], "--tile must be at least"),
                                            (["--device", "cuda"], "CUDA is not available"),
                                            (["--compile", "--device", "cpu"], "--compile needs a CUDA device")])
def test_bad_options_fail_before_any_work(tmp_path, capsys, extra, message):
    """Inconsistent options stop with a usage error naming the fix, before the checkpoint is even read."""
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--checkpoint", str(tmp_path / "missing.pth"), "--input_folder", str(tmp_path), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_out_of_memory_fallback_blends_tiles_like_the_api(tmp_path, checkpoint, monkeypatch, capsys):
    """Without --tile, the command line's out-of-memory fallback to tiles blends them with the overlap restore()
    derives (a quarter of the 24-pixel tile: 6), as the Python API does, not with none: the npz equals restore() of
    the same model under the same failures and stays close to the whole-image result."""
    folder = tmp_path / "degraded"
    folder.mkdir()
    _save_png(folder / "0.png", _random_image(40, 56, seed=11))
    x = read_image(folder / "0.png")
    model = inference.load_model(checkpoint)
    whole = inference.restore(model, x, tta=1)
    real = inference._run_model

    def run(model, batch, autocast_dtype):
        if batch.shape[-2] * batch.shape[-1] > 24 * 24:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, batch, autocast_dtype)

    monkeypatch.setattr(inference, "_run_model", run)
    api = to_uint8(inference.restore(model, x, tta=1)).numpy()
    out = tmp_path / "pred.npz"
    inference.main(["--checkpoint", str(checkpoint), "--input_folder", str(folder), "--output_npz", str(out),
                    "--tta", "1", "--device", "cpu", "--no_progress"])
    assert "retrying in 24-pixel tiles (overlap 6)" in capsys.readouterr().err
    with np.load(out) as data:
        assert np.array_equal(data["0.png"], api)
        assert psnr(torch.from_numpy(data["0.png"]), whole) > 30


def test_images_under_the_network_minimum_are_named_before_any_work(tmp_path, checkpoint, inputs, monkeypatch,
                                                                     capsys):
    """Images narrower or lower than model.MIN_SIZE (5 px) stop the command line before the model runs, with an
    error naming each of them with its size and the minimum; a 5x5 image is accepted, with and without clean
    images."""
    _save_png(inputs / "thin.png", _random_image(30, 4, seed=12))
    _save_png(inputs / "dot.png", _random_image(3, 3, seed=13))
    monkeypatch.setattr(inference, "_run_model", lambda *a: pytest.fail("the model ran despite too small inputs"))
    out = tmp_path / "pred.npz"
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--output_npz", str(out),
                        "--device", "cpu", "--no_progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not out.exists()
    assert "2 of 6 input images are smaller than 5x5 pixels" in err
    assert f"{inputs / 'thin.png'}: 4x30 (WxH)" in err and f"{inputs / 'dot.png'}: 3x3 (WxH)" in err
    assert "0.png" not in err
    for sub in ("five", "five_clean"):
        (tmp_path / sub).mkdir()
        _save_png(tmp_path / sub / "5.png", _random_image(5, 5, seed=14))
    assert inference.scan_inputs(tmp_path / "five", tmp_path / "five_clean") == {"5.png": (5, 5)}
    _save_png(tmp_path / "five" / "4.png", _random_image(4, 9, seed=15))
    _save_png(tmp_path / "five_clean" / "4.png", _random_image(4, 9, seed=15))
    with pytest.raises(inference.DataError, match=r"4\.png: 9x4 \(WxH\)"):
        inference.scan_inputs(tmp_path / "five", tmp_path / "five_clean")


def test_images_under_the_ssim_window_are_scored_without_ssim(tmp_path, checkpoint, capsys):
    """An image under 11 px on a side gets its PSNR but SSIM NaN (n/a in the table, nan in the CSV); the SSIM means
    are over the other images, the PSNR means over all, and the CSV is written."""
    degraded, clean = tmp_path / "degraded", tmp_path / "clean"
    degraded.mkdir()
    clean.mkdir()
    for i, (name, hw) in enumerate({"a.png": (8, 20), "b.png": (32, 40)}.items()):
        _save_png(clean / name, _random_image(*hw, seed=30 + i))
        _save_png(degraded / name, _random_image(*hw, seed=40 + i))
    out = tmp_path / "pred.npz"
    scores = inference.main(["--checkpoint", str(checkpoint), "--input_folder", str(degraded), "--gt_folder",
                             str(clean), "--output_npz", str(out), "--tta", "1", "--device", "cpu", "--no_progress"])
    printed = capsys.readouterr().out
    a, b = scores
    with np.load(out) as data:
        pred = {name: torch.from_numpy(data[name]) for name in data.files}
    assert a.psnr == psnr(pred["a.png"], read_image_uint8(clean / "a.png")) and np.isnan(a.ssim)
    assert b.ssim == ssim(pred["b.png"], read_image_uint8(clean / "b.png"))
    rows = _scores_from_csv(tmp_path / "pred_scores.csv")
    assert rows[0]["name"] == "a.png" and rows[0]["ssim"] == "nan"
    overall = next(r for r in rows if r["level"] == "overall")
    assert float(overall["ssim"]) == b.ssim and float(overall["psnr"]) == pytest.approx((a.psnr + b.psnr) / 2)
    assert next(line for line in printed.splitlines() if line.startswith("a.png")).split()[-1] == "n/a"
    assert "SSIM n/a: 1 images under 11x11 pixels" in printed


def test_checkpoint_folder_stands_for_its_best_pth(tmp_path, checkpoint, inputs, tiny, caplog, capsys):
    """--checkpoint RUN_FOLDER loads RUN_FOLDER/best.pth and says so; a folder without best.pth stops with an error
    naming it and what it holds, and suggesting best.pth or last.pth."""
    with caplog.at_level(logging.INFO, logger="run"):
        model = inference.load_model(checkpoint.parent, plain=True)
    assert f"--checkpoint {checkpoint.parent} is a run folder: using its best.pth" in caplog.text
    weight = "output.weight"
    assert torch.equal(model.state_dict()[weight], tiny.state_dict()[weight])
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "last.pth", {"model": tiny.state_dict(), "model_config": {"preset": "tiny"}})
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--checkpoint", str(run), "--input_folder", str(inputs), "--output_npz",
                        str(tmp_path / "pred.npz"), "--device", "cpu", "--no_progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"checkpoint {run} is a folder without best.pth (it holds last.pth)" in err
    assert str(run / "last.pth") in err and "does not exist" not in err


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two tiny models of different weights, saved as trainer.py saves them (read only, shared by the module)."""
    folder = tmp_path_factory.mktemp("two_checkpoints")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = folder / f"model{seed}.pth"
        save_checkpoint(path, {"model": build_model("tiny").state_dict(), "model_config": {"preset": "tiny"}})
        paths.append(path)
    return paths


def test_ensemble_is_the_mean_of_its_models_outputs(tmp_path, two_checkpoints):
    """Two checkpoints restore every image as the mean of their single float outputs (over the test-time views of
    each, here the 2 of --tta 2, before rounding) to 1e-6, through restore_folder with both models, or with an
    Ensemble that holds both models or loads one at a time."""
    folder = tmp_path / "small"
    folder.mkdir()
    for i, name in enumerate(["0.png", "1.png"]):
        _save_png(folder / name, _random_image(16 + 5 * i, 24, seed=50 + i))
    singles = [inference.load_model(path) for path in two_checkpoints]
    scanned = inference.scan_inputs(folder)
    outputs = [{name: inference.restore(model, scanned.image(name), tta=2) for name in scanned} for model in singles]
    assert (outputs[0]["0.png"] - outputs[1]["0.png"]).abs().max() > 1e-3, "the models must differ"
    mean = {name: (outputs[0][name] + outputs[1][name]) / 2 for name in scanned}
    for together in (None, True, False):
        ensemble = singles if together is None else inference.Ensemble(two_checkpoints, inference.load_model,
                                                                       together=together)
        restored = dict(inference.restore_folder(ensemble, scanned, progress=False, tta=2))
        assert list(restored) == list(scanned)
        for name, out in restored.items():
            assert out.dtype == torch.float32 and torch.allclose(out, mean[name], rtol=0, atol=1e-6), (together, name)


@pytest.fixture(scope="module")
def ensemble_case(tmp_path_factory, two_checkpoints):
    """The inputs of the ensemble tests (read only) and the rounded mean of the two models' --tta 2 outputs."""
    inputs = _write_inputs(tmp_path_factory.mktemp("ensemble") / "degraded")
    singles = [inference.load_model(path) for path in two_checkpoints]
    scanned = inference.scan_inputs(inputs)
    expected = {name: to_uint8((inference.restore(singles[0], scanned.image(name), tta=2) +
                                inference.restore(singles[1], scanned.image(name), tta=2)) / 2).numpy()
                for name in scanned}
    return inputs, expected


@pytest.mark.parametrize("memory", ["plenty", "short", "one_at_a_time"])
def test_cli_ensemble_holds_its_models_as_memory_allows_and_says_so(tmp_path, two_checkpoints, ensemble_case,
                                                                     monkeypatch, capsys, caplog, memory):
    """--checkpoint a.pth b.pth writes the rounded mean of the two models and says so. With memory to spare both
    models stay loaded; when the second model's weights would take more than a quarter of the free memory (or with
    --ensemble_memory one_at_a_time) one model at a time is loaded, the first let go before the second loads, and
    the result is the same."""
    inputs, expected = ensemble_case
    size = inference.model_bytes(build_model("tiny"))
    monkeypatch.setattr(inference, "free_memory", lambda device: 100 * size if memory == "plenty" else 3 * size)
    alive, loaded_while = weakref.WeakSet(), []
    real = inference.load_model

    def tracked(*args, **kwargs):
        gc.collect()
        loaded_while.append(len(alive))
        model = real(*args, **kwargs)
        alive.add(model)
        return model

    monkeypatch.setattr(inference, "load_model", tracked)
    out = tmp_path / "pred.npz"
    extra = ["--ensemble_memory", "one_at_a_time"] if memory == "one_at_a_time" else []
    with caplog.at_level(logging.INFO, logger="inference"):
        inference.main(["--checkpoint", *map(str, two_checkpoints), "--input_folder", str(inputs), "--output_npz",
                        str(out), "--tta", "2", "--device", "cpu", "--no_progress", *extra])
    said = caplog.text
    assert "ensemble of 2 checkpoints" in said and "over 2 test-time view(s) each, in float32" in said
    if memory == "plenty":
        assert "all 2 models held on cpu at once" in said and "take at most a quarter" in said
        assert loaded_while == [0, 1]
    else:
        assert "one model at a time" in said and loaded_while == [0, 0]
        assert ("would take more than a quarter" if memory == "short" else "--ensemble_memory one_at_a_time") in said
    with np.load(out) as data:
        assert sorted(data.files) == sorted(expected)
        for name, array in expected.items():
            assert np.array_equal(data[name], array), name


def test_one_checkpoint_is_no_ensemble(tmp_path, checkpoint, inputs, caplog):
    """A single checkpoint runs as before: no ensemble, nothing said about one."""
    with caplog.at_level(logging.INFO, logger="inference"):
        inference.main(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--output_npz",
                        str(tmp_path / "pred.npz"), "--tta", "1", "--device", "cpu", "--no_progress"])
    assert "ensemble" not in caplog.text and (tmp_path / "pred.npz").is_file()
