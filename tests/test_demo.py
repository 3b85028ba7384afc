"""The README's main command, `python demo.py`, end to end on the CPU: synthetic data, training, both fine-tuning
stages, 8-view TTA prediction, curves and pictures, and a restored PSNR above the degraded PSNR."""
import json

import numpy as np
import pytest

import demo
import trainer


class Stop(Exception):
    """Raised by a replaced step to end a demo early."""


def _stop(*args, **kwargs):
    raise Stop


# The demo's own code path on a smaller setting (the README's defaults: 12 epochs of 48 pairs per type at 64 px):
# every step runs as a user's `python demo.py` runs it, in this process.
SMALL = ["--epochs", "3", "--train_per_type", "12", "--test_per_type", "2", "--size", "32"]


def test_demo_runs_end_to_end_and_restores(tmp_path, capsys):
    """demo.py finishes, writes every artefact (the runs' curves included), and the restored test PSNR beats the
    degraded one for each type."""
    out = tmp_path / "demo_output"
    demo.main(["--out", str(out), *SMALL])
    stdout = capsys.readouterr().out
    result = json.loads((out / "demo.json").read_text())
    for kind in ("rain", "snow", "overall"):
        assert result["restored"][kind] > result["degraded"][kind] + 0.5, result
    with np.load(out / "pred.npz") as pred:
        names = sorted(pred.files, key=lambda n: int(n.split(".")[0]))
        assert names == [f"{i}.png" for i in range(4)]
        assert all(pred[n].dtype == np.uint8 and pred[n].shape == (3, 32, 32) for n in names)
    for stage in ("train", "ft_first", "ft_second"):
        for name in ("args.json", "log.jsonl", "last.pth", "best.pth", "curves_loss.png", "curves_psnr.png"):
            assert (out / stage / name).is_file(), f"{stage}/{name} missing"
    assert list((out / "vis").glob("grid_*.png"))
    assert "restored" in stdout and "degraded" in stdout


def test_interrupted_demo_is_replaced_but_other_folders_are_not(tmp_path, monkeypatch, capsys):
    """A demo that stops early leaves a folder the next run recognises and replaces (demo.json is written first),
    while a folder that is not a demo's is refused and left as it was."""
    out = tmp_path / "demo_output"
    monkeypatch.setattr(demo.synthetic, "make_dataset", _stop)
    with pytest.raises(Stop):
        demo.main(["--out", str(out)])
    assert json.loads((out / "demo.json").read_text()) == {"status": "running"}
    (out / "leftover").write_text("from the interrupted run")
    with pytest.raises(Stop):
        demo.main(["--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["demo.json"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(mine)])
    assert exit_info.value.code == 2 and "is not an earlier demo's output" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"


def test_one_epoch_demo_passes_the_trainers_checks(tmp_path, monkeypatch, capsys):
    """--epochs 1 gives the training step options the trainer accepts (no warm-up epoch, which must be fewer than
    the epochs); counts under 1 are refused by the demo's own parser."""
    seen = []

    def train(argv):
        args = trainer.parse_args(trainer.build_parser(), argv)
        trainer.check_args(args)  # raises ConfigError on a warm-up as long as the training
        seen.append(args)
        raise Stop

    monkeypatch.setattr(demo.synthetic, "make_dataset", lambda out, **kwargs: out.mkdir())
    monkeypatch.setattr(demo.trainer, "main", train)
    with pytest.raises(Stop):
        demo.main(["--out", str(tmp_path / "demo_output"), "--epochs", "1"])
    assert [(args.epochs, args.warmup_epochs) for args in seen] == [(1, 0)]
    for option in ("--epochs", "--train_per_type", "--test_per_type", "--threads"):
        with pytest.raises(SystemExit):
            demo.build_parser().parse_args([option, "0"])
        assert f"argument {option}: expected a positive integer, got 0" in capsys.readouterr().err
