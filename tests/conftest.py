"""Shared test set-up: repository root on the path, the optional ../shared folder, one thread; the tiny data set,
options and trained run that the training, checkpoint and run-folder tests share (built once per session)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import utils  # noqa: E402  (the repository root is on the path from here on)
from augment import NUM_VIEWS, dihedral  # noqa: E402

# The suite's models are tiny or run once: threads gain little, and on CPUs shared with other jobs two threads
# run many times slower (float64 depthwise convolutions above all).
torch.set_num_threads(1)


def shared_path(*parts):
    """Path inside ../shared, or skip the calling test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared (fixtures and research data) ships only with the developers' "
                    "checkout")
    return path


@pytest.fixture
def shared():
    return shared_path


# ------------------------------------------------------------------------------ tiny data, options and runs
def make_homework_set(root, *, per_kind, size, symmetric=False, seed=0):
    """A homework-layout data set of random rain and snow pairs (degraded = clean + a brightening veil). With
    ``symmetric`` every image looks the same in all 8 dihedral views, so the random view drawn for it cannot matter.
    """
    rng = np.random.default_rng(seed)
    for side in ("degraded", "clean"):
        (root / "train" / side).mkdir(parents=True, exist_ok=True)

    def image(pixels):
        if symmetric:
            x = torch.from_numpy(pixels).permute(2, 0, 1)
            pixels = (sum(dihedral(x, k) for k in range(NUM_VIEWS)) // NUM_VIEWS).permute(1, 2, 0).numpy()
        return Image.fromarray(pixels.astype(np.uint8))

    for kind in ("rain", "snow"):
        for i in range(1, per_kind + 1):
            clean = rng.integers(0, 200, (size, size, 3))
            degraded = np.clip(clean + rng.integers(0, 56, (size, size, 1)), 0, 255)
            image(clean).save(root / "train" / "clean" / f"{kind}_clean-{i}.png")
            image(degraded).save(root / "train" / "degraded" / f"{kind}-{i}.png")
    return root


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """6 pairs per kind of 24x24 images: 1 per kind for validation, 10 for training (5 batches of 2: updates of
    2, 2 and 1 batches with --accum_steps 2)."""
    return make_homework_set(tmp_path_factory.mktemp("data"), per_kind=6, size=24)


def parse(*argv, script=None):
    """The options ``argv`` of trainer.py (or of ``script``, a fine-tuning script), parsed without a checkpoint."""
    import trainer

    return (script or trainer).build_parser().parse_args([str(a) for a in argv])


def tiny(data, run, *extra, script=None):
    """Options of a small, quick CPU run in the folder ``run`` (None: not given); ``extra`` overrides them."""
    return parse("--data_dir", data, *(("--save_dir", run) if run else ()), "--preset", "tiny", "--device", "cpu",
                 "--num_workers", 0, "--batch_size", 2, "--accum_steps", 2, "--epochs", 2, "--warmup_epochs", 1,
                 "--patch_size", 16, "--val_per_type", 1, "--lr", 1e-3, "--no_curves", *extra, script=script)


def tiny_argv(data, run, *extra):
    """The command line of ``tiny``: a small, quick CPU run (3 updates per epoch); ``extra`` overrides."""
    return ["--data_dir", data, "--save_dir", run, "--preset", "tiny", "--device", "cpu", "--num_workers", 0,
            "--batch_size", 2, "--accum_steps", 2, "--epochs", 2, "--warmup_epochs", 1, "--patch_size", 16,
            "--val_per_type", 1, "--lr", 1e-3, "--no_curves", *extra]


def weights(path, key="model"):
    """The ``key`` weights of a checkpoint file."""
    return utils.load_checkpoint(path)[key]


def assert_same_state(a, b):
    """Two state dicts hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="session")
def trained(data, tmp_path_factory):
    """A finished 2-epoch tiny run (its folder: args.json, log.jsonl, last.pth, best.pth), trained once for the whole
    session: the starting point of fine-tuning, resume and checkpoint tests. Tests read it and never write into it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    import trainer

    trainer.train(tiny(data, run, "--epochs", 2, "--warmup_epochs", 0))
    return run
