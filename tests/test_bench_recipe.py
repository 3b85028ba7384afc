"""bench_recipe.py end to end in its smoke mode (a few real rain and snow images, two recipes)."""
from benchmarks import bench_recipe


def test_smoke_run_gives_every_row_of_the_table(tmp_path, shared):
    """The smoke run trains the original and the together recipe, restores the held-out split, and writes the table
    with the degraded-input row, the two training rows and the three inference rows of the together run (TTA, an
    ensemble of its three snapshots, their average), each with finite PSNR."""
    data = shared("data")
    out = tmp_path / "recipe.md"
    text = bench_recipe.main(["--smoke", "--data", str(data), "--out", str(out), "--work", str(tmp_path / "work"),
                              "--recipes", bench_recipe.ORIGINAL_NAME, bench_recipe.TOGETHER])
    rows = [line.split("|")[1].strip() for line in text.splitlines()[2:]]
    assert rows == ["degraded input (no restoration)", bench_recipe.ORIGINAL_NAME, bench_recipe.TOGETHER,
                    "inference: 8x TTA", "inference: ensemble of 3 snapshots, 8x TTA",
                    "inference: average of 3 snapshots, 8x TTA"]
    assert out.read_text().strip() == text.strip()
    for line in text.splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert all(float(v) == float(v) and 5 < float(v) < 60 for v in cells[4:8]), line
    assert len(bench_recipe.avg_checkpoints.run_snapshots(tmp_path / "work" / f"run_{list(bench_recipe.RECIPES).index(bench_recipe.TOGETHER)}_seed0")) == 3
