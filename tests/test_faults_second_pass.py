"""Issue 17, the reliability pass's second round: what a hostile user gives is checked where it enters, and each bad
case ends in one line and exit code 1 or 2, or runs correctly. One test per class of fault (a checkpoint's own
description, non-finite or meta weights, numbers at the edge of their type, data and outputs told apart, a resume
on other pairs, two predictions into one file, a decompression bomb for synthetic.py), each showing the case that
failed before its fix. Everything runs in-process on a tiny model and 16-pixel images; one run and one weights file
are shared by the whole file."""
import fcntl
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import avg_checkpoints
import first_stage_ft
import inference
import synthetic
import trainer
import utils
from conftest import make_homework_set
from model import build_model
from run import read_log

SIZE = 16


def make_set(root, *, per_kind=4, seed=0):
    """A homework-layout set (train/degraded + train/clean) of ``per_kind`` random rain and snow pairs."""
    return make_homework_set(root, per_kind=per_kind, size=SIZE, seed=seed)


def train_argv(data, run, *extra):
    """A tiny CPU run on conftest's data (1 pair per kind for validation, 5 updates per epoch)."""
    return ["--data_dir", data, "--save_dir", run, "--preset", "tiny", "--device", "cpu", "--num_workers", 0,
            "--batch_size", 2, "--accum_steps", 1, "--epochs", 2, "--warmup_epochs", 1, "--patch_size", 8,
            "--val_per_type", 1, "--lr", 1e-3, "--no_curves", *extra]


@pytest.fixture
def stopped_run(trained):
    """conftest's finished 2-epoch run (shared by the session; copy it before changing it): resumed with --epochs 3
    it has an epoch left."""
    return trained


def resume_argv(data, run):
    return ["--data_dir", data, "--resume", run, "--device", "cpu", "--num_workers", 0, "--epochs", 3]


@pytest.fixture(scope="session")
def weights_state():
    torch.manual_seed(0)
    return build_model("tiny").state_dict()


@pytest.fixture
def weights_file(tmp_path, weights_state):
    """Write a plain weights checkpoint of the tiny model; ``change(checkpoint)`` may alter it first."""
    def write(name="w.pth", change=None, state=None):
        checkpoint = {"model": dict(state if state is not None else weights_state), "model_config": {"preset": "tiny"}}
        if change is not None:
            change(checkpoint)
        path = tmp_path / name
        utils.save_checkpoint(path, checkpoint)
        return path
    return write


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def cli(main, argv, capsys, *, whole=False):
    """A command as its user meets it: (exit code, its one error line, or with ``whole`` all of stderr). No
    traceback, at most one error line."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == (code != 0), err
    return code, err if whole else errors[0] if errors else ""


def infer(argv, capsys, **kwargs):
    return cli(inference.main, [*argv, "--device", "cpu", "--no_progress", "--tta", "1"], capsys, **kwargs)


def copy_run(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


# --------------------------------------------------------------------- 1. a checkpoint's own description
DESCRIPTIONS = {"unknown preset": {"preset": "huge"}, "unknown key": {"preset": "tiny", "window": 8},
                "unknown network": {"arch": "swinir", "preset": "tiny"},
                "wrong kind of value": {"preset": "tiny", "dim": "8"}, "not a dict": "tiny"}


@pytest.mark.parametrize("script", ["inference", "avg_checkpoints", "first_stage_ft"])
@pytest.mark.parametrize("config", DESCRIPTIONS.values(), ids=DESCRIPTIONS.keys())
def test_a_checkpoints_own_model_description_is_checked_where_it_is_read(script, config, weights_file, inputs, data,
                                                                         tmp_path, capsys):
    """A model_config with an unknown preset or network, an unknown key (as a newer version might write), a value of
    the wrong kind or no dict at all gave a traceback (ValueError, TypeError) in all three scripts; now one line naming the
    file and its model_config, exit 2 (a checkpoint the user gave), and nothing written."""
    bad = weights_file("bad.pth", change=lambda c: c.update(model_config=config))
    if script == "inference":
        code, error = infer(["--checkpoint", bad, "--input_folder", inputs, "--output_npz", tmp_path / "p.npz"],
                            capsys)
    elif script == "avg_checkpoints":
        good = weights_file("good.pth")
        code, error = cli(avg_checkpoints.main, [good, bad, "--out", tmp_path / "avg.pth"], capsys)
    else:
        code, error = cli(first_stage_ft.main, train_argv(data, tmp_path / "ft", "--checkpoint", bad), capsys)
    assert code == 2 and str(bad) in error and "model_config" in error, error
    assert not (tmp_path / "p.npz").exists() and not (tmp_path / "avg.pth").exists()
    assert not (tmp_path / "ft" / "last.pth").exists()


def test_a_resume_whose_weights_hold_an_extra_key_is_refused_naming_it(stopped_run, data, tmp_path, capsys):
    """A last.pth whose "model" holds one key the network does not have went through model.load_state_dict: a
    traceback. Now it goes through the tolerant loader: one message naming the file, listing the key (the loader's
    listing of keys that do not fit, as for every checkpoint); the file is left as it was."""
    run = copy_run(stopped_run, tmp_path)
    checkpoint = utils.load_checkpoint(run / "last.pth")
    checkpoint["model"]["stray.weight"] = torch.zeros(1)
    utils.save_checkpoint(run / "last.pth", checkpoint)
    before = (run / "last.pth").read_bytes()
    code, error = cli(trainer.main, resume_argv(data, run),
                      capsys, whole=True)
    assert code == 2 and str(run / "last.pth") in error and "unexpected (1):\n    stray.weight" in error, error
    assert "other sizes" not in error  # one stray key is no sign of another preset
    assert (run / "last.pth").read_bytes() == before


def test_weights_on_the_meta_device_are_refused_naming_the_file(weights_file, inputs, tmp_path, capsys):
    """Weights saved from PyTorch's meta device (shapes without values) gave 146 lines of traceback; now one line
    naming the checkpoint."""
    meta = weights_file("meta.pth", change=lambda c: c.update(model={k: torch.empty_like(v, device="meta")
                                                                     for k, v in c["model"].items()}))
    code, error = infer(["--checkpoint", meta, "--input_folder", inputs, "--output_npz", tmp_path / "p.npz"], capsys)
    assert code == 2 and str(meta) in error and "meta" in error, error
    assert not (tmp_path / "p.npz").exists()


# --------------------------------------------------------------------------- 2. weights that are not finite
def _poison(checkpoint):
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name] = torch.full_like(checkpoint["model"][name], float("nan"))


def test_weights_that_are_not_finite_are_refused_where_they_are_loaded(weights_file, inputs, data, tmp_path,
                                                                       capsys):
    """avg_checkpoints.py averaged a checkpoint holding NaN into a file of NaN weights and exited 0; inference.py
    blamed the first image ("non-finite values for ...png"); fine-tuning spent its updates skipping steps. Now each
    names the checkpoint, exits 2 and writes nothing."""
    good, bad = weights_file("good.pth"), weights_file("nan.pth", change=_poison)
    code, error = cli(avg_checkpoints.main, [good, bad, "--out", tmp_path / "avg.pth"], capsys)
    assert code == 2 and str(bad) in error and "not finite" in error, error
    assert not (tmp_path / "avg.pth").exists()
    code, error = infer(["--checkpoint", bad, "--input_folder", inputs, "--output_npz", tmp_path / "p.npz"], capsys)
    assert code == 2 and str(bad) in error and "not finite" in error and ".png" not in error, error
    assert not (tmp_path / "p.npz").exists()
    code, error = cli(first_stage_ft.main, train_argv(data, tmp_path / "ft", "--checkpoint", bad), capsys)
    assert code == 2 and str(bad) in error and "not finite" in error, error
    assert not (tmp_path / "ft" / "last.pth").exists()


# --------------------------------------------------------------------- 3. numbers at the edge of their type
@pytest.mark.parametrize("seed", [2**64, 2**64 - 1, 2**63])
def test_a_seed_the_random_generators_cannot_take_is_refused_before_work(seed, data, tmp_path, capsys):
    """--seed 2**64 gave a traceback at start; --seed 2**64-1 trained one epoch, then the sampler's seed + epoch
    overflowed. Every seed above 2**63-1 is now refused before any work, naming the range."""
    code, error = cli(trainer.main, train_argv(data, tmp_path / "r", "--seed", seed), capsys)
    assert code == 2 and "--seed" in error and str(2**63 - 1) in error, error
    assert not (tmp_path / "r").exists()


def test_the_largest_seed_and_a_learning_rate_below_the_floor_train_and_resume(data, tmp_path, capsys, caplog):
    """The largest seed accepted (2**63-1) trains past its first epoch after a resume (the sampler's seed + epoch
    fits), and --lr 1e-7, below the cosine's former floor of 1e-6, never climbs above itself: the floor comes down,
    and the log says so."""
    run = tmp_path / "r"
    argv = train_argv(data, run, "--seed", 2**63 - 1, "--lr", 1e-7, "--accum_steps", 2)
    with caplog.at_level("INFO"):
        trainer.train(trainer.build_parser().parse_args([str(a) for a in argv]), until_epoch=1)
    assert "it decays to 1e-08, a tenth of the peak" in caplog.text
    code, _ = cli(trainer.main, ["--data_dir", data, "--resume", run, "--device", "cpu", "--num_workers", 0], capsys)
    assert code == 0
    records = read_log(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0 < r["lr"] <= 1e-7 for r in records), [r["lr"] for r in records]
    assert records[-1]["lr"] < 1e-7  # it still decays


def test_the_schedule_never_rises_above_the_peak_for_any_lr():
    """The learning rate of every update is at most the peak asked for, whatever --lr is (the floor used to be a
    fixed 1e-6)."""
    for peak in (1e-9, 1e-7, 1e-6, 5e-6, 2e-4):
        floor = trainer.schedule_floor(peak)
        lrs = [trainer.lr_at(s, peak_lr=peak, warmup_steps=2, total_steps=20, min_lr=floor) for s in range(25)]
        assert max(lrs) <= peak * (1 + 1e-12) and lrs[-1] == pytest.approx(floor) and floor < peak
    assert trainer.schedule_floor(2e-4) == trainer.MIN_LR  # the recipe's schedule is unchanged


# --------------------------------------------------------------------------- 4. data and outputs told apart
def _plain_set(root):
    """A plain paired set: root/degraded and root/clean with identical file names."""
    rng = np.random.default_rng(2)
    for side in ("degraded", "clean"):
        (root / side).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / side / f"{i}.png")
    return root


def test_restored_images_never_overwrite_a_data_sets_clean_images(weights_file, tmp_path, capsys):
    """--save_images SET/clean with --input_folder SET/degraded overwrote the set's clean images (data lost, and
    later scores read inf). Now refused before any work, naming the set; the clean images are unchanged."""
    ckpt, data = weights_file(), _plain_set(tmp_path / "set")
    before = {p.name: p.read_bytes() for p in (data / "clean").iterdir()}
    code, error = infer(["--checkpoint", ckpt, "--input_folder", data / "degraded", "--save_images", data / "clean",
                         "--output_npz", tmp_path / "p.npz"], capsys)
    assert code == 2 and "--save_images" in error and str(data / "clean") in error, error
    assert {p.name: p.read_bytes() for p in (data / "clean").iterdir()} == before


def test_a_clean_folder_linked_to_the_degraded_folder_is_refused(tmp_path, capsys):
    """train/clean as a link to train/degraded trained every image against itself without a word; now one line
    saying the two halves are one folder, exit 2 (a data error), no run written."""
    data = make_set(tmp_path / "data", per_kind=2)
    shutil.rmtree(data / "train" / "clean")
    for path in (data / "train" / "degraded").iterdir():  # the homework names of the clean half, as links
        kind, number = path.stem.split("-")
        os.symlink(path.name, data / "train" / "degraded" / f"{kind}_clean-{number}.png")
    os.symlink("degraded", data / "train" / "clean")
    code, error = cli(trainer.main, train_argv(data, tmp_path / "r", "--val_per_type", 0), capsys)
    assert code == 2 and "same folder" in error and str(data / "train" / "clean") in error, error
    assert not (tmp_path / "r" / "last.pth").exists()


def test_a_run_folder_inside_the_data_folder_is_refused(tmp_path, capsys):
    """A --save_dir inside --data_dir was accepted, and its curve pictures joined the data set on the next run."""
    data = make_set(tmp_path / "data", per_kind=2)
    code, error = cli(trainer.main, train_argv(data, data / "train" / "runs", "--val_per_type", 0), capsys)
    assert code == 2 and "--save_dir" in error and "inside --data_dir" in error, error
    assert not (data / "train" / "runs").exists()


@pytest.mark.parametrize("name", ["log.jsonl", "args.json", "last.pth"])
def test_a_score_table_never_replaces_a_runs_file(name, stopped_run, weights_file, tmp_path, capsys):
    """--csv RUN/log.jsonl replaced a run's log with a CSV; now any file of a run folder is refused as an output,
    before any work, and stays as it was."""
    run, ckpt, data = copy_run(stopped_run, tmp_path), weights_file(), _plain_set(tmp_path / "set")
    before = (run / name).read_bytes()
    code, error = infer(["--checkpoint", ckpt, "--data_dir", data, "--csv", run / name,
                         "--output_npz", tmp_path / "p.npz"], capsys)
    assert code == 2 and "--csv" in error and str(run / name) in error, error
    assert (run / name).read_bytes() == before and not (tmp_path / "p.npz").exists()


# ------------------------------------------------------------------------------ 5. a resume on other pairs
def test_a_resume_on_a_data_set_whose_pair_names_differ_is_refused_saying_what_changed(stopped_run, tmp_path,
                                                                                      capsys):
    """Renaming one pair kept the count, so the resume was accepted and a training image could become the
    validation image (best.pth chosen by that leak). Now the checkpoint records the pairs' names and a resume on
    other names is refused, naming what was added and what is gone."""
    run = copy_run(stopped_run, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(json.loads((run / "args.json").read_text())["data_dir"], data)
    for side, old, new in (("degraded", "rain-2.png", "rain-9.png"), ("clean", "rain_clean-2.png",
                                                                       "rain_clean-9.png")):
        os.replace(data / "train" / side / old, data / "train" / side / new)
    before = (run / "last.pth").read_bytes()
    code, error = cli(trainer.main, resume_argv(data, run),
                      capsys)
    assert code == 2 and "rain-9.png" in error and "rain-2.png" in error, error
    assert (run / "last.pth").read_bytes() == before


def test_a_resume_on_the_same_pairs_elsewhere_is_accepted(stopped_run, tmp_path):
    """The recorded names are relative to --data_dir: the same set copied to another place resumes."""
    run = copy_run(stopped_run, tmp_path)
    data = tmp_path / "moved"
    shutil.copytree(json.loads((run / "args.json").read_text())["data_dir"], data)
    args, resumed = trainer.command_line(trainer.build_parser(), [str(a) for a in resume_argv(data, run)])
    assert trainer.Trainer(args, resumed=resumed).state.epoch == 2  # accepted: the run is restored, ready to go on


# ----------------------------------------------------------------------------- 6. two predictions, one file
def test_a_prediction_file_being_written_by_another_run_is_refused(weights_file, tmp_path, capsys):
    """Two runs into one pred.npz could leave the npz of one model beside the score CSV of the other, both exiting
    0. Each output is now held under a lock for the whole run: while another process holds it, a second run exits 2
    before any work, and the files already there are left as they were."""
    ckpt, data = weights_file(), _plain_set(tmp_path / "set")
    npz = tmp_path / "pred.npz"
    argv = ["--checkpoint", ckpt, "--data_dir", data, "--output_npz", npz]
    code, _ = infer(argv, capsys)
    assert code == 0
    before = npz.read_bytes(), (tmp_path / "pred_scores.csv").read_bytes()
    with open(tmp_path / ".pred.npz.lock", "a") as held:  # what another inference.py run holds while it works
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, error = infer(argv, capsys)
    assert code == 2 and str(npz) in error and "another" in error, error
    assert (npz.read_bytes(), (tmp_path / "pred_scores.csv").read_bytes()) == before
    code, _ = infer(argv, capsys)  # and once it is let go, the next run writes
    assert code == 0 and not (tmp_path / ".pred.npz.lock").exists()


# ---------------------------------------------------------------------------- 7. synthetic.py's photographs
def test_a_decompression_bomb_among_the_clean_photographs_is_named(tmp_path, monkeypatch, capsys):
    """synthetic.py --clean_dir holding an image Pillow refuses as a decompression bomb gave a traceback
    (DecompressionBombError); now one line naming it, exit 2, nothing written."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 64)).save(photos / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 is then more than twice the limit
    code, error = cli(synthetic.main, ["--out", tmp_path / "out", "--clean_dir", photos, "--train_per_type", 1,
                                       "--test_per_type", 1, "--size", 16], capsys)
    assert code == 2 and str(photos / "bomb.png") in error, error
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ---------------------------------------------------------------------------------------- messages that mislead
def test_a_bare_state_dict_of_another_preset_names_the_preset_that_fits(weights_state, inputs, tmp_path, capsys):
    """A bare state dict of the tiny preset, read as the official size, gave 46 lines of shape mismatches and never
    said --preset tiny; the patch embedding's width tells which preset fits, and the message now says so."""
    path = tmp_path / "bare.pth"
    torch.save(weights_state, path)
    code, error = infer(["--checkpoint", path, "--input_folder", inputs, "--output_npz", tmp_path / "p.npz"], capsys)
    assert code == 2 and "--preset tiny" in error, error


def test_no_ema_on_a_checkpoint_holding_only_ema_weights_is_refused(weights_state, inputs, tmp_path, capsys):
    """--no_ema on a checkpoint that holds EMA weights only silently used the EMA weights; now it says there are
    no plain weights in it."""
    path = tmp_path / "ema_only.pth"
    utils.save_checkpoint(path, {"ema": dict(weights_state), "model_config": {"preset": "tiny"}})
    code, error = infer(["--checkpoint", path, "--input_folder", inputs, "--output_npz", tmp_path / "p.npz",
                         "--no_ema"], capsys)
    assert code == 2 and str(path) in error and "--no_ema" in error, error


def test_avg_checkpoints_names_the_file_of_other_sizes_and_says_what_it_averages(weights_file, tmp_path, capsys,
                                                                                caplog):
    """avg_checkpoints.py with a file whose weights have other shapes did not name it; the same file given twice was
    averaged silently. Now the file is named, and a repeated file is refused."""
    good = weights_file("good.pth")
    wide = weights_file("wide.pth", change=lambda c: c["model"].update(
        {"patch_embed.proj.weight": torch.zeros(16, 3, 3, 3)}))
    code, error = cli(avg_checkpoints.main, [good, wide, "--out", tmp_path / "avg.pth"], capsys)
    assert code == 2 and str(wide) in error, error
    code, error = cli(avg_checkpoints.main, [good, good, "--out", tmp_path / "avg.pth"], capsys)
    assert code == 2 and "more than once" in error and str(good) in error, error
    assert not (tmp_path / "avg.pth").exists()


def test_the_dataset_written_by_synthetic_py_is_complete_or_absent_on_sigterm(tmp_path, monkeypatch, capsys):
    """SIGTERM during synthetic.py left a hidden half-made data set that nothing removed (Ctrl-C cleaned it up): the
    signal now ends the command as Ctrl-C does, removing it, and says which signal stopped it."""
    import signal

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the work")  # pragma: no cover
    monkeypatch.setattr(synthetic, "_save_png", terminated)
    def ignore(*args):
        pass
    previous = signal.signal(signal.SIGTERM, ignore)  # never the default here: it would end pytest
    try:
        code, error = cli(synthetic.main, ["--out", tmp_path / "out", "--train_per_type", 1, "--test_per_type", 1,
                                           "--size", 16], capsys)
        assert signal.getsignal(signal.SIGTERM) is ignore  # the handler it found is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130 and "interrupted (SIGTERM)" in error, error
    assert list(tmp_path.iterdir()) == []


def test_a_second_sigterm_to_a_training_run_is_said_as_sigterm_not_ctrl_c(monkeypatch, capsys):
    """A second SIGTERM (one that quits at once, without saving) was reported as "interrupted (Ctrl-C)"; it is now
    named as the signal it is, still with exit 130."""
    import signal
    import run
    monkeypatch.setattr(run.StopRequest, "REPEAT_S", 0.0)
    stop = run.StopRequest()
    stop._handle(signal.SIGTERM, None)  # the first asks to stop after the update in flight
    with pytest.raises(SystemExit) as exit_info:
        utils.run_cli("trainer.py", lambda: stop._handle(signal.SIGTERM, None))
    assert exit_info.value.code == 130 and "interrupted (SIGTERM)" in capsys.readouterr().err


def _stopping_run(data, run, monkeypatch, where):
    """A tiny run that gets SIGTERM during its first update (``where="update"``) or its first validation batch."""
    import signal
    args = trainer.build_parser().parse_args([str(a) for a in train_argv(data, run, "--batch_size", 1,
                                                                         "--val_per_type", 2)])
    t = trainer.Trainer(args)
    sent = []
    if where == "update":
        loss_fn = t.update.loss_fn

        def loss(*a):
            if not sent:
                sent.append(os.kill(os.getpid(), signal.SIGTERM))
            return loss_fn(*a)
        t.update.loss_fn = loss
    else:
        def scored(*a, **k):
            if not sent:
                sent.append(os.kill(os.getpid(), signal.SIGTERM))
            return original(*a, **k)
        original = trainer.scoring.psnr_per_image
        monkeypatch.setattr(trainer.scoring, "psnr_per_image", scored)
    return t.fit()


def test_a_stop_during_an_update_ends_the_run_after_that_update(data, tmp_path, monkeypatch):
    """The stop flag was read when an update started, so SIGTERM during an update cost one more update; now the run
    stops at the end of the update in flight, and last.pth holds the state after it."""
    result = _stopping_run(data, tmp_path / "r", monkeypatch, "update")
    assert result.signal is not None and result.step == 1
    assert utils.load_checkpoint(tmp_path / "r" / "last.pth")["step"] == 1


def test_a_stop_during_validation_skips_the_rest_and_starts_no_next_epoch(data, tmp_path, monkeypatch):
    """SIGTERM during validation cost the whole validation plus an update of the next epoch; now the rest of the
    validation is skipped (said in the log), last.pth holds the finished epoch and no update of the next one, and
    the resume continues from there."""
    result = _stopping_run(data, tmp_path / "r", monkeypatch, "validation")
    records = read_log(tmp_path / "r")
    assert result.signal is not None and result.epoch == 1 and len(records) == 1
    assert records[0]["val_skipped"] is True and records[0]["val_psnr"] is None
    assert utils.load_checkpoint(tmp_path / "r" / "last.pth")["step"] == records[0]["step"]


def test_a_torchscript_or_safetensors_file_gets_one_message_and_no_library_warning(inputs, tmp_path, capsys):
    """A TorchScript file leaked torch.load's warning with its file path, then a long message about weights_only; a
    safetensors file got two contradicting fixes. Each now gets one line saying what the file is and what to do."""
    scripted = tmp_path / "scripted.pth"
    torch.jit.save(torch.jit.trace(torch.nn.Conv2d(3, 3, 1), torch.zeros(1, 3, 4, 4)), scripted)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    safetensors = tmp_path / "w.safetensors"
    safetensors.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    for path, what in ((scripted, "TorchScript"), (safetensors, "safetensors")):
        code, err = infer(["--checkpoint", path, "--input_folder", inputs, "--output_npz", tmp_path / "p.npz"], capsys,
                          whole=True)
        assert code == 2 and err.count("\n") == 1 and str(path) in err and what in err, err


def test_library_warnings_reach_the_user_without_their_file_paths(capsys):
    """A library's warning (the DataLoader's on --num_workers 64, torch.load's) showed the library's file path and
    source line; it now shows its kind and message only."""
    import logging
    import warnings
    with warnings.catch_warnings():  # pytest records warnings: route them as a command's set-up does
        warnings.simplefilter("always")
        logging.captureWarnings(False)
        utils.setup_logging()
        warnings.warn_explicit("This DataLoader will create 64 worker processes", UserWarning,
                               "/site-packages/torch/utils/data/dataloader.py", 1)
        logging.captureWarnings(False)
    err = capsys.readouterr().err
    assert "warning: UserWarning: This DataLoader will create 64 worker processes" in err, err
    assert "site-packages" not in err


# ------------------------------------------------------------------------------ checks that came after the work
def test_file_names_too_long_for_the_file_system_are_refused_before_the_work(weights_file, tmp_path, monkeypatch,
                                                                            capsys):
    """A very long --output_npz, or an input whose PNG name under --save_images is too long once the temporary
    name is made of it, failed after the work naming a hidden temporary; now refused before any work."""
    ckpt, folder = weights_file(), tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (SIZE, SIZE)).save(folder / ("x" * 240 + ".png"))
    monkeypatch.setattr(inference, "_run_model", lambda *a: pytest.fail("the model ran before the error"))
    code, error = infer(["--checkpoint", ckpt, "--input_folder", folder, "--output_npz",
                         tmp_path / ("p" * 240 + ".npz")], capsys)
    assert code == 2 and "--output_npz" in error and "shorten it" in error, error
    code, error = infer(["--checkpoint", ckpt, "--input_folder", folder, "--output_npz", tmp_path / "p.npz",
                         "--save_images", tmp_path / "out"], capsys)
    assert code == 2 and "--save_images" in error and "shorten it" in error, error
    assert not (tmp_path / "p.npz").exists()


# --------------------------------------------------------------------------------------------- silent choices
def test_the_first_frame_of_a_multi_page_image_is_said(tmp_path, caplog):
    """The first frame of a multi-page TIFF (or an animated WebP) was used without a word; now it is said once."""
    from dataloader import read_image
    path = tmp_path / "pages.tif"
    Image.new("RGB", (SIZE, SIZE)).save(path, save_all=True, append_images=[Image.new("RGB", (SIZE, SIZE), "red")])
    with caplog.at_level("WARNING"):
        read_image(path)
        read_image(path)
    said = [r.getMessage() for r in caplog.records if "frames" in r.getMessage()]
    assert len(said) == 1 and str(path) in said[0] and "only the first is used" in said[0], said


def test_patch_size_beside_progressive_and_a_tiny_tile_are_said(data, weights_file, tmp_path, caplog):
    """--progressive ignored --patch_size and --tile 5 ran 26 times slower, both without a word; each is said now."""
    args = trainer.build_parser().parse_args([str(a) for a in train_argv(data, tmp_path / "r", "--progressive",
                                                                         "8:2:2")])
    with caplog.at_level("WARNING"):
        trainer.check_args(args)
        parsed = inference.build_parser().parse_args(["--checkpoint", str(weights_file()), "--input_folder",
                                                      str(tmp_path),
                                                      "--tile", "8", "--device", "cpu",
                                                      "--output_npz", str(tmp_path / "p.npz")])
        inference._resolve_args(parsed)
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert "--patch_size 8 is not used" in said and "--tile 8 is small" in said, said


def test_curves_of_a_log_without_training_records_are_refused(tmp_path, capsys):
    """utils.py RUN on a log holding epochs but nothing to draw exited 0 and drew nothing, saying nothing."""
    (tmp_path / "log.jsonl").write_text('{"epoch": 1}\n')
    code, error = cli(utils.main, [tmp_path], capsys)
    assert code == 2 and "no loss, PSNR or learning rate" in error, error


def test_fine_tuning_takes_no_ema_as_the_log_advises(weights_state, data, tmp_path):
    """The fine-tuning log advised --no_ema for the plain weights of an EMA checkpoint, an option the fine-tuning
    scripts refused; they take it now, and start from the plain weights."""
    torch.manual_seed(1)
    plain = build_model("tiny").state_dict()
    path = tmp_path / "ema.pth"
    utils.save_checkpoint(path, {"model": plain, "ema": dict(weights_state), "model_config": {"preset": "tiny"}})
    argv = [str(a) for a in train_argv(data, tmp_path / "ft", "--checkpoint", path, "--plain")]
    for flags, expected in (([], weights_state), (["--no_ema"], plain)):
        model = trainer.Trainer(first_stage_ft.build_parser().parse_args(argv + flags)).model
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_avg_checkpoints_says_when_a_run_holds_fewer_snapshots_than_asked(weights_file, tmp_path, capsys, caplog):
    """--run R --last 5 with two snapshots averaged the two without a word; it now says so."""
    run = tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    for epoch in (1, 2):
        shutil.copy(weights_file(f"w{epoch}.pth"), run / "snapshots" / f"epoch_{epoch:04d}.pth")
    with caplog.at_level("WARNING"):
        code, _ = cli(avg_checkpoints.main, ["--run", run, "--last", 5, "--out", tmp_path / "avg.pth"], capsys)
    assert code == 0 and "holds 2 snapshot(s), fewer than --last 5" in caplog.text


# ------------------------------------------------------------------------------------------------------ the demo
def test_the_demo_into_a_link_an_interrupted_step_and_a_rerun_over_a_users_files(tmp_path, monkeypatch, capsys,
                                                                                 caplog):
    """demo.py --out LINK said "Cannot call rmtree on a symbolic link" twice, naming no path; an interrupted step
    advised a --resume the demo does not have; a rerun into an earlier demo's folder removed the user's own files
    there without naming them. Now: the link is refused naming it (exit 2), a stopped step ends the demo with the
    step's exit code and "run demo.py again", and the files removed with an earlier demo are named."""
    import demo
    target = tmp_path / "earlier"
    target.mkdir()
    (target / "demo.json").write_text("{}")
    (tmp_path / "link").symlink_to(target)
    code, error = cli(demo.main, ["--out", tmp_path / "link"], capsys)
    assert code == 2 and str(tmp_path / "link") in error and "is a link" in error, error
    assert (target / "demo.json").exists()

    def stopped(argv):
        raise SystemExit(130)
    monkeypatch.setattr(demo.synthetic, "make_dataset", lambda out, **kwargs: out.mkdir())
    monkeypatch.setattr(demo.trainer, "main", stopped)
    (target / "notes.txt").write_text("mine")
    with caplog.at_level("WARNING"):
        code, error = cli(demo.main, ["--out", target], capsys)
    assert code == 130 and "step 2/6" in error and "run demo.py again" in error, error
    assert "notes.txt" in caplog.text


def test_sigterm_during_the_start_up_data_check_ends_with_one_line(data, tmp_path, monkeypatch, capsys):
    """SIGTERM while the trainer checked its data (before the loop) killed it without a word; now one line, exit
    130, and no run files."""
    import signal

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the data check")  # pragma: no cover

    def ignore(*args):
        pass
    monkeypatch.setattr(trainer, "build_loaders", terminated)
    previous = signal.signal(signal.SIGTERM, ignore)  # never the default here: it would end pytest
    try:
        code, error = cli(trainer.main, train_argv(data, tmp_path / "r"), capsys)
        assert signal.getsignal(signal.SIGTERM) is ignore
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130 and "interrupted (SIGTERM)" in error, error
    assert not (tmp_path / "r" / "last.pth").exists()


def test_vis_draws_a_tall_strip_pillow_opens_and_leaves_no_earlier_grids(tmp_path):
    """vis.py on a 6x3000 strip wrote a 640 x 320,100 picture that Pillow itself refuses to open, and left the
    previous run's extra grids beside the new one. Now a panel is at most four times as tall as wide, and the grids
    of an earlier run are removed (files named grid_N.png only)."""
    import vis
    folder = tmp_path / "in"
    folder.mkdir()
    strip = np.random.default_rng(0).integers(0, 255, (3000, 6, 3), dtype=np.uint8)
    Image.fromarray(strip).save(folder / "strip.png")
    np.savez(tmp_path / "pred.npz", **{"strip.png": strip.transpose(2, 0, 1)})
    out = tmp_path / "vis"
    out.mkdir()
    for name in ("grid_2.png", "mine.png"):
        (out / name).write_bytes(b"earlier")
    written = vis.main(["--pred_npz", str(tmp_path / "pred.npz"), "--input_folder", str(folder), "--out_dir",
                        str(out)])
    assert [p.name for p in written] == ["grid_1.png"] and sorted(p.name for p in out.iterdir()) == ["grid_1.png",
                                                                                                     "mine.png"]
    with Image.open(written[0]) as picture:
        assert picture.width * picture.height < Image.MAX_IMAGE_PIXELS
        picture.load()


def test_seed_of_the_sampler_fits_every_epoch_of_the_largest_seed():
    """The sampler takes seed + epoch: at the largest accepted seed every epoch's order is drawn."""
    from dataloader import SeededSampler
    sampler = SeededSampler(list(range(4)), seed=trainer.MAX_SEED)
    sampler.set_epoch(10**6)
    assert sorted(i for i, _ in sampler) == [0, 1, 2, 3]
