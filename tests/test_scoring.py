"""PSNR and SSIM as the grader computes them (RGB) and as the deraining literature does (Y); tables and CSV."""
import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

import scoring
from dataloader import DataError


def test_psnr_matches_a_hand_computation_on_uint8():
    """PSNR equals 10 log10(255^2 / MSE) on the uint8-rounded images, per image, and inf when equal."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 8, 8, generator=g)
    b = (a + 0.05 * torch.randn(2, 3, 8, 8, generator=g)).clamp(0, 1)
    qa = np.round(a.numpy() * 255).astype(np.float64)
    qb = np.round(b.numpy() * 255).astype(np.float64)
    expected = [10 * math.log10(255**2 / np.mean((qa[i] - qb[i]) ** 2)) for i in range(2)]
    assert scoring.psnr_per_image(a, b) == pytest.approx(expected, abs=1e-9)
    assert scoring.psnr(a, b) == pytest.approx(sum(expected) / 2, abs=1e-9)
    assert scoring.psnr(a[0], a[0]) == float("inf")
    # values that round to the same byte score as identical: the grader sees bytes
    assert scoring.psnr(torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), 0.5 + 0.1 / 255)) == float("inf")


def test_psnr_rejects_mismatched_shapes():
    """A shape mismatch is an error, not a silent broadcast."""
    with pytest.raises(ValueError, match="differ in shape"):
        scoring.psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 9))


def test_ssim_on_constant_images_matches_the_closed_form():
    """For constant images the variances vanish and SSIM is (2ab + C1) / (a^2 + b^2 + C1)."""
    a, b = 100, 140
    x = torch.full((3, 16, 16), a, dtype=torch.uint8)
    y = torch.full((3, 16, 16), b, dtype=torch.uint8)
    c1 = (0.01 * 255) ** 2
    assert scoring.ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    assert scoring.ssim(x, x) == pytest.approx(1.0)


def test_ssim_falls_with_noise():
    """More noise, lower SSIM."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 32, generator=g)
    n = torch.randn(1, 3, 32, 32, generator=g)
    s1 = scoring.ssim(x, (x + 0.02 * n).clamp(0, 1))
    s2 = scoring.ssim(x, (x + 0.2 * n).clamp(0, 1))
    assert 1.0 > s1 > s2


def _scores_from_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table_shows_type_rows_only_for_several_types(tmp_path):
    """A set with one type ("all": no homework names) gets a single mean row, the overall one; several types get
    one row each and the overall one. The CSV keeps the type row either way."""
    one = [scoring.Score("1.png", "all", 20.0, 0.5), scoring.Score("2.png", "all", 22.0, 0.7)]
    table = scoring.format_table(one).splitlines()
    assert [line.split()[3:] for line in table if line.startswith("mean of")] == [["overall", "21.000", "0.6000"]]
    rows = _scores_from_csv(scoring.write_csv(tmp_path / "scores.csv", one))
    assert [(r["level"], r["type"]) for r in rows[2:]] == [("type", "all"), ("overall", "")]
    two = [scoring.Score("rain-1.png", "rain", 20.0, 0.5), scoring.Score("snow-1.png", "snow", 22.0, 0.7)]
    table = scoring.format_table(two).splitlines()
    assert [line.split()[3] for line in table if line.startswith("mean of")] == ["rain", "snow", "overall"]


def test_write_csv_is_atomic(tmp_path, monkeypatch):
    """An interrupt while the scores are being written leaves the previous CSV as it was and no other file."""
    path = tmp_path / "scores.csv"
    scoring.write_csv(path, [scoring.Score("1.png", "all", 20.0, 0.5)])
    before = path.read_bytes()

    def interrupted(scores):
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring, "summarize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scoring.write_csv(path, [scoring.Score("2.png", "all", 30.0, 0.9)])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["scores.csv"]


def _hand_y(rgb):
    """MATLAB rgb2ycbcr's Y of a uint8 RGB array (3, H, W), in float: 16 + (65.481 R + 128.553 G + 24.966 B) / 255."""
    r, g, b = rgb.astype(np.float64)
    return 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255


def _hand_ssim(x, y):
    """SSIM of two float64 planes by explicit windows: every 11x11 window weighted by the normalised Gaussian of
    sigma 1.5, its weighted means, variances and covariance, averaged over the window positions."""
    k = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(k, k) / np.outer(k, k).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb, cov = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_y_channel_metrics_match_a_hand_computation():
    """PSNR Y and SSIM Y are those of the Rain100L/H papers: MATLAB rgb2ycbcr's Y of the uint8 images kept in float,
    PSNR with peak 255, SSIM on that one channel. Checked on a known pair (black against pure red: Y 16 against
    16 + 65.481) in closed form, and on a random pair against numpy by explicit windows."""
    black = torch.zeros(3, 12, 12, dtype=torch.uint8)
    red = black.clone()
    red[0] = 255
    assert scoring.psnr_y(black, red) == pytest.approx(20 * math.log10(255 / 65.481), abs=1e-9)
    a, b, c1 = 16.0, 16 + 65.481, (0.01 * 255) ** 2
    assert scoring.ssim_y(black, red) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (3, 13, 15), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-30, 31, x.shape), 0, 255).astype(np.uint8)
    yx, yy = _hand_y(x), _hand_y(y)
    assert scoring.psnr_y(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(
        10 * math.log10(255**2 / np.mean((yx - yy) ** 2)), abs=1e-9)
    assert scoring.ssim_y(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(_hand_ssim(yx, yy), abs=1e-9)
    # float inputs are rounded to bytes first, as for the RGB metrics; Y itself is not rounded
    as_float = torch.from_numpy(x).float() / 255
    assert scoring.psnr_y(as_float, torch.from_numpy(y)) == scoring.psnr_y(torch.from_numpy(x), torch.from_numpy(y))
    assert scoring.luma(torch.tensor([[[[1.0]], [[2.0]], [[3.0]]]])).item() == pytest.approx(
        16 + (65.481 + 2 * 128.553 + 3 * 24.966) / 255, abs=1e-12)


def test_y_and_rgb_differ_where_the_colour_does():
    """A change of colour that keeps the luma within rounding scores far higher on Y than on RGB: the two are
    different metrics, which is why both are reported."""
    x = torch.full((3, 16, 16), 128, dtype=torch.uint8)
    y = x.clone()
    y[0], y[2] = 148, 76  # R up 20, B down 52: 65.481 * 20 - 24.966 * 52 = 11 (0.04 on Y's scale)
    assert scoring.psnr_y(x, y) > 70 > 30 > scoring.psnr(x, y)


class _Pairs:
    def __init__(self, clean, kinds):
        self._clean, self._kinds = clean, kinds

    def kind(self, name):
        return self._kinds[name]

    def clean(self, name):
        return self._clean[name]


def test_table_and_csv_label_rgb_and_y_scores(tmp_path):
    """evaluate fills both kinds of scores; the table labels its columns "PSNR RGB", "SSIM RGB", "PSNR Y", "SSIM Y"
    and the CSV has psnr/ssim (RGB) and psnr_y/ssim_y columns, each the scoring function's value, means per type and
    overall."""
    rng = np.random.default_rng(4)
    clean = {f"{k}-1.png": torch.from_numpy(rng.integers(0, 256, (3, 16, 20), dtype=np.uint8))
             for k in ("rain", "snow")}
    preds = {n: np.clip(c.numpy().astype(int) + rng.integers(-9, 10, c.shape), 0, 255).astype(np.uint8)
             for n, c in clean.items()}
    scores = scoring.evaluate(preds, _Pairs(clean, {n: n.split("-")[0] for n in clean}))
    for s in scores:
        p, c = torch.from_numpy(preds[s.name]), clean[s.name]
        assert (s.psnr, s.ssim, s.psnr_y, s.ssim_y) == (scoring.psnr(p, c), scoring.ssim(p, c), scoring.psnr_y(p, c),
                                                        scoring.ssim_y(p, c))
        assert s.psnr_y != s.psnr
    table = scoring.format_table(scores).splitlines()
    assert table[0].split()[2:] == ["PSNR", "RGB", "SSIM", "RGB", "PSNR", "Y", "SSIM", "Y"]
    rain = next(line for line in table if line.startswith("rain-1.png")).split()
    assert rain[2:] == [f"{scores[0].psnr:.3f}", f"{scores[0].ssim:.4f}", f"{scores[0].psnr_y:.3f}",
                        f"{scores[0].ssim_y:.4f}"]
    assert any("Y: BT.601 luma" in line for line in table)
    rows = _scores_from_csv(scoring.write_csv(tmp_path / "scores.csv", scores))
    assert list(rows[0]) == ["level", "name", "type", "images", "psnr", "ssim", "psnr_y", "ssim_y"]
    assert float(rows[0]["psnr_y"]) == scores[0].psnr_y and float(rows[1]["ssim_y"]) == scores[1].ssim_y
    overall = rows[-1]
    assert overall["level"] == "overall" and float(overall["psnr_y"]) == pytest.approx((scores[0].psnr_y +
                                                                                         scores[1].psnr_y) / 2)


def test_find_clean_refuses_two_clean_files_of_one_stem_as_training_does(tmp_path):
    """--gt_folder holding rain_clean-1.png beside rain_clean-1.tif is refused, naming both files, as find_pairs
    refuses that folder in training (scoring used one of them silently); one file per stem pairs as before."""
    clean = tmp_path / "clean"
    clean.mkdir()
    for name in ("rain_clean-1.png", "rain_clean-1.tif", "rain_clean-2.png"):
        Image.new("RGB", (8, 8)).save(clean / name)
    with pytest.raises(DataError) as err:
        scoring.find_clean(["rain-1.png", "rain-2.png"], clean)
    assert "rain_clean-1.png and rain_clean-1.tif share one name" in str(err.value)
    (clean / "rain_clean-1.tif").unlink()
    assert scoring.find_clean(["rain-1.png", "rain-2.png"], clean) == {"rain-1.png": clean / "rain_clean-1.png",
                                                                      "rain-2.png": clean / "rain_clean-2.png"}
