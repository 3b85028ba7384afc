"""A training run's lifetime: the run folder (its files, the lock, snapshots, the per-epoch log, atomic saves,
stale temporaries, which checkpoint a folder stands for), the stop signals and the process group.

A run folder (``trainer.py --save_dir``) holds::

    args.json        the run's options
    log.jsonl        one JSON record per finished epoch
    last.pth         the training state after the last epoch (or the update a stop came after): what --resume reads
    best.pth         the state of the best validation epoch: what prediction and fine-tuning read
    snapshots/       with --keep_last K, the weights of the newest K epochs (epoch_0012.pth), for avg_checkpoints.py
    .lock            held while a run writes into the folder

Wherever a checkpoint is asked for, a run folder may be given instead (:func:`checkpoint_file`).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no lock on the run folder
    fcntl = None

import torch
from torch.nn.parallel import DistributedDataParallel

import utils
from utils import CheckpointError, ConfigError, UserError, WorkError

log = logging.getLogger(__name__)

ARGS_NAME, LOG_NAME, LAST, BEST, LOCK_NAME = "args.json", "log.jsonl", "last.pth", "best.pth", ".lock"
SNAPSHOT_DIR = "snapshots"
SNAPSHOT_NAME = re.compile(r"^epoch_(?P<epoch>[0-9]+)\.pth$")
# What a run writes into its folder (a folder holding any of them holds a run); the files written whole, through
# utils.atomic_write, whose temporaries a killed write leaves behind, come first.
WRITTEN_WHOLE = (ARGS_NAME, LAST, BEST)
RUN_FILES = (*WRITTEN_WHOLE, LOG_NAME, SNAPSHOT_DIR)


class RunFolderError(UserError):
    """A folder given as a run folder that is missing, not a run folder, or whose log holds no epochs."""


# ------------------------------------------------------------------------------------------------- which file
def checkpoint_file(path: str | os.PathLike, *, prefer: str = BEST, option: str = "--checkpoint") -> Path:
    """The checkpoint file ``path`` stands for: ``path`` itself, or for a run folder its ``prefer`` file (``last.pth``
    to resume, ``best.pth`` to predict or fine-tune from), saying so. The one rule of every script.

    Raises:
        CheckpointError: ``path`` does not exist, or is a folder without ``prefer`` (naming what it holds).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{option} {path} does not exist: give a checkpoint file or a run folder")
    if not path.is_dir():
        return path
    chosen = path / prefer
    if not chosen.is_file():
        held = sorted(p.name for p in path.glob("*.pth"))
        other = path / (LAST if prefer == BEST else BEST)
        hint = f"; {option} {other} uses its {other.name}" if other.is_file() else ""
        raise CheckpointError(f"{option} {path} is a folder without {prefer} (it holds "
                              f"{utils.listing(held) if held else 'no .pth files'}): give a checkpoint file or a "
                              f"run folder of trainer.py{hint}")
    log.info("%s %s is a run folder: using its %s", option, path, prefer)
    return chosen


def snapshot_name(epoch: int) -> str:
    """The file name of the snapshot of epoch ``epoch`` (``trainer.py --keep_last``): ``epoch_0012.pth``."""
    return f"epoch_{epoch:04d}.pth"


def snapshot_epoch(path: Path) -> int:
    """The epoch of a snapshot file named by :func:`snapshot_name`."""
    return int(SNAPSHOT_NAME.match(Path(path).name)["epoch"])


def run_snapshots(run_dir: str | os.PathLike) -> list[Path]:
    """The weight snapshots ``trainer.py --keep_last`` wrote in a run folder, oldest first."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = [p for p in folder.glob("epoch_*.pth") if SNAPSHOT_NAME.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=snapshot_epoch)


# ------------------------------------------------------------------------------------------------- the folder
def check_run_folder(save_dir: str | os.PathLike, *, resume: str | os.PathLike | None = None) -> Path:
    """Refuse a run folder that holds files of another run (a run continues only in its own folder, with --resume),
    or that cannot be written.

    Raises:
        ConfigError: with what to do.
    """
    folder = Path(save_dir)
    resuming_here = resume is not None and Path(resume).parent.resolve() == folder.resolve()
    found = [] if resuming_here or not folder.is_dir() else sorted(p.name for p in folder.iterdir()
                                                                  if p.name in RUN_FILES)
    if found:
        if (folder / LAST).is_file():
            how = f"continue it with --resume {folder}"
        elif (folder / BEST).is_file():
            how = f"its last.pth is gone: continue from its best epoch with --resume {folder / BEST}"
        else:
            how = "remove them if that run is of no use"
        raise ConfigError(f"{folder} already holds a run ({utils.listing(found)}): {how}, or choose another "
                          "--save_dir")
    return utils.check_output_path(folder, "--save_dir", folder=True)


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder/.lock`` while a run writes into ``folder``: a second run there is refused for as long as this
    one lasts. The lock is a POSIX record lock (``fcntl.lockf``): it belongs to this process alone (the data loader
    workers forked from it do not hold it) and ends with the process however that ends, a SIGKILL included, so
    nothing has to clean it up.

    Raises:
        ConfigError: another process holds it (the message gives its process id).
    """
    with open(Path(folder) / LOCK_NAME, "a+") as file:
        if fcntl is not None:
            try:
                fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                file.seek(0)
                holder = file.read().strip() or "unknown"
                raise ConfigError(f"{folder} is in use by another training run (process {holder}): wait for it to "
                                  "end, or choose another --save_dir") from None
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        yield


@contextmanager
def open_run_folder(save_dir: str | os.PathLike, options: dict[str, Any], *, resume: str | None, epoch: int,
                    epochs: int) -> Iterator[RunLog]:
    """The run folder, taken for this run under its lock: checked again (another run may have started there since
    the options were checked), cleared of the temporaries of writes a killed run left, args.json written, and
    log.jsonl cut after ``epoch`` on a resume.

    Args:
        save_dir: the run folder.
        options: the run's options (written to args.json).
        resume: the checkpoint the run resumes from, if any.
        epoch: the epochs finished (on a resume, the log keeps those).
        epochs: the epochs of the run (whose snapshots' temporaries may be left).

    Yields:
        RunLog: the run's per-epoch log.
    """
    folder = Path(save_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):
        check_run_folder(folder, resume=resume)
        remove_stale_temporaries(folder, WRITTEN_WHOLE)
        remove_stale_temporaries(folder / SNAPSHOT_DIR, [snapshot_name(e) for e in range(1, epochs + 1)])
        utils.atomic_write(folder / ARGS_NAME, lambda f: f.write((json.dumps(options, indent=2) + "\n").encode()))
        run_log = RunLog(folder)
        if resume and run_log.path.is_file():
            run_log.truncate_after(epoch)
        yield run_log


def save(paths: Iterable[str | os.PathLike], state: dict[str, Any], *, run_dir: str | os.PathLike) -> None:
    """Write a checkpoint of the run in ``run_dir`` under each of ``paths`` atomically (serialised once, then the
    bytes copied); a failure leaves the file that was there.

    Raises:
        WorkError: one could not be written (the message says the old file is unchanged, and how to continue).
    """
    first = None
    for path in map(Path, paths):
        try:
            if first is None:
                first = utils.save_checkpoint(path, state)
            else:
                utils.atomic_write(path, lambda f: f.write(first.read_bytes()))
        except OSError as err:
            reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else err.strerror or str(err)
            raise WorkError(f"{path} could not be written ({reason}); the {path.name} that was there, if any, is "
                            f"unchanged: make room, then continue with --resume {run_dir}") from err


def write_snapshot(run_dir: str | os.PathLike, epoch: int, weights: dict[str, Any], *, keep: int) -> Path:
    """Write the weights of epoch ``epoch`` to ``run_dir/snapshots/epoch_N.pth`` (atomically; ``avg_checkpoints.py``
    averages them) and delete the snapshots beyond the newest ``keep``, and those of later epochs (left by a run that
    continued from an earlier checkpoint). Only files named as snapshots are touched.

    Raises:
        WorkError: the snapshot could not be written.
    """
    path = Path(run_dir) / SNAPSHOT_DIR / snapshot_name(epoch)
    save([path], weights, run_dir=run_dir)
    current = [p for p in run_snapshots(run_dir) if snapshot_epoch(p) <= epoch]  # oldest first
    for old in set(run_snapshots(run_dir)) - set(current[-keep:]):
        old.unlink(missing_ok=True)
    return path


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files :func:`utils.atomic_write` leaves behind when killed mid-write (``.NAME.XXXX.tmp``)
    for each file name in ``names``, in ``folder``; returns what was removed. Call it where nothing else is writing
    these names (a run folder under its lock, a prediction file's folder before the work)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for name in names:
        escaped = "".join(f"[{c}]" if c in "*?[" else c for c in name)
        for tmp in folder.glob(f".{escaped}.*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    if removed:
        log.info("removed %d unfinished temporary file(s) of an interrupted write: %s", len(removed),
                 utils.listing([p.name for p in removed], limit=5))
    return removed


# ------------------------------------------------------------------------------------------------- the log
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
        log.warning("%s: skipped %d line(s) that are not epoch records", path, skipped)
    return records


# ------------------------------------------------------------------------------------------- stop signals
class StopRequest:
    """Turns SIGINT and SIGTERM into a request to stop after the current optimizer update (a second signal stops
    at once, without saving), and restores the handlers it found on leaving. Installs its handlers only in the main
    thread; data loader workers forked from it ignore the signals, so a Ctrl-C in the terminal leaves them serving
    the update in flight.

    A signal this process was started ignoring stays ignored, as Python itself decides for SIGINT: a job started in
    the background by a non-interactive shell (SIGINT ignored) is not stopped by a Ctrl-C meant for the shell.

    A repeat within ``REPEAT_S`` seconds of the first signal is the same request, not a second one: torchrun forwards
    the signal it receives to every worker, so a Ctrl-C or a scheduler's SIGTERM to the process group reaches each
    worker twice within milliseconds, and must still save last.pth.
    """

    REPEAT_S = 1.0
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None  # the signal that asked this process to stop
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()
        self._first = None  # time.monotonic() of the first signal

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if self.signum is not None:
            if time.monotonic() - self._first < self.REPEAT_S:
                return
            raise KeyboardInterrupt if signum == signal.SIGINT else utils.Interrupted(signum)  # said by its name
        self.signum, self._first = signum, time.monotonic()
        log.info(f"{signal.Signals(signum).name}: stopping after this optimizer update and writing last.pth "
                 "(send it again to quit at once, without saving)")


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within, SIGTERM ends the work as Ctrl-C does (``utils.Interrupted``: the clean-ups of ``finally`` and ``except
    BaseException`` run, a half-made output is removed, exit 130) instead of the process dying where it stands: for
    the work outside a :class:`StopRequest` (a trainer's start-up data check, synthetic.py). Main thread only; an
    ignored SIGTERM stays ignored; the handler found is restored on leaving."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return

    def stop(signum, frame):
        raise utils.Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------- the processes
@dataclass(frozen=True)
class Processes:
    """The processes that train together and this one's place among them.

    Args:
        device (torch.device): this process's device.
        rank (int): this process's number, 0 for the primary one (it writes the run folder and reports).
        world (int): how many processes train.
        distributed (bool): started by torchrun: gradients and results are combined through torch.distributed.
    """
    device: torch.device
    rank: int = 0
    world: int = 1
    distributed: bool = False


@contextmanager
def process_group(device: torch.device) -> Iterator[Processes]:
    """The processes of a run. Under torchrun (RANK and WORLD_SIZE set) this starts torch.distributed (NCCL on
    CUDA, each process on GPU LOCAL_RANK; gloo on the CPU) and ends it on leaving, however the run ends; only the
    primary process reports progress. Otherwise a single process on ``device``.

    Args:
        device: the resolved --device (``utils.resolve_device``).
    """
    import torch.distributed as dist

    device = torch.device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        yield Processes(device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    console, level = logging.getLogger(), logging.getLogger().level
    try:
        rank = dist.get_rank()
        if rank:
            console.setLevel(logging.WARNING)
        yield Processes(device, rank, dist.get_world_size(), distributed=True)
    finally:
        console.setLevel(level)
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- resuming a run
# How the epoch in progress is cut into updates. A resume inside an epoch needs all of it again, or the rest of the
# epoch would skip or repeat images; at an epoch's end, the update the next epoch starts at (the schedule's count).
EPOCH_LAYOUT = {"batch_size": "--batch_size", "accum_steps": "--accum_steps", "processes": "processes",
                "train_pairs": "training pairs", "epoch_start": "the epoch starting at update"}


def check_resume(checkpoint, state, args, *, layout, done, updates):
    """Refuse a resume with nothing left to do, or whose epoch in progress is cut into updates otherwise than when
    it was saved.

    Args:
        checkpoint (dict): the --resume checkpoint, restored into ``state``.
        state (TrainingState): the restored state.
        args (argparse.Namespace): this run's options.
        layout (dict): this run's ``EPOCH_LAYOUT`` of the epoch in progress.
        done (int): the updates of that epoch done, by this run's counts.
        updates (int): the updates of that epoch, by this run's counts.
    """
    if state.epoch >= args.epochs:
        raise ConfigError(f"--resume {args.resume} has already completed {state.epoch} of --epochs {args.epochs}: "
                          "pass a larger --epochs to train longer")
    saved = checkpoint["epoch_layout"]
    inside = state.step != saved["epoch_start"]
    changed = [f"{EPOCH_LAYOUT[key]} {saved[key]}, not {layout[key]}" for key in EPOCH_LAYOUT
               if (inside or key == "epoch_start") and saved[key] != layout[key]]
    if changed or not 0 <= done < updates:
        raise ConfigError(f"--resume {args.resume} stopped at update {state.step} of epoch {state.epoch + 1}, which "
                          f"has {updates} updates here{', with ' if changed else ''}{', '.join(changed)}: resume "
                          "with the same data, --batch_size (or --progressive), --accum_steps and number of processes "
                          "(other batches would skip or repeat images of the epoch and stretch the schedule)")


def pair_names(train_loader, val_loader, data_dir):
    """The run's pairs as ``[degraded, clean]`` paths relative to --data_dir, sorted: what a checkpoint records so
    that a resume can tell the same data set from another one of as many pairs."""
    pairs = [*train_loader.dataset.pairs, *(val_loader.dataset.pairs if val_loader is not None else ())]
    return sorted([os.path.relpath(p.degraded, data_dir), os.path.relpath(p.clean, data_dir)] for p in pairs)


def check_same_pairs(saved, now, args):
    """Refuse a resume on pairs other than those the run started with (``pair_names``): with other names the split
    into training and validation changes, and an image trained on could be validated on. Checkpoints that record no
    pairs are not checked.

    Raises:
        ConfigError: saying which pairs were added and which are gone.
    """
    if not isinstance(saved, list) or saved == now:
        return
    old, new = ({" -> ".join(map(str, pair)) for pair in pairs} for pairs in (saved, now))
    added, gone = sorted(new - old), sorted(old - new)
    if not added and not gone:
        return
    changes = "; ".join(f"{what} ({len(names)}): {utils.listing(names, limit=5)}"
                        for what, names in (("added", added), ("gone", gone)) if names)
    raise ConfigError(f"--resume {args.resume} was trained on other pairs than --data_dir {args.data_dir} holds "
                      f"({changes}): resume with the data set the run started with (the split into training and "
                      "validation follows the names), or start a new run")


def check_run_folder_outside_data(args):
    """Refuse a --save_dir inside --data_dir: its checkpoints and pictures would join the data set."""
    save, data = Path(args.save_dir).resolve(), Path(args.data_dir).resolve()
    if save == data or data in save.parents:
        raise ConfigError(f"--save_dir {args.save_dir} is inside --data_dir {args.data_dir}: the run's files would "
                          "join the data set; choose a folder outside it")


def wrap_ddp(model, device):
    """``model``'s DistributedDataParallel wrapper; every process starts from rank 0's weights."""
    # The fast path's channels-last activations give some convolution weight gradients other strides than their
    # parameters (on the CPU only along size-1 dimensions: the same memory, tested). DDP copies every gradient into
    # its buckets anyway; a strided copy of the weights' size costs nothing next to a step.
    warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides", UserWarning)
    return DistributedDataParallel(model, device_ids=[device.index] if device.index is not None else None)
