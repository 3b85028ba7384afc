"""Metrics, checkpoint files, random state and run logs in utils.py."""
import argparse
import math
import os
import random

import numpy as np
import pytest
import torch

import run
import utils


def test_to_uint8_rounds_and_clamps():
    """Conversion rounds to nearest (not truncates) and clamps out-of-range values."""
    x = torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 254.5001 / 255, 1.0, 1.7])
    assert utils.to_uint8(x).tolist() == [0, 0, 0, 1, 255, 255, 255]
    assert utils.to_uint8(x).dtype == torch.uint8


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    """Python, NumPy and torch random states survive save_checkpoint / load_checkpoint(weights_only)."""
    utils.seed_everything(123)
    state = utils.get_rng_state()
    utils.save_checkpoint(tmp_path / "rng.pth", {"rng": state})
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    utils.set_rng_state(utils.load_checkpoint(tmp_path / "rng.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous file intact and no temporary file behind."""
    path = tmp_path / "last.pth"
    utils.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert utils.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_load_checkpoint_explains_pickle_and_missing_files(tmp_path):
    """A file needing pickle fails with a message naming it and the opt-in; trusted=True loads it."""
    path = tmp_path / "old.pth"
    torch.save({"args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(utils.CheckpointError, match="trusted=True") as err:
        utils.load_checkpoint(path)
    assert str(path) in str(err.value)
    assert utils.load_checkpoint(path, trusted=True)["args"].lr == 1e-3
    with pytest.raises(utils.CheckpointError, match="does not exist"):
        utils.load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(utils.CheckpointError, match="junk.pth"):
        utils.load_checkpoint(tmp_path / "junk.pth")


def test_load_checkpoint_mapped_equals_read_in_both_file_formats(tmp_path):
    """mmap=True gives the same entries as a full read, for the zip format (mapped) and the legacy one (read)."""
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "args": {"lr": 1e-3, "preset": "tiny"}, "epoch": 3}
    for name, zip_format in (("new.pth", True), ("legacy.pth", False)):
        torch.save(state, tmp_path / name, _use_new_zipfile_serialization=zip_format)
        mapped = utils.load_checkpoint(tmp_path / name, mmap=True)
        read = utils.load_checkpoint(tmp_path / name)
        assert mapped["args"] == read["args"] == state["args"] and mapped["epoch"] == 3
        assert torch.equal(mapped["model"]["w"], read["model"]["w"])


def test_run_log_survives_a_torn_line_and_plots(tmp_path):
    """Records read back in order, a half-written last line is ignored, and the curves are drawn as PNGs."""
    log = run.RunLog(tmp_path)
    for epoch in range(1, 4):
        log.append({"epoch": epoch, "lr": 1e-4 * epoch, "train_loss": 1.0 / epoch, "val_loss": 1.1 / epoch,
                    "val_psnr": 20.0 + epoch, "val_psnr_rain": 19.0 + epoch, "val_psnr_snow": 21.0 + epoch})
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"epoch": 4, "lr"')
    records = run.read_log(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    log.truncate_after(2)
    assert [r["epoch"] for r in run.read_log(tmp_path)] == [1, 2]
    paths = utils.plot_curves(tmp_path)
    assert sorted(p.name for p in paths) == ["curves_loss.png", "curves_lr.png", "curves_psnr.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_curves_skips_panels_without_values(tmp_path):
    """A run without validation (val_psnr logged as null) gets no empty PSNR figure."""
    log = run.RunLog(tmp_path)
    for epoch in (1, 2):
        log.append({"epoch": epoch, "lr": 1e-4, "train_loss": 0.5, "val_loss": None, "val_psnr": None})
    assert sorted(p.name for p in utils.plot_curves(tmp_path)) == ["curves_loss.png", "curves_lr.png"]


def test_random_states_saved_on_more_gpus_than_visible_restore_those_present(monkeypatch):
    """A checkpoint written where 4 GPUs were visible resumes where only 2 are: the first two states are restored by
    index and the extra ones are left alone (indexing all four raised IndexError)."""
    state = utils.get_rng_state()
    state["cuda"] = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(device, int(s[0])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.update(enumerate(range(len(states)))))
    utils.set_rng_state(state)
    assert restored == {0: 0, 1: 1}


def test_precision_resolver_takes_either_spelling_and_refuses_disagreement():
    """--precision bf16 and --bf16 are the same run; two different choices are one clear ConfigError; float16
    training needs CUDA."""
    import argparse

    parser = argparse.ArgumentParser()
    utils.add_precision_args(parser, training=True)
    cpu = torch.device("cpu")
    for argv in (["--precision", "bf16"], ["--bf16"], ["--bf16", "--precision", "bf16"]):
        args = parser.parse_args(argv)
        assert utils.resolve_precision(args, cpu, training=True) is torch.bfloat16
        assert (args.precision, args.bf16, args.fp16) == ("bf16", True, False)
    assert utils.resolve_precision(parser.parse_args([]), cpu, training=True) is None
    with pytest.raises(utils.ConfigError, match="exclude each other"):
        utils.resolve_precision(parser.parse_args(["--fp16", "--bf16"]), cpu, training=True)
    with pytest.raises(utils.ConfigError, match="disagree"):
        utils.resolve_precision(parser.parse_args(["--precision", "fp32", "--bf16"]), cpu, training=True)
    with pytest.raises(utils.ConfigError, match="needs a CUDA device"):
        utils.resolve_precision(parser.parse_args(["--fp16"]), cpu, training=True)
    assert utils.resolve_precision(parser.parse_args(["--fp16"]), cpu, training=False) is torch.float16


def test_run_cli_applies_the_one_exit_code_rule(tmp_path, capsys):
    """The rule of every entry point: what the user gave is wrong (an option, a checkpoint file, any UserError) exits
    2; the work failing (WorkError, a file-system error naming the path, out of memory) exits 1; Ctrl-C exits 130;
    each as one line and no traceback. Any other exception is a bug and keeps its traceback."""
    def fail(err):
        def fn():
            raise err
        return fn

    cases = [(utils.ConfigError("--lr must be > 0"), 2, "--lr must be > 0"),
             (utils.CheckpointError("x.pth is corrupt"), 2, "x.pth is corrupt"),
             (utils.UserError("data/a.png is unreadable"), 2, "data/a.png"),
             (utils.WorkError("the weights are no longer finite"), 1, "no longer finite"),
             (PermissionError(13, "Permission denied", str(tmp_path / "run")), 1,
              f"{tmp_path / 'run'}: permission denied"),
             (OSError(28, "No space left on device", str(tmp_path / "last.pth")), 1, "the disk is full"),
             (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), 1, "out of memory"),
             (MemoryError(), 1, "out of memory"),
             (KeyboardInterrupt(), 130, "interrupted")]
    for err, code, text in cases:
        with pytest.raises(SystemExit) as exit_info:
            utils.run_cli("prog", fail(err))
        assert exit_info.value.code == code, err
        printed = capsys.readouterr().err
        assert printed.startswith("prog: error: ") and text in printed and "Traceback" not in printed
    with pytest.raises(RuntimeError, match="a bug"):
        utils.run_cli("prog", fail(RuntimeError("a bug")))
    assert utils.run_cli("prog", lambda: 7) == 7


def test_check_output_path_is_the_one_rule_for_outputs(tmp_path):
    """An output is refused before any work when it is of the wrong kind, one of the inputs, or in a place where no
    file can be created (tested by creating one, so a read-only folder is seen even where os.access would not);
    missing folders on the way are fine."""
    (tmp_path / "file.txt").write_text("x")
    assert utils.check_output_path(tmp_path / "new" / "deeper" / "out.pth", "--out") == tmp_path / "new/deeper/out.pth"
    assert utils.check_output_path(tmp_path / "new_folder", "--save_dir", folder=True) == tmp_path / "new_folder"
    with pytest.raises(utils.ConfigError, match="--out .* is a folder, where a file is expected"):
        utils.check_output_path(tmp_path, "--out")
    with pytest.raises(utils.ConfigError, match="--save_dir .* is a file, where a folder is expected"):
        utils.check_output_path(tmp_path / "file.txt", "--save_dir", folder=True)
    with pytest.raises(utils.ConfigError, match="file.txt is a file, where a folder is expected"):
        utils.check_output_path(tmp_path / "file.txt" / "out.pth", "--out")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.txt").symlink_to(tmp_path / "file.txt")
    for other_name in (tmp_path / "sub" / ".." / "file.txt", tmp_path / "link.txt"):
        with pytest.raises(utils.ConfigError, match="is one of the inputs"):
            utils.check_output_path(other_name, "--out", inputs=[tmp_path / "file.txt"])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK) and os.geteuid() == 0:
            pytest.skip("running as root: a read-only folder is writable")
        with pytest.raises(utils.ConfigError, match="cannot write in"):
            utils.check_output_path(locked / "out.pth", "--out")
    finally:
        locked.chmod(0o700)


def test_naming_gives_a_nameless_file_system_error_its_path(tmp_path):
    """A write that fails without naming a file (a full disk during write) is reported with the path written."""
    with pytest.raises(OSError) as err:
        with utils.naming(tmp_path / "pred.npz"):
            raise OSError(28, "No space left on device")
    assert err.value.filename == str(tmp_path / "pred.npz") and err.value.errno == 28
    with pytest.raises(OSError) as err:
        with utils.naming(tmp_path / "pred.npz"):
            raise FileNotFoundError(2, "No such file", "other")
    assert err.value.filename == "other"
