"""Small shared helpers: the errors a user sees and the one place that reports them, the device and precision
resolvers, console logging, listings, checkpoint files, seeding, run logs and training curves.

Run as a script to draw the curves of a run folder::

    python utils.py RUN_DIR            # writes RUN_DIR/curves_loss.png, curves_psnr.png, curves_lr.png
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import warnings
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: outputs are not locked
    fcntl = None

LOG_NAME = "log.jsonl"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------ errors a user sees
class ToolkitError(Exception):
    """An expected failure with a message a user can act on; ``exit_code`` is what the command exits with."""

    exit_code = 1


class ConfigError(ToolkitError, ValueError):
    """Options that contradict each other, are out of range or point at nothing; the message says what to do."""

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """The work stopped by a signal other than Ctrl-C's (SIGTERM): handled as Ctrl-C is (clean-ups run, exit 130),
    and said by its name."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within, SIGTERM ends the work as Ctrl-C does: the clean-ups of ``finally`` and ``except BaseException`` run
    (a half-made output is removed) instead of the process dying where it stands. Main thread only; the handler
    found is restored on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _os_error_message(err: OSError) -> str:
    """A file-system failure in words: the path, what went wrong and what to do."""
    where = f"{err.filename}" + (f" -> {err.filename2}" if getattr(err, "filename2", None) else "")
    hints = {errno.ENOSPC: "the disk is full: free some space or write elsewhere",
             errno.EDQUOT: "the disk quota is exhausted: free some space or write elsewhere",
             errno.EACCES: "permission denied: check the permissions, or choose another path",
             errno.EPERM: "operation not permitted: check the permissions, or choose another path",
             errno.EROFS: "the file system is read-only: choose another path",
             errno.EISDIR: "it is a folder, where a file is expected: give a file name",
             errno.ENOTDIR: "a part of the path is a file, where a folder is expected",
             errno.ENOENT: "it does not exist"}
    hint = hints.get(err.errno, err.strerror or str(err))
    return f"{where}: {hint}" if err.filename else f"{hint} ({err})"


def run_cli(prog: str, fn: Callable[[], Any], *, expected: tuple[type[BaseException], ...] = ()) -> Any:
    """Run a command-line entry point's work, turning every expected failure into one line on stderr and an exit
    code, never a traceback: ``ToolkitError`` (its ``exit_code``), the ``expected`` exception types (exit 1), a
    file-system error (exit 1, naming the path), running out of memory (exit 1) and Ctrl-C (exit 130).

    Args:
        prog: the command's name, as argparse shows it (``parser.prog``).
        fn: the work; its return value is returned.
        expected: further exception types whose message is meant for the user.
    """
    try:
        return fn()
    except ToolkitError as err:
        code, text = err.exit_code, str(err)
    except KeyboardInterrupt as err:
        name = err.args[0] if isinstance(err, Interrupted) else "Ctrl-C"
        code, text = 130, (f"interrupted ({name}); files already written are complete, the one in progress was not "
                           "written")
    except MemoryError:
        code, text = 1, "out of memory: use smaller images or batches (--batch_size, --patch_size, --tile)"
    except OSError as err:
        code, text = 1, _os_error_message(err)
    except expected as err:
        code, text = 1, str(err)
    sys.stderr.write(f"{prog}: error: {text}\n")
    raise SystemExit(code)


def listing(items: Sequence[Any], *, limit: int = 20, sep: str = ", ", prefix: str = "") -> str:
    """The first ``limit`` items joined by ``sep`` (each after ``prefix``), and "... and N more" when there are more:
    the one way a long list of files or keys is shown in a message."""
    shown = [f"{prefix}{item}" for item in list(items)[:limit]]
    if len(items) > limit:
        shown.append(f"{prefix}... and {len(items) - limit} more")
    return sep.join(shown)


# ------------------------------------------------------------------------------------------------ device, precision
def resolve_device(name: str | None) -> torch.device:
    """The device a command runs on: ``name`` ("cpu", "cuda", "cuda:1"), or CUDA when available for None or "auto".

    Raises:
        ConfigError: an unknown device name, or CUDA asked for where there is none.
    """
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {name}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: CUDA is not available here; use --device cpu (or leave --device out)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def add_precision_args(parser: argparse.ArgumentParser | Any, *, training: bool) -> None:
    """``--precision fp32|bf16|fp16`` and the original's spellings ``--fp16`` and ``--bf16`` (see
    :func:`resolve_precision`)."""
    fp16 = "float16 autocast" + (" with loss scaling (CUDA only)" if training else "")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                        help=f"fp32 (default), bf16 (bfloat16 autocast) or fp16 ({fp16})")
    parser.add_argument("--fp16", action="store_true", help="the same as --precision fp16")
    parser.add_argument("--bf16", action="store_true", help="the same as --precision bf16")


def resolve_precision(args: argparse.Namespace, device: torch.device, *, training: bool) -> torch.dtype | None:
    """The autocast dtype of a run (None for float32) from ``--precision``, ``--fp16`` and ``--bf16``; sets
    ``args.precision`` to its name and ``args.fp16`` / ``args.bf16`` to match.

    Raises:
        ConfigError: the options disagree, or float16 training without CUDA (its loss scaling needs it).
    """
    flags = [name for name in ("fp16", "bf16") if getattr(args, name, False)]
    if len(flags) == 2:
        raise ConfigError("--fp16 and --bf16 exclude each other: pick one (bf16 needs no loss scaling)")
    chosen = getattr(args, "precision", None)
    if flags and chosen not in (None, flags[0]):
        raise ConfigError(f"--precision {chosen} and --{flags[0]} disagree: give one of them")
    name = chosen or (flags[0] if flags else "fp32")
    if training and name == "fp16" and device.type != "cuda":
        raise ConfigError("--fp16 needs a CUDA device (float16 autocast on the CPU is slow and unscaled): "
                          "use --bf16 or leave both off")
    args.precision, args.fp16, args.bf16 = name, name == "fp16", name == "bf16"
    return PRECISIONS[name]


# ----------------------------------------------------------------------------------------------------- console
class _TqdmHandler(logging.Handler):
    """Writes records through ``tqdm.write``, so that they appear above any progress bar instead of breaking it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {text}"


def setup_logging(level: int = logging.INFO) -> None:
    """The one console set-up of every entry point: this project's loggers (and warnings of any library) go to
    stderr through ``tqdm.write``; information as it is, warnings and errors prefixed with their level. Calling it
    again changes nothing but the level."""
    root = logging.getLogger()
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(_Formatter())
        root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    warnings.formatwarning = _warning_text


def _warning_text(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
    """A library's warning as its user reads it: the kind and the message, without the library's file path and
    source line (which name no file of the user's and nothing to do)."""
    return f"{category.__name__}: {message}"


# ----------------------------------------------------------------------------------------------------------- metrics
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """The one conversion from [0, 1] floats to 8-bit: clamp, times 255, round (never truncate)."""
    return x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# ----------------------------------------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Every global random state as plain tensors and lists, so it survives ``torch.load(weights_only=True)``."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # Saved on a machine with more (or fewer) visible GPUs: restore those both have, by index; the others keep
        # their fresh seed. Each process uses one device, so an extra saved state belongs to a GPU not used here.
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# ------------------------------------------------------------------------------------------------------- checkpoints
class CheckpointError(ToolkitError, RuntimeError):
    """A checkpoint file is missing, unreadable, or needs pickle to load."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None],
                 check: Callable[[Path], None] | None = None) -> Path:
    """Write a file atomically: ``write(f)`` into a temporary file in the same folder, flushed to disk, then
    ``check(temporary path)`` if given, then a rename. A crash or a failed check at any moment leaves the previous
    file (or none), never a broken one, and no temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` with ``torch.save``, atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, *, trusted: bool = False, map_location: Any = "cpu",
                    mmap: bool = False) -> Any:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Args:
        path: the file.
        trusted: allow full unpickling for a file you trust (it can run code). Only needed for files that store
            Python objects, such as an ``argparse.Namespace``.
        map_location: passed to ``torch.load``.
        mmap: map the tensors from the file instead of reading them (cheap when only the small entries, such as a
            run's options, are wanted); files in the legacy non-zip format are read whole.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists() else
                              f"checkpoint {path} is not a file: give a .pth file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a write that never finished? Use another file")
    foreign = _foreign_format(path)
    if foreign:
        raise CheckpointError(f"{path} is {foreign}")
    try:
        if mmap and zipfile.is_zipfile(path):
            return torch.load(path, map_location=map_location, weights_only=not trusted, mmap=True)
        return torch.load(path, map_location=map_location, weights_only=not trusted)
    except OSError:
        raise  # the file system's own failure (permissions, a vanished file): run_cli names it
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError ... by version and damage
        text = str(err)
        if not trusted and ("Unsupported global" in text or "GLOBAL" in text):
            raise CheckpointError(
                f"{path} stores Python objects that need pickle to load, which can run code. If you trust the file, "
                "load it with trusted=True (command line: --trust_checkpoint). Details: " + _first_line(text, "GLOBAL")
            ) from err
        detail = _first_line(text)
        detail = type(err).__name__ + (f": {detail}" if detail and "Weights only load failed" not in detail else "")
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: it is damaged (truncated or corrupt) or "
                              f"another kind of file ({detail}). Use an intact copy or another checkpoint") from err


def _foreign_format(path: Path) -> str:
    """What ``path`` is when it is a known kind of file that holds no checkpoint ``torch.load`` reads, with the fix;
    else an empty string."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
            return ("a safetensors file, which this toolkit does not read: convert it with "
                    "safetensors.torch.load_file and torch.save into a .pth file")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if any(name.split("/", 1)[-1] in ("constants.pkl", "code/") or "/code/" in name
                       for name in archive.namelist()):
                    return ("a TorchScript archive (a compiled model), not a checkpoint of weights: give the .pth "
                            "that trainer.py wrote, or save the model's state_dict() with torch.save")
    except (OSError, zipfile.BadZipFile, ValueError):
        return ""  # torch.load says what is wrong with it
    return ""


def _first_line(text: str, containing: str = "") -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if containing and containing in line), lines[0] if lines else "")


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` leaves behind when killed mid-write (``.NAME.XXXX.tmp``) for
    each file name in ``names``, in ``folder``; returns what was removed. Call it where nothing else is writing
    these names (a run folder under its lock, a prediction file's folder before the work)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for name in names:
        for tmp in folder.glob(f".{glob_escape(name)}.*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    if removed:
        logging.getLogger(__name__).info("removed %d unfinished temporary file(s) of an interrupted write: %s",
                                         len(removed), listing([p.name for p in removed], limit=5))
    return removed


def glob_escape(text: str) -> str:
    """``text`` with glob's special characters escaped, for ``Path.glob``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


# ------------------------------------------------------------------------------------------- outputs and inputs
# The files of a training run's folder (trainer.py), and the suffixes of checkpoints and images: an output path
# naming an existing one of them is refused, whatever command writes it.
RUN_FILE_NAMES = ("args.json", LOG_NAME, "last.pth", "best.pth", ".lock")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def check_not_an_input(path: str | os.PathLike, option: str) -> None:
    """Refuse an output path that would replace a file of a training run, a checkpoint or an image: an output never
    replaces an input (a CSV over a run's log.jsonl, say). A file that does not exist yet, or an earlier output of
    another kind, is fine.

    Raises:
        ConfigError: naming the option, the file and what it is.
    """
    path = Path(path)
    if not path.is_file():
        return
    if path.name in RUN_FILE_NAMES and any((path.parent / name).is_file() for name in RUN_FILE_NAMES[:4]):
        what = f"the {path.name} of the training run in {path.parent}"
    elif path.suffix.lower() in CHECKPOINT_SUFFIXES:
        what = "a checkpoint"
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        what = "an image"
    else:
        return
    raise ConfigError(f"{option} {path} is {what}: an output never replaces it; give another file name")


# What utils.atomic_write adds to a file's name for its temporary: "." before, ".XXXXXXXX.tmp" after.
TEMPORARY_NAME_EXTRA = 14


def check_name_length(folder: str | os.PathLike, name: str, what: str) -> None:
    """Refuse, before the work, a file name too long for the file system once ``atomic_write`` makes its temporary
    name of it (the write would fail after the work, naming a hidden temporary).

    Raises:
        ConfigError: naming ``what`` (an option and its path, or the input image) and the limit.
    """
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    length = len(name.encode(errors="surrogateescape"))
    if length + TEMPORARY_NAME_EXTRA > limit:
        raise ConfigError(f"{what}: the file name {name[:40]}... is {length} bytes long, and the file system takes "
                          f"{limit} (less {TEMPORARY_NAME_EXTRA} for the temporary written first): shorten it")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, option: str) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside the output ``path`` while a command makes it, so that two runs never write one
    output (the file of one beside the scores of the other). A second run is refused while the first holds it; the
    lock ends with the process however it ends, and its file is removed on leaving.

    Raises:
        ConfigError: another process holds it (its process id is given when known).
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    if fcntl is None:
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        file = open(lock, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError(f"{option} {path} is being written by another run (process {holder}): wait for it to "
                              "end, or write elsewhere") from None
        try:
            if os.fstat(file.fileno()).st_ino == os.stat(lock).st_ino:
                break  # else a run that just ended removed the file this one locked: lock the new one
        except FileNotFoundError:
            pass
        file.close()
    try:
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)
        file.close()


# ---------------------------------------------------------------------------------------------------------- run logs
class RunLog:
    """Per-epoch log of a run: one JSON object per line in ``run_dir/log.jsonl``, flushed at once.

    Args:
        run_dir: the run folder.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOG_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch`` (used when a run resumes from an earlier checkpoint)."""
        kept = [r for r in read_log(self.path.parent) if r.get("epoch", 0) <= epoch]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


class RunFolderError(ToolkitError):
    """A run folder that is missing, not a run folder, or whose log holds no epochs."""


def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The epoch records of ``run_dir/log.jsonl``: JSON objects with a whole-number ``epoch``. A torn line (a crash
    while writing) is ignored; other lines that are not epoch records are skipped with a warning.

    Raises:
        RunFolderError: ``run_dir`` is not a folder, or holds no ``log.jsonl``.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOG_NAME
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is not a folder: give a run folder written by trainer.py (its --save_dir)")
    if not path.is_file():
        raise RunFolderError(f"{path} does not exist: is {run_dir} a run folder written by trainer.py? (a run writes "
                             "its log after its first epoch)")
    lines = path.read_text(errors="replace").splitlines()
    records, skipped = [], 0
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += number < len(lines)  # only a torn last line is expected
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and not isinstance(record["epoch"], bool):
            records.append(record)
        elif line.strip():
            skipped += 1
    if skipped:
        logging.getLogger(__name__).warning("%s: skipped %d line(s) that are not epoch records", path, skipped)
    return records


def _series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(r["epoch"])
            ys.append(value)
    return xs, ys


def plot_curves(run_dir: str | os.PathLike) -> list[Path]:
    """Draw training/validation loss, validation PSNR (overall and per type) and learning rate of a run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_log(run_dir)
    if not records:
        raise RunFolderError(f"{run_dir / LOG_NAME} holds no epochs yet: draw the curves after the first epoch")
    keys = sorted({k for r in records for k in r})
    panels = [
        ("curves_loss.png", "loss", [k for k in ("train_loss", "val_loss") if k in keys]),
        ("curves_psnr.png", "validation PSNR (dB)", [k for k in keys if k.startswith("val_psnr")]),
        ("curves_lr.png", "learning rate", [k for k in ("lr",) if k in keys]),
    ]
    written = []
    for name, ylabel, series in panels:
        drawn = [(key, *_series(records, key)) for key in series]
        drawn = [(key, xs, ys) for key, xs, ys in drawn if xs]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, xs, ys in drawn:
            label = "overall" if key == "val_psnr" else key.replace("val_psnr_", "").replace("_", " ")
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=120)
        plt.close(fig)
        written.append(run_dir / name)
    if not written:
        raise RunFolderError(f"{run_dir / LOG_NAME} holds {len(records)} epoch record(s) but no loss, PSNR or learning "
                             "rate to draw: is it the log of a trainer.py run?")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw the loss, PSNR and learning-rate curves of a training run.")
    parser.add_argument("run_dir", help="a run folder written by trainer.py (it holds log.jsonl)")
    args = parser.parse_args(argv)
    setup_logging()
    for path in run_cli(parser.prog, lambda: plot_curves(args.run_dir)):
        print(path)


if __name__ == "__main__":
    main()
