"""Small shared helpers: the errors a user sees and the one place that turns them into a message and an exit code
(``run_cli``), the one check of an output path, the device and precision resolvers, console logging, listings,
checkpoint files, seeding and training curves (a run folder's files and log are ``run.py``'s).

Run as a script to draw the curves of a run folder::

    python utils.py RUN_DIR            # writes RUN_DIR/curves_loss.png, curves_psnr.png, curves_lr.png
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import random
import signal
import sys
import tempfile
import warnings
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

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------ errors a user sees
# The one rule of exit codes (README, "Exit codes"): 2 when what the user gave is wrong (options, paths, data,
# checkpoint files) and nothing was done; 1 when the work itself failed (a full disk, out of memory, a non-finite
# training, a file that vanished mid-run); 130 on interruption. ``run_cli`` applies it, for every entry point.
class ToolkitError(Exception):
    """An expected failure with a message a user can act on; ``exit_code`` is what the command exits with."""

    exit_code = 1


class UserError(ToolkitError):
    """What the user gave is wrong (an option, a path, the data, a checkpoint file) and nothing was done: exit 2."""

    exit_code = 2


class WorkError(ToolkitError):
    """The work itself failed (a full disk, a non-finite training, a file that vanished mid-run): exit 1."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """Options that contradict each other, are out of range or point at nothing; the message says what to do."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable, damaged, or needs pickle to load."""


class Interrupted(KeyboardInterrupt):
    """The work stopped by a signal other than Ctrl-C's (SIGTERM): handled as Ctrl-C is (clean-ups run, exit 130),
    and said by its name (``run.terminate_as_interrupt``, a second SIGTERM to a training run)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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


# How an allocation failure reads: PyTorch's own error, and the plain RuntimeErrors of cuBLAS, cuDNN and the CPU
# allocator when they cannot get memory.
OUT_OF_MEMORY_TEXTS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                       "can't allocate memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a failure to allocate memory: PyTorch's out-of-memory error, Python's MemoryError, or the
    plain RuntimeError of cuBLAS, cuDNN or the CPU allocator (``OUT_OF_MEMORY_TEXTS``)."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in OUT_OF_MEMORY_TEXTS)


def run_cli(prog: str, fn: Callable[[], Any]) -> Any:
    """Run a command-line entry point's work, turning every expected failure into one line on stderr and an exit
    code by the one rule, never a traceback: ``ToolkitError`` (its ``exit_code``: 2 for a ``UserError``, 1 for a
    ``WorkError``), Ctrl-C (130), running out of memory (1) and a file-system error during the work (1, naming the
    path). Anything else is a bug and keeps its traceback.

    Args:
        prog: the command's name, as argparse shows it (``parser.prog``).
        fn: the work; its return value is returned.
    """
    try:
        return fn()
    except ToolkitError as err:
        code, text = err.exit_code, str(err)
    except KeyboardInterrupt as err:
        name = err.args[0] if isinstance(err, Interrupted) else "Ctrl-C"
        code, text = 130, (f"interrupted ({name}); files already written are complete, the one in progress was not "
                           "written")
    except OSError as err:
        code, text = 1, _os_error_message(err)
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        code, text = 1, "out of memory: use smaller images or batches (--batch_size, --patch_size, --tile)"
    sys.stderr.write(f"{prog}: error: {text}\n")
    raise SystemExit(code)


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Give a file-system error raised while writing ``path`` that path, when it names none (a full disk during
    ``write`` does not), so that the message a user sees says which file failed."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno or errno.EIO, err.strerror or str(err), str(path)) from err


# ----------------------------------------------------------------------------------------------------- output paths
def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are one file or folder (through links); for missing paths, the same absolute path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).absolute() == Path(b).absolute()


def check_output_path(path: str | os.PathLike, option: str, *, folder: bool = False,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The one check of an output, before any work: it can be written (the nearest existing folder on its way takes
    a new file: a temporary file is created there and removed, the only test that sees read-only mounts, quotas and
    access lists alike; missing folders on the way are created on writing), it is of the right kind (a file where a
    file goes, a folder where a folder goes), and it is none of ``inputs``.

    Args:
        path: the file to be written, or with ``folder`` the folder to be written into.
        option: the command-line option that named it, for the message.
        folder: ``path`` is a folder.
        inputs: the files and folders the command reads; an output never replaces one.

    Raises:
        ConfigError: saying what is wrong and what to do.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file, where a folder is expected: give a folder (it is created "
                          "when missing)")
    if not folder and path.is_dir():
        raise ConfigError(f"{option} {path} is a folder, where a file is expected: give a file name, such as "
                          f"{path / ('output' + (path.suffix or '.pth'))}")
    clash = next((p for p in inputs if Path(p).exists() and same_path(p, path)), None)
    if clash is not None:
        raise ConfigError(f"{option} {path} is one of the inputs ({clash}): an output never replaces an input; "
                          "write elsewhere")
    if not folder and path.is_file() and _run_file(path):
        raise ConfigError(f"{option} {path} is the {path.name} of the training run in {path.parent}: an output never "
                          "replaces a run's file; give another file name")
    if not folder:
        check_name_length(path.parent, path.name, f"{option} {path}")
    existing = (path if folder else path.parent).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{option} {path}: {existing} is a file, where a folder is expected; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"{option} {path}: cannot write in {existing} ({err.strerror or err}); choose a folder "
                          "you can write to") from None
    return path


# The files of a training run's folder (run.py's; utils cannot import it), and the suffixes of checkpoints and
# images: an output path naming an existing one of them is refused.
RUN_FILE_NAMES = ("args.json", "log.jsonl", "last.pth", "best.pth", ".lock")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# What atomic_write adds to a file's name for its temporary: "." before, ".XXXXXXXX.tmp" after.
TEMPORARY_NAME_EXTRA = 14


def _run_file(path: Path) -> bool:
    return path.name in RUN_FILE_NAMES and any((path.parent / name).is_file() for name in RUN_FILE_NAMES[:4])


def check_not_an_input(path: str | os.PathLike, option: str) -> None:
    """Refuse an output file that would replace a checkpoint or an image (``check_output_path`` refuses a run's
    files for every output; a command whose outputs are never checkpoints or images adds this). A file that does
    not exist yet, or an earlier output of another kind, is fine.

    Raises:
        ConfigError: naming the option, the file and what it is.
    """
    path = Path(path)
    if not path.is_file():
        return
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        what = "a checkpoint"
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        what = "an image"
    else:
        return
    raise ConfigError(f"{option} {path} is {what}: an output never replaces it; give another file name")


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


# ------------------------------------------------------------------------------------------------------ curves
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

    from run import LOG_NAME, RunFolderError, read_log

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
    import utils  # the module whose errors run.py raises, not this __main__ copy of it

    utils.main()
