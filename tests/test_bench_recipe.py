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
    together = tmp_path / "work" / f"run_{list(bench_recipe.RECIPES).index(bench_recipe.TOGETHER)}_seed0"
    assert len(bench_recipe.avg_checkpoints.run_snapshots(together)) == 3


def test_smoke_official_family_rows_and_reuse(tmp_path, shared):
    """The official recipe with the FFT loss gets a whole, an 8x TTA and a TLC row, with finite PSNR; run again with
    --reuse on the same folder, nothing is retrained (no training log line) and every figure is the same."""
    data = shared("data")
    name = "official + FFT loss 0.1"
    argv = ["--smoke", "--data", str(data), "--work", str(tmp_path / "work"), "--recipes", name,
            "--views", "tta", "tlc"]
    text = bench_recipe.main(argv)
    rows = [line.split("|")[1].strip() for line in text.splitlines()[2:]]
    assert rows == ["degraded input (no restoration)", name, "inference: 8x TTA", "inference: TLC"]
    figures = [[c.strip() for c in line.split("|")[5:9]] for line in text.splitlines()[2:]]
    assert all(5 < float(v) < 60 for row in figures for v in row)
    run = tmp_path / "work" / f"run_{list(bench_recipe.RECIPES).index(name)}_seed0"
    log_before = (run / "log.jsonl").read_text()
    again = bench_recipe.main([*argv, "--reuse"])
    assert [[c.strip() for c in line.split("|")[5:9]] for line in again.splitlines()[2:]] == figures
    assert (run / "log.jsonl").read_text() == log_before
