"""The training loop of PromptIR for rain and snow removal, its command line, and training from scratch.

    python trainer.py --data_dir datasets --fp16 --save_dir gfl_ckpt        # the original recipe
    python trainer.py --data_dir datasets --save_dir gfl_ckpt --resume gfl_ckpt   # continue where it stopped
    torchrun --nproc_per_node=4 trainer.py --data_dir datasets --bf16       # several GPUs (--batch_size is per GPU)

``first_stage_ft.py`` and ``second_stage_ft.py`` run the same loop with their own defaults. The run folder
(``--save_dir``) holds args.json, log.jsonl (one record per epoch), last.pth (after every epoch, and on Ctrl-C or
SIGTERM), best.pth (best validation PSNR), the curves drawn at the end, and with ``--keep_last K`` the weights of the
newest K epochs (snapshots/epoch_N.pth, for ``avg_checkpoints.py``). One run at a time writes into a folder (it holds
``.lock`` while it runs); a folder holding files of a run takes no other run, only ``--resume``.

    python trainer.py --data_dir datasets --epochs 250 --progressive 128:8:100 192:4:100 whole:2:50
"""
from __future__ import annotations

import argparse
import bisect
import errno
import itertools
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

try:
    import fcntl
except ImportError:  # Windows: no lock on the run folder
    fcntl = None

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import scoring
import utils
from augment import DEFAULT_ALPHAS, DEFAULT_RATES, STRONG_AUGMENTATIONS, AugmentPolicy
from avg_checkpoints import SNAPSHOT_DIR, SNAPSHOT_NAME, run_snapshots, snapshot_name
from dataloader import DataError, build_loaders, make_train_loader
from ema import ModelEma
from fast_path import enable_fast_path
from GFL_Loss import LOSSES, build_loss
from model import (PRESETS, build_model, freeze_except, load_weights, model_config, model_from_checkpoint,
                   trainable_summary)
from utils import ConfigError

log = logging.getLogger(__name__)

# 2: the learning rate is a function of the step (no "scheduler" entry). Format 1 files resume as well.
FORMAT_VERSION = 2
# What --resume needs from a checkpoint (weights alone start a fine-tuning run instead).
TRAINING_STATE = ("model", "optimizer", "epoch", "step", "rng")
MIN_LR = 1e-6  # where the cosine ends (a tenth of the peak for --lr below 1e-5: see schedule_floor)
# The largest --seed: the generators take seed + epoch (the sampler) and seed + rank, and torch's take at most 2**64-1.
MAX_SEED = 2**63 - 1
TRAIN_DEFAULTS = {"lr": 2e-4, "epochs": 250, "warmup_epochs": 10, "loss": "gfl", "augment": "strong",
                  "save_dir": "checkpoints"}
# What a run writes into its folder (a folder holding any of them holds a run); the files written whole, through
# utils.atomic_write, whose temporaries a killed write leaves behind, come first.
WRITTEN_WHOLE = ("args.json", "last.pth", "best.pth")
RUN_FILES = (*WRITTEN_WHOLE, utils.LOG_NAME, SNAPSHOT_DIR)
LOCK_NAME = ".lock"


class TrainingError(utils.ToolkitError, RuntimeError):
    """Training cannot go on (for example, every step has a non-finite loss)."""


# ------------------------------------------------------------------------------------------------- command line
def build_parser(defaults=None, *, fine_tune=False, description=None):
    """The command line shared by trainer.py and the fine-tuning scripts.

    Args:
        defaults (Mapping | None): values that differ from ``TRAIN_DEFAULTS`` (lr, epochs, warmup_epochs, loss,
            augment, save_dir, and for fine-tuning ``trainable``: a list of module names, None for all).
        fine_tune (bool): add ``--checkpoint`` (the weights to start from) and ``--trainable``.
        description (str | None): the script's help text.
    """
    d = {**TRAIN_DEFAULTS, **(defaults or {})}
    p = _Parser(description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data_dir", required=True, help="dataset root (see dataloader.py for the layouts)")
    data.add_argument("--batch_size", type=int, default=2, help="images per micro-batch per GPU (default 2)")
    data.add_argument("--num_workers", type=int, default=4, help="data loader processes (default 4)")
    data.add_argument("--patch_size", type=int, default=None,
                      help="train on random square crops of this size (default: whole images)")
    data.add_argument("--progressive", nargs="+", type=_phase_option, default=None, metavar="PATCH:BATCH:EPOCHS",
                      help="progressive training (Restormer's): phases of growing crops, e.g. 128:8:100 192:4:100 "
                           "whole:2:50 (PATCH pixels or 'whole' images, BATCH images per micro-batch per GPU, "
                           "EPOCHS of the phase; they sum to --epochs). The phases set the crop and micro-batch "
                           "sizes, so --patch_size and --batch_size are not used; --accum_steps applies to each")
    data.add_argument("--val_per_type", type=int, default=320,
                      help="validation images per degradation type (default 320; 0: no validation)")
    data.add_argument("--cache", action="store_true", help="decode all images once and keep them in memory")
    data.add_argument("--augment", choices=("strong", "views"), default=d["augment"],
                      help="strong: random crops and views, then CutBlur, Mixup or Blend on some batches; "
                           f"views: crops and views only (default {d['augment']})")
    names = " ".join(STRONG_AUGMENTATIONS)
    data.add_argument("--aug_rates", type=float, nargs=3, default=[DEFAULT_RATES[n] for n in STRONG_AUGMENTATIONS],
                      metavar=("CUTBLUR", "MIXUP", "BLEND"),
                      help=f"share of batches that get {names} (at most one per batch; sum <= 1; default "
                           f"{' '.join(str(DEFAULT_RATES[n]) for n in STRONG_AUGMENTATIONS)}, the original homework's)")
    data.add_argument("--aug_alphas", type=float, nargs=3, default=[DEFAULT_ALPHAS[n] for n in STRONG_AUGMENTATIONS],
                      metavar=("CUTBLUR", "MIXUP", "BLEND"),
                      help="strengths of " + names + " (default "
                           f"{' '.join(str(DEFAULT_ALPHAS[n]) for n in STRONG_AUGMENTATIONS)}, Yoo et al.'s)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=d["lr"], help=f"peak learning rate (default {d['lr']})")
    opt.add_argument("--epochs", type=int, default=d["epochs"], help=f"epochs (default {d['epochs']})")
    opt.add_argument("--warmup_epochs", "--warmup", dest="warmup_epochs", type=int, default=d["warmup_epochs"],
                     help=f"linear warm-up epochs before the cosine decay (default {d['warmup_epochs']})")
    opt.add_argument("--accum_steps", type=int, default=4, help="micro-batches per optimizer update (default 4)")
    opt.add_argument("--loss", choices=LOSSES, default=d["loss"], help=f"training loss (default {d['loss']})")
    opt.add_argument("--weight_decay", type=float, default=1e-4,
                     help="AdamW weight decay, not applied to biases and norm weights (default 1e-4)")
    opt.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm (default 1.0; 0: off)")
    opt.add_argument("--ema", type=float, default=None, metavar="DECAY",
                     help="keep an exponential moving average of the weights (e.g. 0.999), used for validation")
    opt.add_argument("--ema_no_warmup", action="store_true",
                     help="with --ema: the constant decay from the first update (default: the decay warms up from "
                          "0 as in timm's ModelEmaV3, so a short run's average does not hold its random start)")
    opt.add_argument("--max_bad_steps", type=int, default=20,
                     help="stop after this many steps in a row with a non-finite loss or gradient (default 20)")
    utils.add_precision_args(opt, training=True)
    run = p.add_argument_group("run")
    run.add_argument("--save_dir", default=None,
                     help=f"run folder (default: the --resume folder, else {d['save_dir']})")
    run.add_argument("--resume", default=None,
                     help="continue from a checkpoint, or a run folder (its last.pth), with the options it was "
                          "started with; options given on this command line override them (e.g. a larger --epochs)")
    run.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="model size (default official; with --resume or --checkpoint the checkpoint's own "
                          "config is used, and a --preset given must match it)")
    run.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    run.add_argument("--val_interval", type=int, default=1, help="validate every this many epochs (default 1)")
    run.add_argument("--keep_last", type=int, default=0, metavar="K",
                     help="after every epoch write the weights (and EMA) to snapshots/epoch_N.pth and keep the "
                          "newest K, for avg_checkpoints.py (default 0: none)")
    run.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    run.add_argument("--trust_checkpoint", action="store_true",
                     help="allow checkpoints that need pickle to load (only for files you trust)")
    speed = p.add_argument_group("speed")
    speed.add_argument("--plain", action="store_true",
                       help="run the official formulation of the network instead of the fast path (same weights, "
                            "same function; for comparison)")
    speed.add_argument("--compile", action="store_true",
                       help="compile each transformer block with torch.compile (CUDA only; the first steps at each "
                            "image size compile for minutes, cached on disk for later runs)")
    speed.add_argument("--recompute", nargs="+", default=(), metavar="STAGE",
                       help="recompute these stages' blocks in backward instead of keeping their activations "
                            "(less GPU memory, more time), e.g. decoder_level1 refinement")
    p.set_defaults(fine_tune=fine_tune, default_save_dir=d["save_dir"], checkpoint=None, trainable=None, no_ema=False)
    if fine_tune:
        ft = p.add_argument_group("fine-tuning")
        ft.add_argument("--checkpoint", help="weights to start from (required unless --resume)")
        ft.add_argument("--no_ema", action="store_true", help="start from the plain weights of a --checkpoint that "
                        "also holds EMA weights (by default its EMA weights, as inference.py uses)")
        ft.add_argument("--trainable", nargs="+", default=d.get("trainable"), metavar="MODULE",
                        help="train only these top-level modules (default: "
                             f"{' '.join(d['trainable']) if d.get('trainable') else 'all'})")
    return p


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reads every negative number as a value: argparse's own rule knows "-1" and "-0.5" but
    takes "-1e-4" or "-inf" for an unknown option ("expected one argument"), before check_args could say what is
    wrong with the number."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)


# Options that describe this invocation, not the run: on --resume they are not taken from the checkpoint. The data
# folder is given every time; the run folder defaults to the --resume folder (wherever it lies now); the device, the
# data loader processes and the speed options belong to the machine (they do not change what is computed, and a
# carried-over flag such as --compile could not be switched off again); trusting pickle is asked for each time; and
# fine_tune, default_save_dir, checkpoint and no_ema belong to the script (--checkpoint and --no_ema only seed a new
# fine-tuning run).
PER_INVOCATION = frozenset({"resume", "save_dir", "data_dir", "device", "trust_checkpoint", "num_workers", "cache",
                            "plain", "compile", "recompute", "fine_tune", "default_save_dir", "checkpoint",
                            "no_ema"})
PRECISION_OPTIONS = ("precision", "fp16", "bf16")


def parse_args(parser, argv=None):
    """Parse the command line; with ``--resume``, the options recorded in the checkpoint (its ``args``) become the
    defaults and the command line is parsed again, so only options given now override them (``PER_INVOCATION``
    ones are never taken from the checkpoint). The precision is carried over as a whole unless one of
    --precision, --fp16 or --bf16 is given now; a checkpoint that records only --fp16/--bf16 maps to it.

    Args:
        parser (argparse.ArgumentParser): from ``build_parser``.
        argv (Sequence[str] | None): the options (default ``sys.argv[1:]``).

    Returns:
        argparse.Namespace: the options of the run.
    """
    args = parser.parse_args(argv)
    if not args.resume or not _run_file(args.resume).is_file():  # a missing file is reported by check_args
        return args
    # mapped, not read: only the options are wanted here (the Trainer reads the whole file once)
    checkpoint = utils.load_checkpoint(_run_file(args.resume), trusted=args.trust_checkpoint, mmap=True)
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict):
        return args
    known = set(vars(args)) - PER_INVOCATION - set(PRECISION_OPTIONS)
    defaults = {key: value for key, value in saved.items() if key in known}
    if not any(getattr(args, name) for name in PRECISION_OPTIONS):
        name = saved.get("precision") or ("fp16" if saved.get("fp16") else "bf16" if saved.get("bf16") else "fp32")
        defaults.update(precision=name, fp16=name == "fp16", bf16=name == "bf16")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def _run_file(path):
    """A checkpoint path, or a run folder standing for its last.pth."""
    path = Path(path)
    return path / "last.pth" if path.is_dir() else path


def check_args(args):
    """Fail on options that contradict each other or point at nothing, before any work starts; fills in
    ``save_dir``, ``device`` and ``precision``. Checking checked options again changes nothing.

    Raises:
        ConfigError: with what to do.
    """
    _check_numbers(args)
    try:
        AugmentPolicy(rates=dict(zip(STRONG_AUGMENTATIONS, args.aug_rates)),
                      alphas=dict(zip(STRONG_AUGMENTATIONS, args.aug_alphas)))
    except ValueError as err:
        raise ConfigError(f"--aug_rates / --aug_alphas: {err}") from None
    if args.progressive and args.patch_size is not None:
        log.warning(f"--patch_size {args.patch_size} is not used: the --progressive phases set the crops")
    if args.patch_size is not None and args.patch_size < MIN_PATCH:
        raise ConfigError(f"--patch_size must be at least {MIN_PATCH} pixels, got {args.patch_size}")
    check_schedule_args(args)
    if not Path(args.data_dir).is_dir():
        raise ConfigError(f"--data_dir {args.data_dir} is not a folder: point it at the dataset root")
    if args.resume:
        args.resume = str(_run_file(args.resume))
        if not Path(args.resume).is_file():
            best = Path(args.resume).parent / "best.pth"
            hint = f" (--resume {best} continues from its best epoch)" if best.is_file() else ""
            raise ConfigError(f"--resume {args.resume} does not exist: give a checkpoint or a run folder with "
                              f"last.pth{hint}")
    if args.fine_tune and not args.resume:
        if not args.checkpoint:
            raise ConfigError("fine-tuning starts from weights: pass --checkpoint PATH (or --resume to continue a "
                              "fine-tuning run)")
        if not Path(args.checkpoint).is_file():
            raise ConfigError(f"--checkpoint {args.checkpoint} does not exist")
    args.save_dir = str(args.save_dir or (Path(args.resume).parent if args.resume else args.default_save_dir))
    check_run_folder_outside_data(args)
    check_run_folder(args)
    device = utils.resolve_device(args.device)
    utils.resolve_precision(args, device, training=True)
    if args.plain and (args.compile or args.recompute):
        raise ConfigError("--compile and --recompute work on the fast path: drop --plain or drop them")
    if args.compile and device.type != "cuda":
        raise ConfigError("--compile needs a CUDA device: on the CPU the fast path without it is the quicker one")
    args.device = str(device)


def _check_numbers(args):
    """Every number of the options finite and in its range."""
    for name, value in sorted(vars(args).items()):
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"--{name} must be a finite number, got {' '.join(str(v) for v in values)}")
    for name, low in (("batch_size", 1), ("accum_steps", 1), ("epochs", 1), ("val_interval", 1),
                      ("max_bad_steps", 1), ("num_workers", 0), ("warmup_epochs", 0), ("val_per_type", 0),
                      ("seed", 0)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name} must be at least {low}, got {getattr(args, name)}")
    if args.seed > MAX_SEED:
        raise ConfigError(f"--seed must be at most {MAX_SEED} (2**63 - 1: the random generators take the seed plus "
                          f"the epoch), got {args.seed}")
    if args.warmup_epochs >= args.epochs:
        raise ConfigError(f"--warmup_epochs ({args.warmup_epochs}) must be smaller than --epochs ({args.epochs}): "
                          "lower the warm-up or train longer")
    if not 0 < args.lr <= 1:
        raise ConfigError(f"--lr must be above 0 and at most 1, got {args.lr} (AdamW moves every weight by about "
                          f"the learning rate at each update; the recipe's is {TRAIN_DEFAULTS['lr']})")
    if args.weight_decay < 0 or args.weight_decay * args.lr >= 1:
        raise ConfigError(f"--weight_decay must be at least 0 and below 1 / --lr (each update scales the weights by "
                          f"1 - lr x weight_decay), got {args.weight_decay}")
    if args.grad_clip < 0:
        raise ConfigError(f"--grad_clip must be at least 0 (0: no clipping), got {args.grad_clip}")
    if args.ema is not None and not 0 < args.ema < 1:
        raise ConfigError(f"--ema is a decay between 0 and 1 (e.g. 0.999), got {args.ema}")


def check_run_folder_outside_data(args):
    """Refuse a --save_dir inside --data_dir: its checkpoints and pictures would join the data set."""
    save, data = Path(args.save_dir).resolve(), Path(args.data_dir).resolve()
    if save == data or data in save.parents:
        raise ConfigError(f"--save_dir {args.save_dir} is inside --data_dir {args.data_dir}: the run's files would "
                          "join the data set; choose a folder outside it")


def check_run_folder(args):
    """Refuse a --save_dir that holds files of another run (a run continues only in its own folder, with --resume),
    or that cannot be written."""
    folder = Path(args.save_dir)
    resuming_here = bool(args.resume) and Path(args.resume).parent.resolve() == folder.resolve()
    found = [] if resuming_here or not folder.is_dir() else sorted(p.name for p in folder.iterdir()
                                                                  if p.name in RUN_FILES)
    if found:
        if (folder / "last.pth").is_file():
            how = f"continue it with --resume {folder}"
        elif (folder / "best.pth").is_file():
            how = f"its last.pth is gone: continue from its best epoch with --resume {folder / 'best.pth'}"
        else:
            how = "remove them if that run is of no use"
        raise ConfigError(f"{folder} already holds a run ({utils.listing(found)}): {how}, or choose another "
                          "--save_dir")
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--save_dir {folder}: {existing} is a file, not a folder: choose another --save_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--save_dir {folder}: {existing} cannot be written (permission denied): choose another "
                          "--save_dir, or change the folder's permissions")


# ----------------------------------------------------------------------------------------- phases and snapshots
MIN_PATCH = 8  # the smallest crop side --patch_size and --progressive accept


@dataclass(frozen=True)
class Phase:
    """A stretch of the run trained on one crop size and one micro-batch size: a phase of ``--progressive``, or
    the whole run without it.

    Args:
        patch_size (int | None): side of the square training crops; None for whole images.
        batch_size (int): images per micro-batch and process.
        epochs (int): how many epochs the phase lasts.
    """
    patch_size: int | None
    batch_size: int
    epochs: int

    @classmethod
    def parse(cls, text):
        """The phase ``PATCH:BATCH:EPOCHS`` names (PATCH a number of pixels or "whole").

        Raises:
            ConfigError: a malformed or out-of-range phase, with the expected form.
        """
        parts = str(text).split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            patch = None if parts[0].strip().lower() == "whole" else int(parts[0])
            batch, epochs = int(parts[1]), int(parts[2])
        except ValueError:
            raise ConfigError(f"--progressive {text}: a phase is PATCH:BATCH:EPOCHS, e.g. 128:8:100 or whole:2:50")
        if patch is not None and patch < MIN_PATCH:
            raise ConfigError(f"--progressive {text}: the patch must be at least {MIN_PATCH} pixels, or 'whole'")
        if batch < 1 or epochs < 1:
            raise ConfigError(f"--progressive {text}: the batch size and the epochs must be at least 1")
        return cls(patch, batch, epochs)

    @property
    def crops(self):
        """The crops in words: "128 px crops" or "whole images"."""
        return "whole images" if self.patch_size is None else f"{self.patch_size} px crops"


def _phase_option(text):
    """argparse type of --progressive's words: the text itself, once ``Phase.parse`` accepts it."""
    try:
        Phase.parse(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--progressive {text}: ")) from None
    return text


def training_phases(args):
    """The phases of the run: those of --progressive, or one of --patch_size and --batch_size for all --epochs.

    Raises:
        ConfigError: a malformed phase, or phases whose epochs do not sum to --epochs.
    """
    if not args.progressive:
        return [Phase(args.patch_size, args.batch_size, args.epochs)]
    phases = [Phase.parse(text) for text in args.progressive]
    total = sum(phase.epochs for phase in phases)
    if total != args.epochs:
        raise ConfigError(f"the --progressive phases last {' + '.join(str(p.epochs) for p in phases)} = {total} "
                          f"epochs, but --epochs is {args.epochs}: make the phases' epochs sum to --epochs")
    return phases


def check_schedule_args(args):
    """Refuse a malformed --progressive schedule or a negative --keep_last (part of ``check_args``).

    Raises:
        ConfigError: with what to do.
    """
    if args.keep_last < 0:
        raise ConfigError(f"--keep_last is a number of snapshots, 0 for none; got {args.keep_last}")
    training_phases(args)


def write_snapshot(run_dir, state, *, keep):
    """Write the weights of the epoch ``state`` has just finished to ``run_dir/snapshots/epoch_N.pth`` (atomically;
    ``avg_checkpoints.py`` averages them) and delete the snapshots beyond the newest ``keep``, and those of later
    epochs (left by a run that continued from an earlier checkpoint). Only files named as snapshots are touched.

    Args:
        run_dir (Path): the run folder.
        state (TrainingState): the run's state at the end of an epoch.
        keep (int): how many snapshots to keep, at least 1.

    Returns:
        Path: the snapshot written.
    """
    path = Path(run_dir) / SNAPSHOT_DIR / snapshot_name(state.epoch)
    try:
        utils.save_checkpoint(path, {"format_version": FORMAT_VERSION, "model": state.model.state_dict(),
                                     "ema": state.ema.module.state_dict() if state.ema else None,
                                     "model_config": state.model_config, "epoch": state.epoch})
    except OSError as err:
        raise TrainingError(_unwritten(path, err, run_dir)) from err
    snapshots = run_snapshots(run_dir)  # oldest first
    current = [p for p in snapshots if int(SNAPSHOT_NAME.match(p.name)["epoch"]) <= state.epoch]
    for old in set(snapshots) - set(current[-keep:]):
        old.unlink(missing_ok=True)
    return path


class PhasePlan:
    """The phases of a run with their training loaders, and the optimizer updates of every epoch: what the schedule
    and a resume count in.

    Args:
        phases (list[Phase]): the run's phases (``training_phases``).
        first (DataLoader): build_loaders' training loader, of the first phase's sizes; it serves every phase of
            its sizes, and the others get loaders of their own, each checked now (crops larger than an image, a
            micro-batch larger than a process's share of the data).
        args (argparse.Namespace): the run's options (--accum_steps, --progressive, --num_workers, --seed).
        processes (Processes): the processes training together.
    """

    def __init__(self, phases, first, *, args, processes):
        self.phases, self.progressive, self.accum_steps = phases, bool(args.progressive), args.accum_steps
        self.world, self.train_pairs = processes.world, len(first.dataset)
        self.loaders = []
        for i, phase in enumerate(phases):
            if (phase.patch_size, phase.batch_size) == (first.dataset.patch_size, first.batch_size):
                self.loaders.append(first)
                continue
            try:
                self.loaders.append(make_train_loader(
                    first.dataset.with_patch_size(phase.patch_size), batch_size=phase.batch_size,
                    num_workers=args.num_workers, seed=args.seed, world=processes.world, rank=processes.rank))
            except DataError as err:
                raise DataError(f"--progressive phase {i + 1} ({phase.crops}, micro-batch {phase.batch_size}): "
                                f"{err}") from None
        self.batches = [len(loader) for loader in self.loaders]  # micro-batches per epoch, kept past a phase's end
        self.epoch_updates = [math.ceil(batches / args.accum_steps)
                              for batches, phase in zip(self.batches, phases) for _ in range(phase.epochs)]
        self.epoch_starts = list(itertools.accumulate(self.epoch_updates, initial=0))

    def phase_of(self, epoch):
        """The index of the phase that epoch ``epoch`` (0-based) belongs to (the last one past the end)."""
        ends = list(itertools.accumulate(phase.epochs for phase in self.phases))
        return min(bisect.bisect_right(ends, epoch), len(self.phases) - 1)

    def start_of(self, epoch):
        """The update epoch ``epoch`` (0-based) starts at; past the last epoch, the run's total."""
        return self.epoch_starts[min(epoch, len(self.epoch_updates))]

    def updates_of(self, epoch):
        """The updates of epoch ``epoch`` (0-based; past the end, those of the last)."""
        return self.epoch_updates[min(epoch, len(self.epoch_updates) - 1)]

    def layout(self, epoch):
        """How epoch ``epoch`` is cut into updates (``EPOCH_LAYOUT``)."""
        return {"batch_size": self.phases[self.phase_of(epoch)].batch_size, "accum_steps": self.accum_steps,
                "processes": self.world, "train_pairs": self.train_pairs, "epoch_start": self.start_of(epoch)}

    def release(self, index):
        """Let go of phase ``index``'s loader (its worker processes end with it) unless a later phase shares it."""
        loader = self.loaders[index]
        if all(other is not loader for other in self.loaders[index + 1:]):
            self.loaders = [None if other is loader else other for other in self.loaders]

    def describe(self):
        """The run's batches and updates in words."""
        total = self.epoch_starts[-1]
        if not self.progressive:
            return f"effective batch: {self.effective_batch(0)}, {total} in all"
        phases = ", ".join(f"{p.crops} x {p.batch_size} for {p.epochs} epoch(s)" for p in self.phases)
        return f"progressive training in {len(self.phases)} phases ({phases}): {total} updates in all"

    def describe_phase(self, index):
        """Phase ``index``'s epochs, crops and effective batch in words."""
        phase, first = self.phases[index], sum(p.epochs for p in self.phases[:index]) + 1
        return (f"phase {index + 1}/{len(self.phases)}, epochs {first}-{first + phase.epochs - 1}: {phase.crops}; "
                f"effective batch: {self.effective_batch(index)}")

    def effective_batch(self, index):
        """The effective batch of phase ``index`` in words (saying so when --accum_steps exceeds its epoch)."""
        phase, batches = self.phases[index], self.batches[index]
        accum = min(self.accum_steps, batches)
        if accum < self.accum_steps:
            log.info(f"--accum_steps {self.accum_steps} is more than the {batches} batches of an epoch: each update "
                     f"takes the whole epoch, {accum} batches")
        return (f"{phase.batch_size} images x {accum} accumulation steps x {self.world} process(es) = "
                f"{phase.batch_size * accum * self.world} per update; {math.ceil(batches / self.accum_steps)} updates "
                "per epoch")


# ---------------------------------------------------------------------------------------------------- processes
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
def process_group(device):
    """The processes of a run. Under torchrun (RANK and WORLD_SIZE set) this starts torch.distributed (NCCL on
    CUDA, each process on GPU LOCAL_RANK; gloo on the CPU) and ends it on leaving, however the run ends; only the
    primary process reports progress. Otherwise a single process on ``device``.

    Args:
        device (str | None): the --device option (see ``utils.resolve_device``).

    Yields:
        Processes
    """
    device = utils.resolve_device(device)
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


class StopRequest:
    """Turns SIGINT and SIGTERM into a request to stop after the current optimizer update (a second signal stops
    at once, without saving). Installs its handlers only in the main thread; data loader workers forked from it
    ignore the signals, so a Ctrl-C in the terminal leaves them serving the update in flight.

    A repeat within ``REPEAT_S`` seconds of the first signal is the same request, not a second one: torchrun forwards
    the signal it receives to every worker, so a Ctrl-C or a scheduler's SIGTERM to the process group reaches each
    worker twice within milliseconds, and must still save last.pth.
    """

    REPEAT_S = 1.0

    def __init__(self):
        self.signum = None  # the signal that asked this process to stop
        self._previous = {}
        self._pid = os.getpid()
        self._first = None  # time.monotonic() of the first signal

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            return
        if self.signum is not None:
            if time.monotonic() - self._first < self.REPEAT_S:
                return
            raise KeyboardInterrupt if signum == signal.SIGINT else utils.Interrupted(signum)  # said by its name
        self.signum, self._first = signum, time.monotonic()
        log.info(f"{signal.Signals(signum).name}: stopping after this optimizer update and writing last.pth "
                 "(send it again to quit at once, without saving)")


# -------------------------------------------------------------------------------------------- the update
def schedule_floor(lr):
    """Where the cosine ends for the peak ``lr``: ``MIN_LR``, or a tenth of the peak when that is lower (a gentle
    fine-tuning stage's --lr 1e-7 must decay, not climb to ``MIN_LR``)."""
    return min(MIN_LR, lr / 10)


def lr_at(step, *, peak_lr, warmup_steps, total_steps, min_lr):
    """The learning rate of update ``step`` (0-based): a linear warm-up to ``peak_lr`` over ``warmup_steps``
    updates, then a cosine decay that reaches ``min_lr`` at ``total_steps`` and stays there."""
    if step < warmup_steps:
        return peak_lr * ((step + 1) / warmup_steps)
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    min_factor = min_lr / peak_lr
    return peak_lr * (min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(params, *, lr, weight_decay, device):
    """AdamW over ``params`` in two parameter groups: weight decay on matrices and convolution kernels (ndim > 1),
    none on biases and norm weights; the fused implementation on CUDA.

    Args:
        params (Iterable[torch.nn.Parameter]): the parameters to train.
        lr (float): the learning rate the groups start with (the schedule sets it before every update).
        weight_decay (float): decoupled weight decay of the first group.
        device (torch.device | str): where the parameters live.

    Returns:
        torch.optim.AdamW: groups ``[decayed, not decayed]``.
    """
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    fused = {"fused": True} if torch.device(device).type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, **fused)


# Parameter-group entries that choose the optimizer's implementation for the device it runs on
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable")


def load_optimizer_state(optimizer, saved):
    """``optimizer.load_state_dict(saved)``, keeping the implementation ``optimizer`` was built with (fused AdamW
    on CUDA): a state saved on another device carries that device's choice in its parameter groups.

    Raises:
        ValueError: the saved state does not fit (other parameter groups or sizes).
    """
    own = [{k: group[k] for k in IMPLEMENTATION_FLAGS if k in group} for group in optimizer.param_groups]
    groups = [{**group, **own[i]} if i < len(own) else group for i, group in enumerate(saved["param_groups"])]
    optimizer.load_state_dict({**saved, "param_groups": groups})


@dataclass
class UpdateResult:
    """What one optimizer update did.

    Args:
        skipped (bool): the loss or the gradient was not finite (on any process): the weights did not change.
        stop (bool): a stop was requested (on any process): end the run after this update.
        loss_sum (float): this process's per-image loss summed over the group's images.
        images (int): this process's images in the group.
    """
    skipped: bool
    stop: bool
    loss_sum: float
    images: int


class Update:
    """One optimizer update from a group of micro-batches: exact accumulation (each micro-batch's loss weighted by
    its share of the group's images), autocast, loss scaling, gradient clipping, skipping a non-finite step, the
    EMA update and clearing the gradients.

    Args:
        model (nn.Module): the network (its trainable parameters are clipped; the EMA follows it).
        optimizer (torch.optim.Optimizer): over the model's trainable parameters (``build_optimizer``).
        loss_fn (Callable): ``loss_fn(pred, gt, epoch)``, a GFL_Loss loss.
        autocast_dtype (torch.dtype | None): torch.float16 or torch.bfloat16 for mixed precision, None for float32.
        grad_clip (float): largest gradient norm (0: no clipping).
        scaler (torch.amp.GradScaler | None): loss scaling (float16).
        ema (ModelEma | None): updated after every step taken, with the decay of that update's number.
        policy (Callable | None): ``policy(lq, gt) -> (lq, gt, name)``, the augmentation applied to each
            micro-batch on the device (None: none).
        ddp_model (DistributedDataParallel | None): the model's DDP wrapper when several processes train: forward
            and backward go through it (gradients synchronised on the group's last micro-batch) and the skip and
            stop decisions are agreed by all processes.
    """

    def __init__(self, model, optimizer, *, loss_fn, autocast_dtype, grad_clip, scaler=None, ema=None, policy=None,
                 ddp_model=None):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.autocast_dtype, self.grad_clip, self.scaler = autocast_dtype, grad_clip, scaler
        self.ema, self.policy, self.ddp_model = ema, policy, ddp_model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = next(model.parameters()).device

    def __call__(self, group, *, epoch, step=None, stop_requested=False):
        """Run the update.

        Args:
            group (list[dict]): micro-batches with "lq" and "gt" image tensors (moved to the model's device here).
            epoch (int): the 0-based epoch, for losses that change with it.
            step (int | None): the 0-based number of this update in the run (skipped ones included), which sets the
                EMA's decay; required with an EMA.
            stop_requested (bool | Callable[[], bool]): this process was asked to stop; a callable is asked at the
                end of the update, so that a stop during it ends the run after it.

        Returns:
            UpdateResult
        """
        if self.ema is not None and step is None:
            raise ValueError("an update with an EMA needs its step (the EMA's decay follows it)")
        images = sum(batch["lq"].shape[0] for batch in group)
        network = self.model if self.ddp_model is None else self.ddp_model
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(group):
            lq = batch["lq"].to(self.device, non_blocking=True)
            gt = batch["gt"].to(self.device, non_blocking=True)
            if self.policy is not None:
                lq, gt, _ = self.policy(lq, gt)
            synchronise = self.ddp_model is None or i == len(group) - 1
            with nullcontext() if synchronise else self.ddp_model.no_sync():
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    loss = self.loss_fn(network(lq), gt, epoch)
                share = loss * (lq.shape[0] / images)
                (self.scaler.scale(share) if self.scaler else share).backward()
            loss_sum += loss.detach() * lq.shape[0]
        return self._step(loss_sum, images, stop_requested, step)

    def _step(self, loss_sum, images, stop_requested, step):
        """Clip, then step unless the loss or the gradient norm is not finite on some process."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf"))
        if callable(stop_requested):  # read now, at the end of the update in flight, not when it started
            stop_requested = stop_requested()
        flags = torch.stack([~torch.isfinite(norm) | ~torch.isfinite(loss_sum),
                             torch.tensor(bool(stop_requested), device=self.device)]).float()
        if self.ddp_model is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skipped, stop, value = torch.cat([flags, loss_sum.view(1).float()]).tolist()
        if not skipped:
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            if self.ema:
                self.ema.update(self.model, update=step + 1)
        if self.scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return UpdateResult(bool(skipped), bool(stop), value, images)


def _micro_batch_groups(batches, size):
    """Consecutive lists of ``size`` micro-batches (the last one may be shorter): one optimizer update each."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


# ------------------------------------------------------------------------------------------- the state of a run
@dataclass
class EpochSums:
    """The running sums of the epoch in progress; a resume inside the epoch continues them.

    ``SUMMED`` entries are this process's own while the epoch runs and are added over the processes when it ends (or
    when a stop inside it is saved: rank 0 carries the total on); skipped updates (agreed by all processes) and the
    training time are the same on every process.
    """
    SUMMED: ClassVar[tuple[str, ...]] = ("loss_sum", "images", "seen")
    loss_sum: float = 0.0  # per-image loss summed over the images of the updates taken
    images: int = 0  # images of the updates taken
    seen: int = 0  # images trained on, skipped updates included (the speed)
    skipped: int = 0  # updates skipped for a non-finite loss or gradient
    time_s: float = 0.0  # training time, validation excluded


def rank_rng_state(saved, rank):
    """The random state process ``rank`` resumes with: ``saved`` is a checkpoint's "rng", a list indexed by rank
    (or, in checkpoints written before, rank 0's state alone). None when it holds none for this rank."""
    states = saved if isinstance(saved, list) else [saved]
    return states[rank] if rank < len(states) else None


@dataclass
class TrainingState:
    """Everything a checkpoint holds, saved (``state_dict``) and restored (``load_state_dict``) by this object
    alone: what a resumed run needs to continue as if it had never stopped.

    Args:
        model (nn.Module): the network (not its DDP wrapper).
        optimizer (torch.optim.Optimizer): its optimizer.
        args (dict): the run's options (saved; on resume ``parse_args`` reads them before this object exists).
        model_config (dict): ``build_model`` keyword arguments (saved; read before the model is built).
        ema (ModelEma | None): the weights' moving average.
        scaler (torch.amp.GradScaler | None): the float16 loss scaler.
        loader_generator (torch.Generator | None): the training loader's generator.
        epoch (int): epochs finished.
        step (int): optimizer updates done, skipped ones included (the schedule's position).
        best_psnr (float): the best validation PSNR so far.
        bad_steps_in_a_row (int): the updates just before this point that were skipped for a non-finite loss or
            gradient, across epochs and resumes.
        epoch_sums (EpochSums): the sums of the epoch in progress.
    """
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    args: dict
    model_config: dict
    ema: ModelEma | None = None
    scaler: torch.amp.GradScaler | None = None
    loader_generator: torch.Generator | None = None
    epoch: int = 0
    step: int = 0
    best_psnr: float = float("-inf")
    bad_steps_in_a_row: int = 0
    epoch_sums: EpochSums = field(default_factory=EpochSums)

    def state_dict(self, *, rng=None, epoch_layout=None):
        """The checkpoint: a plain dict of tensors and primitives (``torch.load(weights_only=True)`` reads it).

        Args:
            rng (list[dict] | None): every process's ``utils.get_rng_state()``, indexed by rank (default: this
                process's alone, which is all there is with one process).
            epoch_layout (dict | None): how the epoch in progress is cut into updates (``EPOCH_LAYOUT``), which a
                resume must find again.
        """
        return {"format_version": FORMAT_VERSION, "model": self.model.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema else None, "model_config": self.model_config,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "epoch": self.epoch, "step": self.step, "best_psnr": self.best_psnr,
                "bad_run": self.bad_steps_in_a_row, "partial": asdict(self.epoch_sums), "args": dict(self.args),
                "epoch_layout": epoch_layout,
                "rng": rng if rng is not None else [utils.get_rng_state()],
                "loader_generator": self.loader_generator.get_state() if self.loader_generator is not None else None}

    def count(self, result):
        """Add an optimizer update (an ``UpdateResult``) to the step, the epoch's sums and the run of bad steps."""
        sums = self.epoch_sums
        self.step += 1
        sums.seen += result.images
        if result.skipped:
            sums.skipped += 1
            self.bad_steps_in_a_row += 1
        else:
            self.bad_steps_in_a_row = 0
            sums.loss_sum += result.loss_sum
            sums.images += result.images

    @staticmethod
    def check(checkpoint, *, source):
        """Refuse a checkpoint that holds no training run's state, or one of a format newer than this code reads.

        Raises:
            ConfigError: weights alone (the message names the fine-tuning command to start from them).
            utils.CheckpointError: a newer format.
        """
        missing = [k for k in TRAINING_STATE if not isinstance(checkpoint, dict) or k not in checkpoint]
        if missing:
            raise ConfigError(f"--resume {source} holds weights, not a training run's state (no "
                              f"{', '.join(missing)}): start a run from these weights with first_stage_ft.py "
                              f"--checkpoint {source}")
        version = checkpoint.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise utils.CheckpointError(f"{source} is a checkpoint of format {version}; this trainer.py reads formats "
                                        f"up to {FORMAT_VERSION}: resume it with the newer code that wrote it")

    def load_state_dict(self, checkpoint, *, rank=0, source="the checkpoint"):
        """Restore what ``state_dict`` saved (format 1 files too), for process ``rank``.

        Raises:
            ConfigError: the checkpoint was trained with other modules or another precision.
        """
        self.check(checkpoint, source=source)
        load_weights(self.model, checkpoint["model"], name=source)  # checked: keys, shapes, finite values
        try:
            load_optimizer_state(self.optimizer, checkpoint["optimizer"])
        except ValueError as err:
            raise ConfigError(f"--resume {source}: the optimizer does not fit ({err}); resume with the same "
                              "--trainable modules") from None
        if (self.scaler is None) != (checkpoint.get("scaler") is None):
            raise ConfigError(f"--resume {source} was trained with{'out' if self.scaler else ''} --fp16: resume with "
                              "the same precision")
        if self.scaler is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None:
            load_weights(self.ema.module, checkpoint["ema"] if checkpoint.get("ema") is not None
                         else checkpoint["model"], name=f"{source} (EMA weights)")
        self.epoch, self.step, self.best_psnr = checkpoint["epoch"], checkpoint["step"], checkpoint["best_psnr"]
        self.bad_steps_in_a_row = checkpoint.get("bad_run", 0)
        saved = checkpoint.get("partial") or {}
        self.epoch_sums = EpochSums(**{f.name: saved.get(f.name, f.default) for f in fields(EpochSums)})
        if rank:  # the summed entries were summed over the processes when saved: rank 0 carries them on
            self.epoch_sums = replace(self.epoch_sums, **{k: 0 for k in EpochSums.SUMMED})
        state = rank_rng_state(checkpoint["rng"], rank)
        if state is not None:  # else this process keeps its fresh seed (--seed + rank)
            utils.set_rng_state(state)
        if checkpoint.get("loader_generator") is not None and self.loader_generator is not None:
            self.loader_generator.set_state(checkpoint["loader_generator"])


@dataclass
class Result:
    """What a finished (or stopped) run reached."""
    run_dir: Path
    epoch: int
    step: int
    best_psnr: float
    signal: int | None = None


# ------------------------------------------------------------------------------------------------------- set-up
def read_resume(args):
    """The checkpoint --resume names, read whole and checked to hold a training run's state; None without one."""
    if not args.resume:
        return None
    checkpoint = utils.load_checkpoint(args.resume, trusted=args.trust_checkpoint)
    TrainingState.check(checkpoint, source=args.resume)
    return checkpoint


def build_network(args, config, start, device):
    """The model of ``config`` on ``device``: holding the weights of ``start`` (the loaded --checkpoint of a
    fine-tuning run, its EMA weights where it has some) when given, frozen but for --trainable, on the fast path
    unless --plain."""
    if start is not None:
        model = model_from_checkpoint(start, preset=args.preset, use_ema=not args.no_ema, source=args.checkpoint)
    else:
        model = build_model(**config)
    if args.trainable:
        try:
            freeze_except(model, args.trainable)
        except ValueError as err:
            raise ConfigError(f"--trainable: {err}") from None
    model.to(device)
    if not args.plain:
        try:
            enable_fast_path(model, compile=args.compile, recompute=args.recompute)
        except ValueError as err:
            raise ConfigError(f"--recompute: {err}") from None
    return model


def wrap_ddp(model, device):
    """``model``'s DistributedDataParallel wrapper; every process starts from rank 0's weights."""
    # The fast path's channels-last activations give some convolution weight gradients other strides than their
    # parameters (on the CPU only along size-1 dimensions: the same memory, tested). DDP copies every gradient into
    # its buckets anyway; a strided copy of the weights' size costs nothing next to a step.
    warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides", UserWarning)
    return DistributedDataParallel(model, device_ids=[device.index] if device.index is not None else None)


@contextmanager
def run_folder_lock(folder):
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
def open_run_folder(args, *, epoch):
    """The run folder, taken for this run under its lock: checked again (another run may have started there since
    check_args), cleared of the temporaries of writes a killed run left, args.json written, and log.jsonl cut after
    ``epoch`` on a resume.

    Yields:
        utils.RunLog: the run's per-epoch log.
    """
    folder = Path(args.save_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(folder):
        check_run_folder(args)
        utils.remove_stale_temporaries(folder, WRITTEN_WHOLE)
        utils.remove_stale_temporaries(folder / SNAPSHOT_DIR, [snapshot_name(e) for e in range(1, args.epochs + 1)])
        utils.atomic_write(folder / "args.json", lambda f: f.write((json.dumps(vars(args), indent=2) + "\n").encode()))
        run_log = utils.RunLog(folder)
        if args.resume and run_log.path.is_file():
            run_log.truncate_after(epoch)
        yield run_log


# How the epoch in progress is cut into updates. A resume inside an epoch needs all of it again, or the rest of the
# epoch would skip or repeat images; at an epoch's end, the update the next epoch starts at (the schedule's count).
EPOCH_LAYOUT = {"batch_size": "--batch_size", "accum_steps": "--accum_steps", "processes": "processes",
                "train_pairs": "training pairs", "epoch_start": "the epoch starting at update"}


def saved_epoch_layout(checkpoint):
    """The ``EPOCH_LAYOUT`` of a checkpoint; for format 1 files, from its options and its random states (one per
    process), without the number of training pairs and the epoch's start."""
    if checkpoint.get("epoch_layout"):
        return checkpoint["epoch_layout"]
    args, rng = checkpoint.get("args") or {}, checkpoint.get("rng")
    return {"batch_size": args.get("batch_size"), "accum_steps": args.get("accum_steps"),
            "processes": len(rng) if isinstance(rng, list) else 1}


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
    saved = saved_epoch_layout(checkpoint)
    inside = state.step != saved["epoch_start"] if "epoch_start" in saved else done != 0
    changed = [f"{EPOCH_LAYOUT[key]} {saved[key]}, not {layout[key]}" for key in EPOCH_LAYOUT
               if (inside or key == "epoch_start") and saved.get(key) is not None and saved[key] != layout[key]]
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


def sum_over_processes(sums, processes):
    """An epoch's sums with the ``EpochSums.SUMMED`` entries added over the processes."""
    totals = torch.tensor([float(getattr(sums, k)) for k in EpochSums.SUMMED], dtype=torch.float64,
                          device=processes.device)
    if processes.distributed:
        dist.all_reduce(totals)
    return replace(sums, **dict(zip(EpochSums.SUMMED, totals.tolist())))


def _unwritten(path, err, run_dir):
    """The message for a checkpoint that could not be written (``utils.atomic_write`` left the old one in place)."""
    reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else err.strerror or str(err)
    return (f"{path} could not be written ({reason}); the {path.name} that was there, if any, is unchanged: make "
            f"room, then continue with --resume {run_dir}")


@torch.no_grad()
def validate(network, loader, loss_fn, *, epoch, processes, stopping=None):
    """Validation loss and the grader's PSNR (clamped, uint8-rounded), per degradation type and overall. Each process
    scores its share of ``loader``; the sums are combined. Outputs that are not finite give no PSNR: they would
    score as black images.

    Args:
        network (nn.Module): the network to validate (put in eval mode).
        loader (DataLoader): validation batches with "lq", "gt" and "kind".
        loss_fn (Callable): the training loss, ``loss_fn(pred, gt, epoch)``.
        epoch (int): epochs finished (the loss is that of the last one).
        processes (Processes): the processes validating together.
        stopping (Callable[[], bool] | None): asked before each batch; True skips the rest of the validation.

    Returns:
        dict: val_loss, and unless the outputs were not finite val_psnr and val_psnr_<kind> per type; with
        ``val_skipped`` and no scores when a stop skipped it.
    """
    network.eval()
    sums = defaultdict(lambda: [0.0, 0])  # kind -> [PSNR sum, images]; "" holds the validation loss
    for batch in tqdm(loader, desc="validation", unit="batch", leave=False, dynamic_ncols=True,
                      disable=processes.rank != 0):
        if stopping is not None and stopping():
            log.info(f"epoch {epoch}: stopping; validation skipped (this epoch is not compared for best.pth)")
            return {"val_skipped": True}
        lq, gt = batch["lq"].to(processes.device), batch["gt"].to(processes.device)
        pred = network(lq).float()
        sums[""][0] += float(loss_fn(pred, gt, epoch - 1)) * lq.shape[0]
        sums[""][1] += lq.shape[0]
        for kind, value in zip(batch["kind"], scoring.psnr_per_image(pred.clamp(0, 1), gt)):
            sums[kind][0] += value
            sums[kind][1] += 1
    if processes.distributed:
        gathered = [None] * processes.world
        dist.all_gather_object(gathered, dict(sums))
        sums = defaultdict(lambda: [0.0, 0])
        for part in gathered:
            for kind, (total, n) in part.items():
                sums[kind][0] += total
                sums[kind][1] += n
    loss_total, n = sums.pop("", (0.0, 0))
    if not math.isfinite(loss_total):
        log.warning(f"epoch {epoch}: the validation outputs are not finite; no PSNR, not a best epoch")
        return {"val_loss": loss_total / n}
    record = {"val_loss": loss_total / n, "val_psnr": sum(s for s, _ in sums.values()) / n}
    record.update({f"val_psnr_{kind}": total / count for kind, (total, count) in sorted(sums.items())})
    return record


# ---------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One training run: from scratch, fine-tuning from ``--checkpoint``, or resumed from ``--resume``.

    Args:
        args (argparse.Namespace): parsed options of ``build_parser`` (checked here with ``check_args``).
        processes (Processes | None): the processes training together (``process_group``); default: this one alone,
            on --device.
    """

    def __init__(self, args, processes=None):
        check_args(args)
        self.args, self.run_dir = args, Path(args.save_dir)
        self.processes = processes or Processes(torch.device(args.device))
        self.device, self.is_primary = self.processes.device, self.processes.rank == 0
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.benchmark = True  # training shapes are fixed (whole images or --patch_size crops)
        utils.seed_everything(args.seed + self.processes.rank)
        phases = training_phases(args)
        # The data are checked (every pair, every file) before anything big is loaded or built. Validation runs on
        # whole images in batches of the smallest micro-batch of the run (--batch_size without --progressive).
        first_loader, self.val_loader = build_loaders(
            args.data_dir, batch_size=min(p.batch_size for p in phases), num_workers=args.num_workers,
            patch_size=phases[0].patch_size, val_per_type=args.val_per_type, seed=args.seed, cache=args.cache,
            distributed=self.processes.distributed)
        self.plan = PhasePlan(phases, first_loader, args=args, processes=self.processes)
        self.data_pairs = pair_names(first_loader, self.val_loader, args.data_dir)
        resumed = read_resume(args)
        if resumed is not None:
            check_same_pairs(resumed.get("data_pairs"), self.data_pairs, args)
        self._phase = self.plan.phase_of(resumed["epoch"] if resumed is not None else 0)
        self.train_loader = self.plan.loaders[self._phase]
        start = (utils.load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)
                 if args.fine_tune and resumed is None else None)
        self.model_config = model_config(resumed or start, args.preset, source=args.resume or args.checkpoint)
        self.model = build_network(args, self.model_config, start, self.device)
        self.ddp_model = wrap_ddp(self.model, self.device) if self.processes.distributed else None
        self.ema = ModelEma(self.model, decay=args.ema, warmup=not args.ema_no_warmup) if args.ema else None
        self.policy = AugmentPolicy(  # draws from the global RNG (checkpointed)
            strong=args.augment == "strong", rates=dict(zip(STRONG_AUGMENTATIONS, args.aug_rates)),
            alphas=dict(zip(STRONG_AUGMENTATIONS, args.aug_alphas)))
        self.loss_fn = build_loss(args.loss, num_epochs=args.epochs)
        self.optimizer = build_optimizer((p for p in self.model.parameters() if p.requires_grad), lr=args.lr,
                                         weight_decay=args.weight_decay, device=self.device)
        scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
        self.update = Update(self.model, self.optimizer, loss_fn=self.loss_fn,
                             autocast_dtype=utils.PRECISIONS[args.precision], grad_clip=args.grad_clip, scaler=scaler,
                             ema=self.ema, policy=self.policy, ddp_model=self.ddp_model)
        self.schedule = {"peak_lr": args.lr, "warmup_steps": self.plan.start_of(args.warmup_epochs),
                         "total_steps": self.plan.start_of(args.epochs), "min_lr": schedule_floor(args.lr)}
        if self.schedule["min_lr"] < MIN_LR:
            log.info(f"--lr {args.lr:g} is below ten times the usual floor of the cosine ({MIN_LR:g}): it decays to "
                     f"{self.schedule['min_lr']:g}, a tenth of the peak")
        self.state = TrainingState(self.model, self.optimizer, vars(args), self.model_config, ema=self.ema,
                                   scaler=scaler, loader_generator=self.train_loader.generator)
        if resumed is not None:
            self.state.load_state_dict(resumed, rank=self.processes.rank, source=args.resume)
            check_resume(resumed, self.state, args, layout=self.plan.layout(self.state.epoch),
                         done=self._updates_done_in_epoch(), updates=self.updates_per_epoch)
            for group, decay in zip(self.optimizer.param_groups, (args.weight_decay, 0.0)):
                group["weight_decay"] = decay  # a --weight_decay given now holds (unchanged, it is the saved one)
        self._set_lr(self.state.step)

    @property
    def updates_per_epoch(self):
        """The optimizer updates of the epoch in progress (they differ between --progressive phases)."""
        return self.plan.updates_of(self.state.epoch)

    def _enter_phase(self, index):
        """Train the phase ``index`` from now on (the last phase's loader and its worker processes are let go)."""
        self.plan.release(self._phase)
        self._phase, self.train_loader = index, self.plan.loaders[index]
        self.state.loader_generator = self.train_loader.generator
        log.info(self.plan.describe_phase(index))

    # ---------------------------------------------------------------------------------------------- loop
    def fit(self, *, until_epoch=None):
        """Train to ``--epochs`` (or stop after ``until_epoch`` epochs, writing last.pth as usual).

        Returns:
            Result: the run folder, epochs and updates done, best validation PSNR, and the signal that stopped it.
        """
        last_epoch, state, stopped = min(until_epoch or self.args.epochs, self.args.epochs), self.state, False
        folder = open_run_folder(self.args, epoch=state.epoch) if self.is_primary else nullcontext()
        with folder as run_log, StopRequest() as stop:
            self._describe_run()
            while state.epoch < last_epoch and not stopped:
                stopped = self._train_epoch(stop)
                if self._updates_done_in_epoch() < self.updates_per_epoch:  # stopped inside the epoch
                    state.epoch_sums = sum_over_processes(state.epoch_sums, self.processes)
                    self._save({"last.pth"})
                    break
                self._end_epoch(run_log, stop)
                stopped = stopped or stop.signum is not None  # asked during validation: the next epoch waits
        if stopped:
            log.info(f"stopped after update {state.step}; continue with --resume {self.run_dir}")
        elif self.is_primary:
            utils.plot_curves(self.run_dir)
        return Result(self.run_dir, state.epoch, state.step, state.best_psnr,
                      (stop.signum or signal.SIGTERM) if stopped else None)

    def _describe_run(self):
        if self.args.trainable or self.args.fine_tune:
            log.info(trainable_summary(self.model))
        log.info(f"{self.plan.describe()}; device {self.device}; run folder {self.run_dir}")
        if self.plan.progressive:
            log.info(self.plan.describe_phase(self._phase))

    def _updates_done_in_epoch(self):
        """The updates done in the epoch in progress: the step less the updates of the epochs before it."""
        return self.state.step - self.plan.start_of(self.state.epoch)

    def _train_epoch(self, stop):
        """Train the epoch in progress to its end (its rest, after a resume inside it), or until a stop.

        Returns:
            bool: whether the run was stopped.
        """
        if self.plan.phase_of(self.state.epoch) != self._phase:
            self._enter_phase(self.plan.phase_of(self.state.epoch))
        loader, done = self.train_loader, self._updates_done_in_epoch()
        loader.sampler.set_epoch(self.state.epoch)
        groups = _micro_batch_groups(iter(loader), self.args.accum_steps)
        for _ in range(done):  # items are seeded by the sampler: skipping re-reads them without drawing at random
            next(groups)
        if done == 0:
            self.state.epoch_sums = EpochSums()
        sums = self.state.epoch_sums
        self.model.train()
        bar = tqdm(total=len(loader), initial=done * self.args.accum_steps, unit="batch", leave=False,
                   desc=f"epoch {self.state.epoch + 1}/{self.args.epochs}", dynamic_ncols=True,
                   disable=not self.is_primary)
        start, time_before, seen_before = time.perf_counter(), sums.time_s, sums.seen
        with bar:
            while True:
                try:
                    group = next(groups)
                except StopIteration:
                    return False
                except DataError as err:
                    raise self._stopped_by_data(err) from None
                except Exception:
                    # A signal can kill the loader's workers: with one process that is a stop between updates (the
                    # weights match the step). With several, the others wait in this update's collectives, so the
                    # error is raised (last.pth keeps the last finished epoch).
                    if stop.signum is None or self.processes.distributed:
                        raise
                    return True
                result = self._take_step(group, stop)
                self._count(result)
                sums.time_s = time_before + time.perf_counter() - start
                bar.update(len(group))
                if not result.skipped:
                    rate = (sums.seen - seen_before) * self.processes.world / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{result.loss_sum / result.images:.4f}", img_s=f"{rate:.1f}",
                                    lr=f"{self.optimizer.param_groups[0]['lr']:.2e}", refresh=False)
                if result.stop:
                    return True

    def _take_step(self, group, stop):
        """One optimizer update (``self.update``) at the learning rate of its step."""
        self._set_lr(self.state.step)
        return self.update(group, epoch=self.state.epoch, step=self.state.step,
                           stop_requested=lambda: stop.signum is not None)

    def _set_lr(self, step):
        """Give every parameter group the learning rate of update ``step``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, **self.schedule)

    def _count(self, result):
        """Count an update in the state; raise when the run of skipped ones reaches --max_bad_steps."""
        state = self.state
        state.count(result)
        if not result.skipped:
            return
        log.warning(f"epoch {state.epoch + 1} update {state.step}: non-finite loss or gradient, step skipped")
        if state.bad_steps_in_a_row >= self.args.max_bad_steps:
            raise TrainingError(
                f"{state.bad_steps_in_a_row} updates in a row had a non-finite loss or gradient (epoch "
                f"{state.epoch + 1}, update {state.step}); last.pth, if any, keeps the state after epoch "
                f"{state.epoch}. Try a lower --lr, --bf16 instead of --fp16, or check the data")

    def _stopped_by_data(self, err):
        """The error that ends a run whose data loader met a file it cannot read, after saving the state of the
        last finished update as a stop does (one process; with several, the others cannot join the save)."""
        if self.processes.distributed:
            return DataError(f"{err} (last.pth keeps the state of the last finished epoch)")
        self._save({"last.pth"})
        return DataError(f"{err}. last.pth holds the run after update {self.state.step}: continue it with "
                         f"--resume {self.run_dir} once the file is back")

    def _end_epoch(self, run_log, stop=None):
        """Validate when it is time; write last.pth (and best.pth when validation improved, or every epoch without
        validation); log the epoch and say how it went."""
        sums, state = sum_over_processes(self.state.epoch_sums, self.processes), self.state
        if not torch.stack([p.isfinite().all() for p in self.model.parameters()]).all():
            raise TrainingError(f"the weights are no longer finite after update {state.step} (epoch "
                                f"{state.epoch + 1}); nothing of this epoch is saved (last.pth, if any, keeps epoch "
                                f"{state.epoch}). Try a lower --lr, or --bf16 instead of --fp16")
        state.epoch += 1
        phase = self.plan.phases[self.plan.phase_of(state.epoch - 1)]
        record = {"epoch": state.epoch, "step": state.step, "lr": lr_at(state.step, **self.schedule),
                  "patch_size": phase.patch_size, "batch_size": phase.batch_size,
                  "train_loss": sums.loss_sum / sums.images if sums.images else None,
                  "images_per_s": sums.seen / sums.time_s if sums.time_s else None,
                  "skipped_steps": sums.skipped, "time_s": sums.time_s, "val_loss": None, "val_psnr": None}
        if self.val_loader is not None and (state.epoch % self.args.val_interval == 0
                                            or state.epoch == self.args.epochs):
            record.update(self.validate(stop))
        improved = record["val_psnr"] is not None and record["val_psnr"] > state.best_psnr
        if improved:
            state.best_psnr = record["val_psnr"]
        self._save({"last.pth"} | ({"best.pth"} if improved or self.val_loader is None else set()))
        if self.args.keep_last and self.is_primary:
            write_snapshot(self.run_dir, state, keep=self.args.keep_last)
        if run_log is not None:
            run_log.append(record)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "time_s")
        log.info(f"epoch {state.epoch}/{self.args.epochs}: {shown}" + (" (best)" if improved else ""))

    # ----------------------------------------------------------------------------------------- validation
    def validate(self, stop=None):
        """Validate the EMA weights when they are kept, else the model's (see ``validate``); a stop asked for before
        or during it skips the rest (one process: with several, all must take part in each batch)."""
        stopping = (lambda: stop.signum is not None) if stop is not None and not self.processes.distributed else None
        record = validate(self.ema.module if self.ema else self.model, self.val_loader, self.loss_fn,
                          epoch=self.state.epoch, processes=self.processes, stopping=stopping)
        self.model.train()
        return record

    def _save(self, names):
        """Write the state under each name in the run folder (the primary process writes; every process must call
        it, since it gathers their random states, and all wait for the file)."""
        rng = [utils.get_rng_state()]
        if self.processes.distributed:
            rng = [None] * self.processes.world
            dist.all_gather_object(rng, utils.get_rng_state())
        if self.is_primary:
            checkpoint = self.state.state_dict(rng=rng, epoch_layout=self.plan.layout(self.state.epoch))
            checkpoint["data_pairs"] = self.data_pairs  # a resume must find the same pairs (check_same_pairs)
            for path in sorted(self.run_dir / name for name in names):
                try:
                    utils.save_checkpoint(path, checkpoint)
                except OSError as err:
                    raise TrainingError(_unwritten(path, err, self.run_dir)) from err
        if self.processes.distributed:
            dist.barrier()


def train(args, *, until_epoch=None):
    """Run the training the options describe (see ``Trainer``) in the processes torchrun started, or in this one
    alone, and return its ``Result``."""
    with process_group(args.device) as processes:
        return Trainer(args, processes).fit(until_epoch=until_epoch)


def main(argv=None, *, parser=None):
    """Command-line entry point; the fine-tuning scripts pass their own ``parser`` (see ``build_parser``)."""
    utils.setup_logging()
    parser = parser or build_parser()
    def work():
        with utils.terminate_as_interrupt():  # a SIGTERM before the loop (the data check) ends with one line
            return train(parse_args(parser, argv))

    result = utils.run_cli(parser.prog, work)
    if result.signal is not None:
        sys.exit(128 + result.signal)


def fine_tuning_cli(defaults, description):
    """The ``build_parser()`` and ``main(argv=None)`` of a fine-tuning script: trainer.py's command line and loop with
    the stage's ``defaults`` (see ``build_parser``), plus ``--checkpoint`` and ``--trainable``."""
    def stage_parser():
        return build_parser(defaults, fine_tune=True, description=description)

    def stage_main(argv=None):
        main(argv, parser=stage_parser())

    return stage_parser, stage_main


if __name__ == "__main__":
    main()
