"""A run folder's rules in run.py: which checkpoint a folder stands for, and the stop signals' handlers."""
import signal

import pytest

import run
import utils


def test_a_run_folder_stands_for_its_checkpoint_the_same_way_everywhere(tmp_path):
    """A file is itself; a run folder is its best.pth (prediction, fine-tuning) or its last.pth (resume), saying
    which; a folder without the file asked for, or a missing path, is refused as a checkpoint problem (exit 2)
    naming what the folder holds and the other file when it exists."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "last.pth").write_bytes(b"x")
    assert run.checkpoint_file(folder / "last.pth") == folder / "last.pth"
    assert run.checkpoint_file(folder, prefer=run.LAST, option="--resume") == folder / "last.pth"
    with pytest.raises(utils.CheckpointError, match=r"--checkpoint .*run is a folder without best.pth \(it holds "
                                                    r"last.pth\).*--checkpoint .*last.pth uses its last.pth"):
        run.checkpoint_file(folder)
    (folder / "best.pth").write_bytes(b"x")
    assert run.checkpoint_file(folder) == folder / "best.pth"
    with pytest.raises(utils.CheckpointError, match="--resume .*missing does not exist") as err:
        run.checkpoint_file(tmp_path / "missing", prefer=run.LAST, option="--resume")
    assert err.value.exit_code == 2


def test_stop_request_restores_the_handlers_it_found_and_leaves_an_ignored_signal_ignored():
    """Whatever handlers the process started with, StopRequest handles SIGTERM while it lasts and puts back exactly
    what it found; a signal found ignored (SIGINT in a job a non-interactive shell started in the background) stays
    ignored, as Python itself decides for SIGINT, and is not turned into a stop."""
    found = {sig: signal.getsignal(sig) for sig in run.StopRequest.SIGNALS}
    try:
        for start in (signal.SIG_IGN, signal.default_int_handler):
            signal.signal(signal.SIGINT, start)
            with run.StopRequest() as stop:
                assert signal.getsignal(signal.SIGTERM) == stop._handle
                assert signal.getsignal(signal.SIGINT) == (signal.SIG_IGN if start is signal.SIG_IGN else stop._handle)
            assert signal.getsignal(signal.SIGINT) == start
            assert signal.getsignal(signal.SIGTERM) == found[signal.SIGTERM]
    finally:
        for sig, handler in found.items():
            signal.signal(sig, handler)
