"""Broken run folders and checkpoint files get one message naming the file, never a traceback (utils.py)."""
import argparse
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

import run
import utils

ROOT = Path(__file__).resolve().parents[1]


def curves(run_dir, capsys, monkeypatch):
    """``python utils.py RUN_DIR`` as a user runs it (the file executed as ``__main__``, a second copy of the module
    beside the ``utils`` that run.py imports), in this process: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "utils.py"), str(run_dir)])
    try:
        runpy.run_path(str(ROOT / "utils.py"), run_name="__main__")
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "empty folder", "half-written", "empty log", "not epoch records"])
def test_curves_of_a_broken_run_folder_are_one_message(tmp_path, case, capsys):
    """An empty or half-written folder, an empty log.jsonl, or records that are not epoch objects: one line naming
    the file, exit 2 (what the user gave is not a run folder with epochs; FileNotFoundError / ValueError / TypeError
    / KeyError tracebacks before)."""
    folder = tmp_path / "run"
    if case != "missing":
        folder.mkdir()
    if case == "half-written":
        (folder / "args.json").write_text("{}")
    if case == "empty log":
        (folder / "log.jsonl").write_text("")
    if case == "not epoch records":
        (folder / "log.jsonl").write_text('[1, 2]\n"text"\n{"step": 3}\n{"epoch": "one"}\n')
    with pytest.raises(SystemExit) as exit_info:
        utils.main([str(folder)])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert stderr.count("error:") == 1 and str(folder) in stderr, stderr


def test_curves_skip_stray_lines_and_draw_the_epochs(tmp_path, capsys, monkeypatch):
    """``python utils.py RUN_DIR`` as a user runs it (the script is its own __main__): lines that are not epoch
    records are skipped with a warning, the epochs around them are drawn; a missing folder is one line, exit 2."""
    folder = tmp_path / "run"
    folder.mkdir()
    good = [{"epoch": e, "train_loss": 1.0 / e, "lr": 1e-4, "val_psnr": 20.0 + e} for e in (1, 2)]
    (folder / "log.jsonl").write_text(json.dumps(good[0]) + "\n[1]\n" + json.dumps(good[1]) + "\n")
    code, err = curves(folder, capsys, monkeypatch)
    assert code == 0, err
    assert "skipped 1 line(s)" in err and (folder / "curves_loss.png").is_file()
    assert [r["epoch"] for r in run.read_log(folder)] == [1, 2]
    code, err = curves(tmp_path / "missing", capsys, monkeypatch)
    assert code == 2 and err.count("error:") == 1 and str(tmp_path / "missing") in err, err


def test_a_corrupt_file_is_not_called_a_pickled_one(tmp_path):
    """A random file named .pth is damaged or foreign, not "stores Python objects": no --trust_checkpoint advice.
    A file that does store Python objects still gets that advice."""
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 64)
    with pytest.raises(utils.CheckpointError) as info:
        utils.load_checkpoint(garbage)
    assert "damaged" in str(info.value) and "trust" not in str(info.value) and str(garbage) in str(info.value)
    pickled = tmp_path / "pickled.pth"
    torch.save({"args": argparse.Namespace(lr=1e-4)}, pickled)
    with pytest.raises(utils.CheckpointError, match="need pickle.*--trust_checkpoint"):
        utils.load_checkpoint(pickled)
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.zeros(1000)}, tmp_path / "whole.pth")
    truncated.write_bytes((tmp_path / "whole.pth").read_bytes()[:500])
    with pytest.raises(utils.CheckpointError, match="damaged"):
        utils.load_checkpoint(truncated)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(utils.CheckpointError, match="empty"):
        utils.load_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(utils.CheckpointError, match="not a file"):
        utils.load_checkpoint(tmp_path)


def test_stale_temporaries_of_our_naming_are_removed_and_nothing_else(tmp_path):
    """A SIGKILL mid-write leaves .NAME.XXXX.tmp; the cleanup removes exactly those of the names it is given."""
    stale = [tmp_path / ".last.pth.abc123.tmp", tmp_path / ".best.pth.x_y.tmp"]
    kept = [tmp_path / "last.pth", tmp_path / ".other.pth.abc.tmp", tmp_path / "notes.tmp", tmp_path / ".last.pth"]
    for path in stale + kept:
        path.write_bytes(b"x")
    removed = run.remove_stale_temporaries(tmp_path, ["last.pth", "best.pth"])
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
