"""The training loop of PromptIR for rain and snow removal, its command line, and training from scratch.

    python trainer.py --data_dir datasets --fp16 --save_dir gfl_ckpt        # the original recipe
    python trainer.py --data_dir datasets --save_dir gfl_ckpt --resume gfl_ckpt   # continue where it stopped
    torchrun --nproc_per_node=4 trainer.py --data_dir datasets --bf16       # several GPUs (--batch_size is per GPU)

``first_stage_ft.py`` and ``second_stage_ft.py`` run the same loop with their own defaults. The run folder
(``--save_dir``) holds args.json, log.jsonl (one record per epoch), last.pth (after every epoch, and on Ctrl-C or
SIGTERM), best.pth (best validation PSNR), the curves drawn at the end (not with --no_curves), and with --keep_last K
the weights of the newest K epochs (snapshots/, for ``avg_checkpoints.py``); ``run.py`` owns its rules. One run at a
time writes into a folder (it holds ``.lock``); a folder holding files of a run takes no other run, only ``--resume``.

    python trainer.py --data_dir datasets --epochs 250 --progressive 128:8:100 192:4:100 whole:2:50
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import signal
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from tqdm import tqdm

import recipes
import run
import scoring
import utils
from augment import DEFAULT_ALPHAS, DEFAULT_RATES, STRONG_AUGMENTATIONS, AugmentPolicy
from dataloader import DataError, build_loaders
from ema import ModelEma
from fast_path import enable_fast_path
from GFL_Loss import LOSSES, WithFFT, build_loss, fft_weight_option
from model import (MIN_SIZE, PRESETS, add_arch_argument, build_model, freeze_except, load_weights, model_config,
                   model_from_checkpoint, trainable_summary)
from schedule import (MIN_LR, MIN_PATCH, Phase, PhasePlan, lr_at, schedule_floor,  # noqa: F401 (Phase: API)
                      training_phases)
from utils import ConfigError

log = logging.getLogger(__name__)

# 2: the learning rate is a function of the step (no "scheduler" entry). Format 1 training states do not resume;
# their weights load wherever weights are read.
FORMAT_VERSION = 2
# What --resume needs from a checkpoint (weights alone start a fine-tuning run instead).
TRAINING_STATE = ("model", "optimizer", "epoch", "step", "rng", "args")
# The largest --seed: the generators take seed + epoch (the sampler) and seed + rank, and torch's take at most 2**64-1.
MAX_SEED = 2**63 - 1
TRAIN_DEFAULTS = {"lr": 2e-4, "epochs": 250, "warmup_epochs": 10, "loss": "gfl", "augment": "strong",
                  "save_dir": "checkpoints"}


class TrainingError(utils.WorkError, RuntimeError):
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
    data.add_argument("--progressive", nargs="+", default=None, metavar="PATCH:BATCH:EPOCHS",
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
    opt.add_argument("--fft_weight", type=fft_weight_option, default=0.0, metavar="W",
                     help="add W x mean |FFT(pred) - FFT(target)| to the loss (MoCE-IR's term; default 0: off)")
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
    folder = p.add_argument_group("run")
    folder.add_argument("--save_dir", default=None,
                     help=f"run folder (default: the --resume folder, else {d['save_dir']})")
    folder.add_argument("--resume", default=None,
                     help="continue from a checkpoint, or a run folder (its last.pth), with the options it was "
                          "started with; options given on this command line override them (e.g. a larger --epochs)")
    folder.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="model size (default official; with --resume or --checkpoint the checkpoint's own "
                          "config is used, and a --preset given must match it)")
    recipes.add_recipe_argument(folder)
    add_arch_argument(folder)
    folder.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    folder.add_argument("--val_interval", type=int, default=1, help="validate every this many epochs (default 1)")
    folder.add_argument("--keep_last", type=int, default=0, metavar="K",
                     help="after every epoch write the weights (and EMA) to snapshots/epoch_N.pth and keep the "
                          "newest K, for avg_checkpoints.py (default 0: none)")
    folder.add_argument("--no_curves", action="store_true",
                        help="do not draw the curves at the end (python utils.py RUN_DIR draws them at any time)")
    folder.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    folder.add_argument("--trust_checkpoint", action="store_true",
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
        ft.add_argument("--checkpoint", help="weights to start from: a checkpoint, or a run folder (its best.pth); "
                        "required unless --resume")
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
                            "no_curves", "no_ema"})
PRECISION_OPTIONS = ("precision", "fp16", "bf16")


def command_line(parser, argv=None):
    """Parse the command line. With ``--resume`` (a checkpoint, or a run folder standing for its last.pth) the
    checkpoint is read, once, and checked to hold a training state this code resumes; the options it recorded become
    the defaults and the command line is parsed again, so only options given now override them (``PER_INVOCATION``
    ones are never taken from it, and the precision is carried over as a whole unless one of --precision, --fp16 or
    --bf16 is given now).

    Args:
        parser (argparse.ArgumentParser): from ``build_parser``.
        argv (Sequence[str] | None): the options (default ``sys.argv[1:]``).

    Returns:
        tuple[argparse.Namespace, dict | None]: the options of the run, and the --resume checkpoint.
    """
    args = recipes.parse_args(parser, argv)
    if not args.resume:
        return args, None
    resumed = read_resume(args)
    given_precision = any(getattr(args, name) for name in PRECISION_OPTIONS)
    known = set(vars(args)) - PER_INVOCATION - (set(PRECISION_OPTIONS) if given_precision else set())
    parser.set_defaults(**{key: value for key, value in resumed["args"].items() if key in known})
    # the saved options already hold what the run's recipe set: parsed plainly, not through the recipe again
    resume, args = args.resume, parser.parse_args(argv)
    args.resume = resume
    return args, resumed


def parse_args(parser, argv=None):
    """The options of ``command_line`` alone (for callers that build the ``Trainer`` themselves)."""
    return command_line(parser, argv)[0]


def read_resume(args):
    """The checkpoint --resume names (``args.resume`` becomes the file), read whole and checked to hold a training
    state this code resumes."""
    args.resume = str(run.checkpoint_file(args.resume, prefer=run.LAST, option="--resume"))
    checkpoint = utils.load_checkpoint(args.resume, trusted=args.trust_checkpoint)
    TrainingState.check(checkpoint, source=args.resume)
    return checkpoint


@dataclass(frozen=True)
class Checked:
    """What ``check_args`` builds from the options while checking them, for the run to use as built.

    Args:
        phases (list[Phase]): the run's phases (``training_phases``).
        policy (AugmentPolicy): the augmentation policy of --augment, --aug_rates and --aug_alphas.
    """
    phases: list
    policy: AugmentPolicy


def check_args(args):
    """Fail on options that contradict each other or point at nothing, before any work starts; fills in
    ``save_dir``, ``device`` and ``precision``.

    Returns:
        Checked: the phases and the augmentation policy, built once.

    Raises:
        ConfigError: with what to do.
    """
    _check_numbers(args)
    try:
        policy = AugmentPolicy(strong=args.augment == "strong", rates=dict(zip(STRONG_AUGMENTATIONS, args.aug_rates)),
                               alphas=dict(zip(STRONG_AUGMENTATIONS, args.aug_alphas)))
    except ValueError as err:
        raise ConfigError(f"--aug_rates / --aug_alphas: {err}") from None
    if args.progressive and args.patch_size is not None:
        log.warning(f"--patch_size {args.patch_size} is not used: the --progressive phases set the crops")
    if args.patch_size is not None and args.patch_size < MIN_PATCH:
        raise ConfigError(f"--patch_size must be at least {MIN_PATCH} pixels, got {args.patch_size}")
    if args.keep_last < 0:
        raise ConfigError(f"--keep_last is a number of snapshots, 0 for none; got {args.keep_last}")
    phases = training_phases(args)
    if not Path(args.data_dir).is_dir():
        raise ConfigError(f"--data_dir {args.data_dir} is not a folder: point it at the dataset root")
    if args.resume:
        args.resume = str(run.checkpoint_file(args.resume, prefer=run.LAST, option="--resume"))
    elif args.fine_tune:
        if not args.checkpoint:
            raise ConfigError("fine-tuning starts from weights: pass --checkpoint PATH (or --resume to continue a "
                              "fine-tuning run)")
        args.checkpoint = str(run.checkpoint_file(args.checkpoint, prefer=run.BEST, option="--checkpoint"))
    args.save_dir = str(args.save_dir or (Path(args.resume).parent if args.resume else args.default_save_dir))
    run.check_run_folder_outside_data(args)
    run.check_run_folder(args.save_dir, resume=args.resume)
    device = utils.resolve_device(args.device)
    utils.resolve_precision(args, device, training=True)
    if args.plain and (args.compile or args.recompute):
        raise ConfigError("--compile and --recompute work on the fast path: drop --plain or drop them")
    if args.compile and device.type != "cuda":
        raise ConfigError("--compile needs a CUDA device: on the CPU the fast path without it is the quicker one")
    args.device = str(device)
    return Checked(phases, policy)


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


# -------------------------------------------------------------------------------------------- the update
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
            epoch_layout (dict | None): how the epoch in progress is cut into updates (``run.EPOCH_LAYOUT``), which a
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

    def weights(self):
        """The weights alone (and the EMA's), for a snapshot: a plain weights checkpoint."""
        return {"format_version": FORMAT_VERSION, "model": self.model.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema else None, "model_config": self.model_config,
                "epoch": self.epoch}

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
        if version < FORMAT_VERSION:
            raise utils.CheckpointError(
                f"--resume {source} is a training state of format {version}, which this trainer.py no longer "
                f"resumes; its weights still load for fine-tuning and prediction (first_stage_ft.py --checkpoint "
                f"{source}, inference.py --checkpoint {source})")

    def load_state_dict(self, checkpoint, *, rank=0, source="the checkpoint"):
        """Restore what ``state_dict`` saved (a checkpoint ``check`` accepted), for process ``rank``.

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
        if (self.scaler is None) != (checkpoint["scaler"] is None):
            raise ConfigError(f"--resume {source} was trained with{'out' if self.scaler else ''} --fp16: resume with "
                              "the same precision")
        if self.scaler is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.ema is not None:
            load_weights(self.ema.module, checkpoint["ema"] if checkpoint["ema"] is not None
                         else checkpoint["model"], name=f"{source} (EMA weights)")
        self.epoch, self.step, self.best_psnr = checkpoint["epoch"], checkpoint["step"], checkpoint["best_psnr"]
        self.bad_steps_in_a_row = checkpoint["bad_run"]
        self.epoch_sums = EpochSums(**checkpoint["partial"])
        if rank:  # the summed entries were summed over the processes when saved: rank 0 carries them on
            self.epoch_sums = replace(self.epoch_sums, **{k: 0 for k in EpochSums.SUMMED})
        if rank < len(checkpoint["rng"]):  # else this process keeps its fresh seed (--seed + rank)
            utils.set_rng_state(checkpoint["rng"][rank])
        if self.loader_generator is not None:
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
def build_network(args, config, start, device):
    """The model of ``config`` on ``device``: holding the weights of ``start`` (the loaded --checkpoint of a
    fine-tuning run, its EMA weights where it has some) when given, frozen but for --trainable, on the fast path
    unless --plain."""
    if start is not None:
        model = model_from_checkpoint(start, preset=args.preset, arch=args.arch, use_ema=not args.no_ema,
                                      source=args.checkpoint)
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


def sum_over_processes(sums, processes):
    """An epoch's sums with the ``EpochSums.SUMMED`` entries added over the processes."""
    totals = torch.tensor([float(getattr(sums, k)) for k in EpochSums.SUMMED], dtype=torch.float64,
                          device=processes.device)
    if processes.distributed:
        dist.all_reduce(totals)
    return replace(sums, **dict(zip(EpochSums.SUMMED, totals.tolist())))


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
        processes (run.Processes): the processes validating together.
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
        args (argparse.Namespace): parsed options of ``build_parser``.
        processes (run.Processes | None): the processes training together (``run.process_group``); default: this
            one alone, on --device.
        checked (Checked | None): what ``check_args(args)`` returned; default: the options are checked here.
        resumed (dict | None): the --resume checkpoint as ``command_line`` read it; default: read here.
    """

    def __init__(self, args, processes=None, *, checked=None, resumed=None):
        checked = checked or check_args(args)
        self.args, self.run_dir = args, Path(args.save_dir)
        self.processes = processes or run.Processes(torch.device(args.device))
        self.device, self.is_primary = self.processes.device, self.processes.rank == 0
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.benchmark = True  # training shapes are fixed (whole images or --patch_size crops)
        utils.seed_everything(args.seed + self.processes.rank)
        # The data are checked (every pair, every file) before anything big is loaded or built. Validation runs on
        # whole images in batches of the smallest micro-batch of the run (--batch_size without --progressive).
        phases = checked.phases
        first_loader, self.val_loader = build_loaders(
            args.data_dir, batch_size=min(p.batch_size for p in phases), num_workers=args.num_workers,
            patch_size=phases[0].patch_size, val_per_type=args.val_per_type, seed=args.seed, cache=args.cache,
            distributed=self.processes.distributed, min_size=MIN_SIZE)
        self.plan = PhasePlan(phases, first_loader, args=args, processes=self.processes)
        if resumed is None and args.resume:
            resumed = read_resume(args)
        self.data_pairs = run.pair_names(first_loader, self.val_loader, args.data_dir)
        if resumed is not None:
            run.check_same_pairs(resumed.get("data_pairs"), self.data_pairs, args)
        self._phase = self.plan.phase_of(resumed["epoch"] if resumed is not None else 0)
        self.train_loader = self.plan.loaders[self._phase]
        self._build(resumed, checked.policy)
        if resumed is not None:
            self._restore(resumed)
        self._set_lr(self.state.step)

    def _build(self, resumed, policy):
        """The network (from the --checkpoint of a new fine-tuning run), its EMA, loss, optimizer, update, schedule
        and state."""
        args, self.policy = self.args, policy
        start = (utils.load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)
                 if args.fine_tune and resumed is None else None)
        self.model_config = model_config(resumed or start, args.preset, arch=args.arch,
                                         source=args.resume or args.checkpoint)
        self.model = build_network(args, self.model_config, start, self.device)
        self.ddp_model = run.wrap_ddp(self.model, self.device) if self.processes.distributed else None
        self.ema = ModelEma(self.model, decay=args.ema, warmup=not args.ema_no_warmup) if args.ema else None
        self.loss_fn = build_loss(args.loss, num_epochs=args.epochs)
        if args.fft_weight:
            self.loss_fn = WithFFT(self.loss_fn, args.fft_weight)
        self.optimizer = build_optimizer((p for p in self.model.parameters() if p.requires_grad), lr=args.lr,
                                         weight_decay=args.weight_decay, device=self.device)
        scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
        self.update = Update(self.model, self.optimizer, loss_fn=self.loss_fn,  # the policy draws from the global RNG
                             autocast_dtype=utils.PRECISIONS[args.precision], grad_clip=args.grad_clip, scaler=scaler,
                             ema=self.ema, policy=policy, ddp_model=self.ddp_model)
        self.schedule = {"peak_lr": args.lr, "warmup_steps": self.plan.start_of(args.warmup_epochs),
                         "total_steps": self.plan.start_of(args.epochs), "min_lr": schedule_floor(args.lr)}
        if self.schedule["min_lr"] < MIN_LR:
            log.info(f"--lr {args.lr:g} is below ten times the usual floor of the cosine ({MIN_LR:g}): it decays to "
                     f"{self.schedule['min_lr']:g}, a tenth of the peak")
        self.state = TrainingState(self.model, self.optimizer, vars(args), self.model_config, ema=self.ema,
                                   scaler=scaler, loader_generator=self.train_loader.generator)

    def _restore(self, resumed):
        """Continue the state of the --resume checkpoint, once it is known to fit this run."""
        self.state.load_state_dict(resumed, rank=self.processes.rank, source=self.args.resume)
        run.check_resume(resumed, self.state, self.args, layout=self.plan.layout(self.state.epoch),
                     done=self._updates_done_in_epoch(), updates=self.updates_per_epoch)
        for group, decay in zip(self.optimizer.param_groups, (self.args.weight_decay, 0.0)):
            group["weight_decay"] = decay  # a --weight_decay given now holds (unchanged, it is the saved one)

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
        folder = run.open_run_folder(self.args.save_dir, vars(self.args), resume=self.args.resume, epoch=state.epoch,
                                     epochs=self.args.epochs) if self.is_primary else nullcontext()
        with folder as run_log, run.StopRequest() as stop, self.plan.workers_closed(self.val_loader):
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
        elif self.is_primary and not self.args.no_curves:
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
            return TrainingError(f"{err} (last.pth keeps the state of the last finished epoch)")
        self._save({"last.pth"})
        return TrainingError(f"{err}. last.pth holds the run after update {self.state.step}: continue it with "
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
            run.write_snapshot(self.run_dir, state.epoch, state.weights(), keep=self.args.keep_last)
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
            run.save(sorted(self.run_dir / name for name in names), checkpoint, run_dir=self.run_dir)
        if self.processes.distributed:
            dist.barrier()


def train(args, *, resumed=None, until_epoch=None):
    """Run the training the options describe (see ``Trainer``) in the processes torchrun started, or in this one
    alone, and return its ``Result``."""
    checked = check_args(args)
    with run.process_group(torch.device(args.device)) as processes:
        return Trainer(args, processes, checked=checked, resumed=resumed).fit(until_epoch=until_epoch)


def main(argv=None, *, parser=None):
    """Command-line entry point; the fine-tuning scripts pass their own ``parser`` (see ``build_parser``)."""
    utils.setup_logging()
    parser = parser or build_parser()
    def work():
        with run.terminate_as_interrupt():  # a SIGTERM before the loop (the data check) ends with one line
            args, resumed = command_line(parser, argv)
            return train(args, resumed=resumed)

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
