"""A run folder's rules in run.py: which checkpoint a folder stands for, and the stop signals' handlers."""
import signal

import pytest

import avg_checkpoints
import first_stage_ft
import inference
import run
import trainer
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


def test_a_damaged_checkpoint_is_one_message_and_exit_2_from_every_script(data, trained, tmp_path, capsys):
    """A truncated checkpoint given to trainer.py --resume, first_stage_ft.py --checkpoint, inference.py
    --checkpoint and avg_checkpoints.py gives the same message (after the script's name) and exit 2 (a file the user
    gave is wrong; nothing was done), and no output appears."""
    damaged = tmp_path / "damaged.pth"
    whole = (trained / "last.pth").read_bytes()
    damaged.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    commands = [
        (trainer.main, ["--data_dir", data, "--resume", damaged, "--save_dir", out, "--device", "cpu"]),
        (first_stage_ft.main, ["--data_dir", data, "--checkpoint", damaged, "--save_dir", out, "--device", "cpu",
                               "--preset", "tiny", "--num_workers", 0, "--val_per_type", 1, "--no_curves"]),
        (inference.main, ["--checkpoint", damaged, "--input_folder", data / "train" / "degraded", "--output_npz",
                          out / "pred.npz", "--device", "cpu"]),
        (avg_checkpoints.main, [damaged, trained / "best.pth", "--out", out / "avg.pth"]),
    ]
    messages = set()
    for main, argv in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in argv])
        lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert exit_info.value.code == 2 and len(lines) == 1, (main.__module__, lines)
        messages.add(lines[0].split(": error: ", 1)[1])
        assert not out.exists() or not any(out.iterdir()), main.__module__
    (message,) = messages
    assert message.startswith(f"{damaged} is not a readable PyTorch checkpoint: it is damaged")
