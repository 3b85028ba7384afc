"""PSNR and SSIM as the grader computes them (RGB) and as the deraining literature does (Y); tables and CSV."""
import csv
import math

import numpy as np
import pytest
import torch

import scoring


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
