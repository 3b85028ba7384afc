"""A user's mistake or a broken file meets inference.py and vis.py: one message naming the file or option and the
fix, no traceback, nothing already written lost, no result silently wrong."""
import errno
import os

import numpy as np
import pytest
import torch

import inference
import vis
from dataloader import read_image
from model import build_model
from test_inference import SIZES, _random_image, _save_png
from utils import save_checkpoint, to_uint8


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture
def checkpoint(tmp_path, tiny):
    path = tmp_path / "best.pth"
    save_checkpoint(path, {"model": tiny.state_dict(), "model_config": {"preset": "tiny"}})
    return path


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "degraded"
    folder.mkdir()
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        _save_png(folder / name, _random_image(h, w, i))
    return folder


@pytest.fixture
def no_model_run(monkeypatch):
    """Fail the test if the network runs: the error must come before any work."""
    monkeypatch.setattr(inference, "_run_model", lambda *a: pytest.fail("the model ran before the error"))


def run(argv, capsys):
    """inference.main as a user meets it: the exit code and stderr (a traceback would escape as an exception)."""
    with pytest.raises(SystemExit) as exit_info:
        inference.main([*argv, "--device", "cpu", "--no_progress", "--tta", "1"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("inference.py: error:") == 1, err
    return exit_info.value.code, err


def one_message(err):
    """The message of ``err`` without the program's name."""
    assert err.startswith("inference.py: error: ") or err.startswith("vis.py: error: "), err
    return err.split("error: ", 1)[1]


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------- output paths
@pytest.mark.parametrize("name", ["pred.npz", "out"])
def test_output_npz_that_is_a_folder_is_refused_before_any_work(tmp_path, checkpoint, inputs, no_model_run, capsys,
                                                                 name):
    """--output_npz naming an existing folder stops before the model runs (IsADirectoryError after every image was
    restored before, or for a folder without .npz a silent out.npz beside it), suggesting a file in it."""
    folder = tmp_path / name
    folder.mkdir()
    code, err = run(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--output_npz", str(folder)],
                    capsys)
    assert code == 2 and f"--output_npz {folder} is a folder" in err and str(folder / "pred.npz") in err
    assert files_in(folder) == [] and not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("option, kind", [("--output_npz", "under a file"), ("--csv", "folder"),
                                          ("--csv", "under a file"), ("--save_images", "file"),
                                          ("--save_images", "under a file")])
def test_every_output_path_is_checked_before_any_work(tmp_path, checkpoint, inputs, no_model_run, capsys, option,
                                                      kind):
    """--csv and --save_images are checked like --output_npz before the model runs: a folder where a file goes, a
    file where a folder goes, or a path through a file (which no write can create) is named with the fix."""
    clean = tmp_path / "clean"
    clean.mkdir()
    for name, (h, w) in SIZES.items():
        _save_png(clean / name, _random_image(h, w, 7))
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file")
    target = {"folder": tmp_path / "scores", "file": blocker, "under a file": blocker / "sub" / "x.csv"}[kind]
    if kind == "folder":
        target.mkdir()
    argv = ["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--gt_folder", str(clean),
            "--output_npz", str(tmp_path / "pred.npz"), option, str(target)]
    code, err = run(argv, capsys)
    assert code == 2 and f"{option} {target}" in err
    expected = {"folder": "is a folder, where a file is expected", "file": "is a file, where a folder is expected",
                "under a file": f"{blocker} is a file, where a folder is expected"}[kind]
    assert expected in err
    assert blocker.read_text() == "a file" and not (tmp_path / "pred.npz").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, checkpoint, inputs, no_model_run, capsys):
    """A folder without write permission is named before the work, not after it."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = run(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--output_npz",
                         str(locked / "pred.npz")], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2 and f"cannot write in {locked}" in err


def test_outputs_never_overwrite_the_checkpoint_or_the_inputs(tmp_path, checkpoint, inputs, no_model_run, capsys):
    """--csv naming the checkpoint, --csv naming an input image, and --save_images naming the input folder (whose
    PNGs it would overwrite) are refused before any work; every file stays as it was."""
    clean = tmp_path / "clean"
    clean.mkdir()
    for name, (h, w) in SIZES.items():
        _save_png(clean / name, _random_image(h, w, 7))
    before = {p: p.read_bytes() for p in [checkpoint, *inputs.iterdir(), *clean.iterdir()]}
    common = ["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--output_npz",
              str(tmp_path / "pred.npz")]
    code, err = run([*common, "--gt_folder", str(clean), "--csv", str(checkpoint)], capsys)
    assert code == 2 and f"--csv {checkpoint} is one of the inputs ({checkpoint})" in err
    code, err = run([*common, "--gt_folder", str(clean), "--csv", str(clean / "0.png")], capsys)
    assert code == 2 and f"--csv {clean / '0.png'} is one of the inputs ({clean / '0.png'})" in err
    code, err = run([*common, "--save_images", str(inputs)], capsys)
    assert code == 2 and f"--save_images {inputs} is one of the inputs ({inputs})" in err
    assert {p: p.read_bytes() for p in before} == before and not (tmp_path / "pred.npz").exists()


# ------------------------------------------------------------------------------------------- interrupts, disks
def test_ctrl_c_is_one_line_exit_130_and_leaves_no_partial_file(tmp_path, checkpoint, inputs, monkeypatch, capsys):
    """Ctrl-C while the second image is restored: one line (no KeyboardInterrupt traceback), exit 130, the previous
    pred.npz unchanged and no temporary file beside it."""
    out = tmp_path / "pred.npz"
    out.write_bytes(b"previous run")
    calls = []

    def interrupted(model, batch, autocast_dtype):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return model(batch).float()

    monkeypatch.setattr(inference, "_run_model", interrupted)
    code, err = run(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--output_npz", str(out)],
                    capsys)
    assert code == 130 and "interrupted" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"previous run" and files_in(tmp_path) == ["best.pth", "degraded", "pred.npz"]


def test_disk_full_while_writing_keeps_the_previous_pred_npz(tmp_path, checkpoint, inputs, monkeypatch, capsys):
    """The disk filling up while pred.npz is written (OSError ENOSPC from numpy.savez, which names no file): one
    message naming pred.npz and the fix, exit 1, the previous pred.npz intact and no temporary file left."""
    out = tmp_path / "pred.npz"
    inference.write_npz(out, {"old.png": np.zeros((3, 5, 5), np.uint8)})
    before = out.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    code, err = run(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--output_npz", str(out)],
                    capsys)
    assert code == 1 and f"{out}: the disk is full" in err
    assert out.read_bytes() == before and files_in(tmp_path) == ["best.pth", "degraded", "pred.npz"]


# ----------------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("member", [False, True])
def test_a_damaged_checkpoint_exits_2_alone_or_in_an_ensemble(tmp_path, checkpoint, inputs, no_model_run, capsys,
                                                              damage, member):
    """A random file named .pth or a truncated checkpoint, given alone (--checkpoint X) or as a member of an ensemble
    (--checkpoint A X), exits 2 (what the user gave is wrong, nothing done) with the one message of a damaged
    checkpoint that trainer.py --resume also gives ("X is not a readable PyTorch checkpoint: it is damaged ..."),
    and no advice to trust it with --trust_checkpoint."""
    damaged = tmp_path / f"{damage}.pth"
    if damage == "garbage":
        damaged.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    else:
        whole = checkpoint.read_bytes()
        damaged.write_bytes(whole[:len(whole) // 2])
    given = [str(checkpoint), str(damaged)] if member else [str(damaged)]
    code, err = run(["--checkpoint", *given, "--input_folder", str(inputs), "--output_npz",
                     str(tmp_path / "pred.npz")], capsys)
    assert code == 2 and one_message(err).startswith(f"{damaged} is not a readable PyTorch checkpoint: it is damaged")
    assert "--trust_checkpoint" not in err and "pickle" not in err


def test_an_input_folder_without_images_is_named(tmp_path, checkpoint, no_model_run, capsys):
    """A folder that holds no images stops with its name and the extensions looked for."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    code, err = run(["--checkpoint", str(checkpoint), "--input_folder", str(empty), "--output_npz",
                     str(tmp_path / "pred.npz")], capsys)
    assert code == 2 and f"{empty} holds no images" in err and ".png" in err


def test_a_file_removed_after_the_scan_changes_nothing(tmp_path, checkpoint, inputs, tiny, monkeypatch, capsys):
    """An input removed between the scan and the restore (here while the model loads) is restored from the pixels
    the scan decoded, so pred.npz holds every image of the scan (before: the folder was listed again, the image was
    missing and pred.npz was refused after all the work)."""
    real = inference.load_model
    originals = {name: read_image(inputs / name) for name in SIZES}

    def load_and_remove(*args, **kwargs):
        (inputs / "1.png").unlink()
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "load_model", load_and_remove)
    out = tmp_path / "pred.npz"
    inference.main(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--output_npz", str(out),
                    "--tta", "1", "--device", "cpu", "--no_progress"])
    assert not (inputs / "1.png").exists()
    with np.load(out) as data:
        assert sorted(data.files) == sorted(SIZES)
        for name, image in originals.items():
            assert np.array_equal(data[name], to_uint8(inference.restore(tiny, image, tta=1)).numpy()), name


def test_gt_folder_equal_to_input_folder_is_refused(tmp_path, checkpoint, inputs, no_model_run, capsys):
    """--gt_folder naming the input folder would score every image against itself (PSNR inf, silently wrong): it
    is refused before any work, with the fix."""
    code, err = run(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--gt_folder", str(inputs),
                     "--output_npz", str(tmp_path / "pred.npz")], capsys)
    assert code == 2 and "every image would be scored against itself" in err and str(inputs) in err


def test_an_unreadable_ensemble_member_is_named_before_any_work(tmp_path, checkpoint, inputs, no_model_run, capsys):
    """With several checkpoints, a missing or damaged one stops the run before the first model restores anything."""
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x80\x02not a checkpoint")
    for other in (tmp_path / "missing.pth", broken):
        code, err = run(["--checkpoint", str(checkpoint), str(other), "--input_folder", str(inputs),
                         "--output_npz", str(tmp_path / "pred.npz")], capsys)
        assert code == 2 and str(other) in err


def test_non_finite_output_is_named_and_writes_nothing(tmp_path, checkpoint, inputs, monkeypatch, capsys):
    """A network giving NaN (float16 overflow, a broken checkpoint) is never rounded into pred.npz: one message
    naming the image, with the precision hint under --fp16, and no file."""
    monkeypatch.setattr(inference, "_run_model", lambda model, batch, amp: torch.full_like(batch, float("nan")))
    out = tmp_path / "pred.npz"
    code, err = run(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--output_npz", str(out),
                     "--fp16"], capsys)
    assert code == 1 and f"non-finite values for {inputs / '0.png'}" in err and "try --bf16 or fp32" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ out of memory
CUBLAS = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
CUDNN = "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"


@pytest.fixture(scope="module")
def retried(tiny):
    """An image and what the retries give for it: one view at a time (the plain --tta 2 result), and 16-pixel tiles."""
    x = _random_image(24, 32, seed=9)
    return x, inference.restore(tiny, x, tta=2), inference.restore(tiny, x, tta=2, tile=16, overlap=4)


@pytest.mark.parametrize("message", [CUBLAS, CUDNN, "CUDA out of memory. Tried to allocate 2.00 GiB"])
def test_allocation_failures_that_are_plain_runtime_errors_are_retried(tiny, retried, monkeypatch, message):
    """cuBLAS's and cuDNN's failed allocations are plain RuntimeErrors, not torch.cuda.OutOfMemoryError: they take
    the same retry (one view at a time, then tiles) and give the same results; another RuntimeError is not
    retried."""
    x, expected_views, expected_tiled = retried
    real = inference._run_model

    def fail_when(condition, text=message):
        def run_model(model, batch, autocast_dtype):
            if condition(batch):
                raise RuntimeError(text)
            return real(model, batch, autocast_dtype)
        return run_model

    monkeypatch.setattr(inference, "_run_model", fail_when(lambda b: b.shape[0] > 1))
    assert torch.allclose(inference.restore(tiny, x, tta=2), expected_views, atol=1e-5)
    monkeypatch.setattr(inference, "_run_model", fail_when(lambda b: max(b.shape[-2:]) > 16))
    assert torch.allclose(inference.restore(tiny, x, tta=2), expected_tiled, atol=1e-5)
    monkeypatch.setattr(inference, "_run_model", fail_when(lambda b: True, "shape mismatch in a layer"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        inference.restore(tiny, x, tta=2)


def test_out_of_memory_at_the_smallest_tile_is_one_message_naming_the_image(tmp_path, checkpoint, inputs,
                                                                            monkeypatch, capsys):
    """When even 16-pixel tiles fail, the user gets one message (exit 1) naming the image, what was tried and the
    options (--tile, --batch_views), not a traceback; nothing is written."""
    def no_memory(model, batch, autocast_dtype):
        raise RuntimeError(CUBLAS)

    monkeypatch.setattr(inference, "_run_model", no_memory)
    out = tmp_path / "pred.npz"
    code, err = run(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--output_npz", str(out)],
                    capsys)
    message = one_message(err.splitlines()[-1])  # after the retries' warnings
    assert code == 1 and message.startswith(f"{inputs / '0.png'}: out of memory on a 56x40 (WxH) image even in "
                                            "24-pixel tiles, one view at a time")
    assert "--tile" in message and "--batch_views" in message and "CUBLAS_STATUS_ALLOC_FAILED" in message
    assert not out.exists()
    with pytest.raises(torch.cuda.OutOfMemoryError):  # the API's error is still PyTorch's kind
        inference.restore(build_model("tiny").eval(), read_image(inputs / "0.png"), tta=1)


# -------------------------------------------------------------------------------------------------------- vis.py
@pytest.fixture
def predicted(tmp_path, inputs):
    """pred.npz for the inputs (their own pixels), as inference.py leaves it."""
    preds = {name: to_uint8(read_image(inputs / name)).numpy() for name in SIZES}
    return inference.write_npz(tmp_path / "pred.npz", preds)


def run_vis(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vis.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("vis.py: error:") == 1, err
    return exit_info.value.code, one_message(err)


@pytest.mark.parametrize("damage", [b"not an npz at all", b"PK\x03\x04 truncated zip", "single array"])
def test_vis_damaged_npz_is_named(tmp_path, inputs, capsys, damage):
    """A prediction file that is not an .npz of arrays (garbage, a truncated zip, one bare array) is one message
    naming it and what to do (a ValueError / BadZipFile traceback before)."""
    path = tmp_path / "pred.npz"
    if damage == "single array":
        with open(path, "wb") as f:
            np.save(f, np.zeros((3, 4, 4), np.uint8))
    else:
        path.write_bytes(damage)
    code, message = run_vis(["--pred_npz", str(path), "--input_folder", str(inputs), "--out_dir",
                             str(tmp_path / "vis")], capsys)
    assert code == 2 and message.startswith(f"{path} is not a readable prediction file") and "inference.py" in message
    assert not (tmp_path / "vis").exists()


def test_vis_missing_folders_are_named(tmp_path, inputs, predicted, capsys):
    """A missing --input_folder or --gt_folder is named (exit 2)."""
    for argv, missing in ((["--input_folder", str(tmp_path / "nope")], tmp_path / "nope"),
                          (["--input_folder", str(inputs), "--gt_folder", str(tmp_path / "gone")], tmp_path / "gone")):
        code, message = run_vis(["--pred_npz", str(predicted), *argv, "--out_dir", str(tmp_path / "vis")], capsys)
        assert code == 2 and f"{missing} is not a folder" in message


@pytest.mark.parametrize("kind", ["file", "under a file"])
def test_vis_unwritable_out_dir_is_refused_before_reading(tmp_path, inputs, predicted, monkeypatch, capsys, kind):
    """--out_dir that is a file, or lies under one, is refused before any image is read or drawn (FileExistsError /
    NotADirectoryError after the reading before)."""
    blocker = tmp_path / "vis"
    blocker.write_text("a file")
    out = blocker if kind == "file" else blocker / "grids"
    monkeypatch.setattr(vis, "scan_inputs", lambda *a: pytest.fail("images were read before the check"))
    code, message = run_vis(["--pred_npz", str(predicted), "--input_folder", str(inputs), "--out_dir", str(out)],
                            capsys)
    assert code == 2 and message.startswith(f"--out_dir {out}") and "is a file, where a folder is expected" in message
    assert blocker.read_text() == "a file"


def test_vis_out_dir_that_is_an_input_folder_is_refused(tmp_path, inputs, predicted, capsys):
    """--out_dir naming the input folder (whose next reading would take the grids for images) is refused before
    anything is drawn, and the folder keeps exactly its images."""
    before = files_in(inputs)
    code, message = run_vis(["--pred_npz", str(predicted), "--input_folder", str(inputs), "--out_dir", str(inputs)],
                            capsys)
    assert code == 2 and message.startswith(f"--out_dir {inputs} is one of the inputs") and files_in(inputs) == before


def test_vis_ctrl_c_is_one_line_and_leaves_no_broken_grid(tmp_path, inputs, predicted, monkeypatch, capsys):
    """Ctrl-C while a grid is saved: exit 130, one line, and no half-written PNG (the grids are written atomically)."""
    import matplotlib.figure

    def interrupted(self, f, **kwargs):
        f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    out = tmp_path / "vis"
    code, message = run_vis(["--pred_npz", str(predicted), "--input_folder", str(inputs), "--out_dir", str(out)],
                            capsys)
    assert code == 130 and "interrupted" in message
    assert not out.exists() or files_in(out) == []


def test_a_preset_that_contradicts_the_checkpoint_is_refused(tmp_path, checkpoint, tiny, inputs, no_model_run,
                                                             capsys):
    """--preset official for a checkpoint that holds a tiny model stops before any work with the checkpoint's
    message (it was silently ignored before); in an ensemble the contradicting member is named before the first
    model restores anything. A --preset that agrees is accepted."""
    code, err = run(["--checkpoint", str(checkpoint), "--input_folder", str(inputs), "--preset", "official",
                     "--output_npz", str(tmp_path / "pred.npz")], capsys)
    assert code == 2 and f"{checkpoint} holds a model of preset 'tiny', not --preset official" in err
    bare = tmp_path / "bare.pth"
    torch.save(tiny.state_dict(), bare)
    weight = "output.weight"
    for agreeing in (bare, checkpoint):
        model = inference.load_model(agreeing, preset="tiny", plain=True)
        assert torch.equal(model.state_dict()[weight], tiny.state_dict()[weight])
    small = tmp_path / "small.pth"
    save_checkpoint(small, {"model": build_model("small").state_dict(), "model_config": {"preset": "small"}})
    code, err = run(["--checkpoint", str(bare), str(small), "--input_folder", str(inputs), "--preset", "tiny",
                     "--output_npz", str(tmp_path / "pred.npz")], capsys)
    assert code == 2 and f"{small} holds a model of preset 'small', not --preset tiny" in err
    assert not (tmp_path / "pred.npz").exists()
