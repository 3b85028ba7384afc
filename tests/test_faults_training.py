"""What goes wrong around a training run, each answered by one message that names the option or file and the fix
(exit 2 for what the user gave: options, paths, data, checkpoint files; 1 when the work fails; never a traceback),
with nothing already written lost or overwritten and no result silently wrong: numbers that are not finite or out
of range, a folder holding files of another run or in use by one, a resume with other batches, a folder that cannot
be written, a file deleted while training, temporaries of a killed checkpoint write, a full disk, a --data_dir that
is a file and a damaged --resume."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import trainer
import utils
from conftest import ROOT, assert_same_state, make_homework_set, tiny, tiny_argv, weights
from run import LOCK_NAME, read_log


def run_main(argv, capsys):
    """trainer.main(argv) as the command line runs it: (exit status, the error lines of stderr, all of stderr)."""
    try:
        trainer.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if "error:" in line], err


def resume_argv(data, run, *extra):
    return ["--data_dir", data, "--resume", run, "--num_workers", 0, "--device", "cpu", *extra]


# ------------------------------------------------------------------------------------- 1. numbers of the options
FLOAT_OPTIONS = [("--lr", "{}"), ("--weight_decay", "{}"), ("--grad_clip", "{}"), ("--ema", "{}"),
                 ("--aug_rates", "{}", "0", "0"), ("--aug_alphas", "0.5", "{}", "0.5")]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("option", FLOAT_OPTIONS, ids=[o[0] for o in FLOAT_OPTIONS])
def test_a_number_that_is_not_finite_is_refused_in_any_option_before_work(data, tmp_path, capsys, option, value):
    """--lr inf used to train (six of seven steps skipped) and write a best.pth of NaN weights; now every float
    option that is not finite ends at once with exit 2 and one line naming the option, and nothing is written."""
    code, errors, _ = run_main(tiny_argv(data, tmp_path / "run", *[o.format(value) for o in option]), capsys)
    assert code == 2 and len(errors) == 1 and f"error: {option[0]} must be a finite number" in errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (("--lr", "-1e-4"), "--lr must be above 0 and at most 1, got -0.0001"),
    (("--lr", "10"), "--lr must be above 0 and at most 1, got 10.0"),
    (("--weight_decay", "-1e-3"), "--weight_decay must be at least 0"),
    (("--weight_decay", "2e3"), "below 1 / --lr"),
    (("--grad_clip", "-1"), "--grad_clip must be at least 0"),
    (("--ema", "-5e-1"), "--ema is a decay between 0 and 1"),
    (("--aug_rates", "-1e-2", "0", "0"), "rates must each be >= 0"),
    (("--seed", "-1"), "--seed must be at least 0"),
], ids=["negative-lr", "huge-lr", "negative-decay", "decay-over-1/lr", "negative-clip", "negative-ema",
        "negative-rate", "negative-seed"])
def test_a_number_out_of_range_is_refused_by_its_range_not_by_the_parser(data, tmp_path, capsys, extra, message):
    """Negative numbers in any spelling (-1e-4 included, which argparse took for an option: "expected one
    argument") reach the range checks, which refuse them and numbers too large, naming the option."""
    code, errors, _ = run_main(tiny_argv(data, tmp_path / "run", *extra), capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert "expected one argument" not in errors[0]
    assert not (tmp_path / "run").exists()


def test_weights_that_became_non_finite_are_never_written_as_best(data, tmp_path, monkeypatch, capsys):
    """An update that leaves non-finite weights (in epoch 2 here) ends the run at the epoch's end with exit 1 and
    one message; best.pth and last.pth keep epoch 1's finite weights (without validation, best.pth followed
    last.pth whatever they held)."""
    original, calls = trainer.Update._step, []

    def poisoning(self, *args):
        result = original(self, *args)
        calls.append(1)
        if len(calls) == 4:  # the first update of epoch 2
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(trainer.Update, "_step", poisoning)
    run = tmp_path / "run"
    code, errors, _ = run_main(tiny_argv(data, run, "--val_per_type", 0), capsys)
    assert code == 1 and len(errors) == 1 and "the weights are no longer finite after update 6 (epoch 2)" in errors[0]
    for name in ("best.pth", "last.pth"):
        saved = utils.load_checkpoint(run / name)
        assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values())
    assert [r["epoch"] for r in read_log(run)] == [1]


def test_validation_outputs_that_are_not_finite_give_no_psnr(data, tmp_path):
    """Non-finite outputs would score as black images (uint8 rounding), a PSNR that looks real: validation gives
    none for them, so the epoch cannot become the best."""
    t = trainer.Trainer(tiny(data, tmp_path / "run"))
    t.loss_fn = lambda pred, gt, epoch: (pred * float("nan")).mean()
    record = t.validate()
    assert "val_psnr" not in record and record["val_loss"] != record["val_loss"]


# ------------------------------------------------------------------------------ 2. a folder holding another run
def test_a_folder_holding_any_file_of_a_run_is_refused_unless_resumed(data, tmp_path, capsys):
    """A run folder whose last.pth is gone but which holds best.pth and log.jsonl used to take a new run that
    overwrote the old best and appended to the old log (epochs 1, 2, 1). Any file of a run (args.json, log.jsonl,
    last.pth, best.pth, snapshots) now refuses a new run, leaving the files as they were; the message says how to
    continue (from best.pth here), and that works."""
    run = tmp_path / "run"
    trainer.train(tiny(data, run, "--val_per_type", 0))  # best.pth follows last.pth: both are epoch 2
    (run / "last.pth").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, errors, _ = run_main(tiny_argv(data, run, "--val_per_type", 0), capsys)
    assert code == 2 and len(errors) == 1
    assert "already holds a run (args.json, best.pth, log.jsonl)" in errors[0]
    assert f"--resume {run / 'best.pth'}" in errors[0]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    for name in ("args.json", "log.jsonl", "last.pth", "best.pth", "snapshots"):
        other = tmp_path / f"holding_{name}"
        other.mkdir()
        (other / name).mkdir() if name == "snapshots" else (other / name).write_text("{}")
        with pytest.raises(trainer.ConfigError, match=f"already holds a run \\({name}\\)"):
            trainer.check_args(tiny(data, other))
    result = trainer.train(trainer.parse_args(trainer.build_parser(),
                                              [str(a) for a in resume_argv(data, run / "best.pth", "--epochs", 3)]))
    assert result.epoch == 3 and [r["epoch"] for r in read_log(run)] == [1, 2, 3]


# -------------------------------------------------------------------------------- 3. a folder in use by a run
LOCK_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
import run
with run.folder_lock({folder!r}):
    print("LOCKED", flush=True)
    time.sleep(120)
"""


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_killed_run_leaves_no_lock(data, tmp_path, capsys):
    """Two runs started into one empty --save_dir used to interleave their logs and overwrite each other's
    checkpoints. While another process holds the folder's lock (as a run does from its start to its end) a run
    there is refused with the holder's process id and writes nothing; once that process is killed with SIGKILL the
    folder is free again."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(root=str(ROOT), folder=str(run))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        argv = tiny_argv(data, run, "--epochs", 1, "--warmup_epochs", 0)
        code, errors, _ = run_main(argv, capsys)
        assert code == 2 and len(errors) == 1
        assert f"{run} is in use by another training run (process {holder.pid})" in errors[0]
        assert [p.name for p in run.iterdir()] == [LOCK_NAME]
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    code, _, _ = run_main(argv, capsys)
    assert code == 0 and utils.load_checkpoint(run / "last.pth")["epoch"] == 1


# ---------------------------------------------------------------------------- 4. a resume with other batches
def test_resuming_inside_an_epoch_with_other_batches_is_refused_with_the_reason(data, tmp_path, monkeypatch, capsys):
    """A run stopped after 2 of its epoch's 3 updates (micro-batches of 2, 2 per update) resumed with --batch_size
    1 or --accum_steps 1 used to skip the first 2 updates of the new layout (4 or 2 images instead of 8) in
    silence. It is refused, naming what changed; resumed as it was started, it continues."""
    run = tmp_path / "run"
    t = trainer.Trainer(tiny(data, run))
    original = t._take_step

    def stop_after_the_first(group, stop):
        result = original(group, stop)
        stop.signum = signal.SIGTERM  # the second update sees it and the run stops after it
        return result

    monkeypatch.setattr(t, "_take_step", stop_after_the_first)
    assert t.fit().step == 2
    before = (run / "last.pth").read_bytes()
    for extra, changed in ((("--batch_size", 1), "--batch_size 2, not 1"),
                           (("--accum_steps", 1), "--accum_steps 2, not 1")):
        code, errors, _ = run_main(resume_argv(data, run, *extra), capsys)
        assert code == 2 and len(errors) == 1 and changed in errors[0] and "skip or repeat images" in errors[0]
    assert (run / "last.pth").read_bytes() == before
    code, _, _ = run_main(resume_argv(data, run), capsys)
    assert code == 0 and utils.load_checkpoint(run / "last.pth")["step"] == 6


# ---------------------------------------------------------------------- 5. a folder that cannot be written
def test_a_save_dir_that_cannot_be_written_is_refused_before_the_data_are_read(data, tmp_path, monkeypatch, capsys):
    """--save_dir under a regular file, or in a folder without write permission (simulated: the tests run as
    root), used to fail after the data check with a PermissionError; it is refused first, naming the path."""
    def read_data(*args, **kwargs):
        raise AssertionError("the data were read before the run folder was checked")

    monkeypatch.setattr(trainer, "build_loaders", read_data)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, errors, _ = run_main(tiny_argv(data, blocker / "run"), capsys)
    assert code == 2 and len(errors) == 1 and f"{blocker} is a file, where a folder is expected" in errors[0]
    locked = tmp_path / "locked"
    locked.mkdir()
    temporary = tempfile.TemporaryFile

    def refuse_in_locked(*args, dir=None, **kwargs):  # the check creates a file: refuse it there, as a mode would
        if dir is not None and Path(dir) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(locked))
        return temporary(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse_in_locked)
    code, errors, _ = run_main(tiny_argv(data, locked / "run"), capsys)
    assert code == 2 and len(errors) == 1 and f"cannot write in {locked} (Permission denied)" in errors[0]
    assert not (locked / "run").exists() and blocker.read_text() == "not a folder"


# ------------------------------------------------------------------- 6. a file deleted while training runs
def test_a_file_deleted_while_training_with_workers_saves_last_and_names_it(tmp_path, monkeypatch, capsys):
    """Training images deleted after the first update, with a loader worker: the run ends with exit 1 and one line
    naming a deleted file (no worker traceback), last.pth holds the state after the last finished update, and once
    the files are back the resumed run ends with the weights of a run that was never interrupted."""
    data = make_homework_set(tmp_path / "data", per_kind=6, size=24)
    shutil.copytree(data, tmp_path / "copy")
    extra = ("--num_workers", 1, "--accum_steps", 1, "--val_per_type", 0)
    trainer.train(trainer.parse_args(trainer.build_parser(), [str(a) for a in tiny_argv(data, tmp_path / "a",
                                                                                         *extra)]))
    original = trainer.Trainer._take_step

    def delete_after_the_first(self, group, stop):
        result = original(self, group, stop)
        if self.state.step == 0:
            for path in (data / "train" / "degraded").iterdir():
                path.unlink()
        return result

    monkeypatch.setattr(trainer.Trainer, "_take_step", delete_after_the_first)
    run = tmp_path / "run"
    code, errors, _ = run_main(tiny_argv(data, run, *extra), capsys)
    assert code == 1 and len(errors) == 1, errors
    assert f"{data / 'train' / 'degraded'}" in errors[0] and "does not exist" in errors[0]
    assert f"--resume {run}" in errors[0]
    saved = utils.load_checkpoint(run / "last.pth")
    assert saved["epoch"] == 0 and 1 <= saved["step"] < 5
    monkeypatch.setattr(trainer.Trainer, "_take_step", original)
    shutil.rmtree(data / "train" / "degraded")
    shutil.copytree(tmp_path / "copy" / "train" / "degraded", data / "train" / "degraded")
    code, errors, _ = run_main(resume_argv(data, run, "--num_workers", 1), capsys)
    assert code == 0, errors
    assert_same_state(weights(run / "last.pth"), weights(tmp_path / "a" / "last.pth"))


# ---------------------------------------------------------------- 7. temporaries of a killed checkpoint write
def test_temporaries_of_a_killed_checkpoint_write_are_removed_at_the_next_start(data, tmp_path, capsys):
    """A SIGKILL during a checkpoint write leaves a hidden .NAME.XXXX.tmp beside it (hundreds of MB for the official
    model) that nothing removed. The next run in the folder removes those of its own files (snapshots included)
    and says so; other files, temporaries of other names included, stay."""
    run = tmp_path / "run"
    trainer.Trainer(tiny(data, run)).fit(until_epoch=1)
    stale = [run / ".last.pth.k2j3h4_x.tmp", run / ".best.pth.abcd1234.tmp", run / ".args.json.q9w8e7r6.tmp",
             run / "snapshots" / ".epoch_0002.pth.z1y2x3w4.tmp"]
    kept = [run / ".notes.txt.abcd1234.tmp", run / ".last.pth.tmp", run / "mine.tmp", run / "snapshots" / "x.tmp"]
    (run / "snapshots").mkdir()
    for path in stale + kept:
        path.write_bytes(b"\0" * 4096)
    code, _, err = run_main(resume_argv(data, run), capsys)
    assert code == 0 and "removed 3 unfinished temporary file(s) of an interrupted write" in err
    assert "removed 1 unfinished temporary file(s) of an interrupted write: .epoch_0002.pth.z1y2x3w4.tmp" in err
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


# ----------------------------------------------------------------------------------------------- and further
def test_a_full_disk_while_writing_last_keeps_the_previous_one_and_says_so(data, tmp_path, monkeypatch, capsys):
    """torch.save failing with ENOSPC while writing epoch 2's last.pth: exit 1 with one line naming the file, saying
    the disk is full and that the previous last.pth is unchanged; it is, byte for byte, and no temporary is left."""
    run = tmp_path / "run"
    trainer.Trainer(tiny(data, run)).fit(until_epoch=1)
    before = (run / "last.pth").read_bytes()

    def full_disk(obj, file, *args, **kwargs):
        file.write(b"the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    code, errors, _ = run_main(resume_argv(data, run), capsys)
    assert code == 1 and len(errors) == 1
    assert f"{run / 'last.pth'} could not be written (the disk is full)" in errors[0] and "unchanged" in errors[0]
    assert (run / "last.pth").read_bytes() == before
    assert not list(run.glob(".*.tmp"))


def test_a_data_dir_that_is_a_file_and_a_damaged_resume_are_named(data, tmp_path, capsys):
    """--data_dir naming a file: exit 2, "is not a folder". --resume of a truncated last.pth or of a file of
    garbage: exit 2 (a checkpoint file the user gave), one line naming it as not a readable checkpoint; the folder is
    left as it was."""
    (tmp_path / "data.txt").write_text("not a folder")
    code, errors, _ = run_main(tiny_argv(tmp_path / "data.txt", tmp_path / "r"), capsys)
    assert code == 2 and len(errors) == 1 and "--data_dir" in errors[0] and "is not a folder" in errors[0]
    run = tmp_path / "run"
    trainer.Trainer(tiny(data, run)).fit(until_epoch=1)
    whole = (run / "last.pth").read_bytes()
    for damaged in (whole[: len(whole) // 2], b"\x00garbage" * 100):
        (run / "last.pth").write_bytes(damaged)
        code, errors, _ = run_main(resume_argv(data, run), capsys)
        assert code == 2 and len(errors) == 1 and f"{run / 'last.pth'} is not a readable PyTorch checkpoint" in \
            errors[0]
        assert (run / "last.pth").read_bytes() == damaged
