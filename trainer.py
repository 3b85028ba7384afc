"""The training loop of PromptIR for rain and snow removal, its command line, and training from scratch.

    python trainer.py --data_dir datasets --fp16 --save_dir gfl_ckpt        # the original recipe
    python trainer.py --data_dir datasets --save_dir gfl_ckpt --resume gfl_ckpt   # continue where it stopped
    torchrun --nproc_per_node=4 trainer.py --data_dir datasets --bf16       # several GPUs (--batch_size is per GPU)

``first_stage_ft.py`` and ``second_stage_ft.py`` run the same loop with their own defaults. The run folder
(``--save_dir``) holds args.json, log.jsonl (one record per epoch), last.pth (after every epoch, and on Ctrl-C or
SIGTERM), best.pth (best validation PSNR) and the curves drawn at the end.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import scoring
import utils
from augment import DEFAULT_ALPHAS, DEFAULT_RATES, STRONG_AUGMENTATIONS, AugmentPolicy
from dataloader import DataError, build_loaders
from GFL_Loss import LOSSES, build_loss
from model import PRESETS, build_model, enable_fast_path, freeze_except, load_weights, trainable_summary

FORMAT_VERSION = 1
# What --resume needs from a checkpoint (weights alone start a fine-tuning run instead).
TRAINING_STATE = ("model", "optimizer", "scheduler", "epoch", "step", "rng")
MIN_LR = 1e-6  # where the cosine ends
TRAIN_DEFAULTS = {"lr": 2e-4, "epochs": 250, "warmup_epochs": 10, "loss": "gfl", "augment": "strong",
                  "save_dir": "checkpoints"}


class ConfigError(ValueError):
    """Options that contradict each other or point at nothing; the message says what to do."""


class TrainingError(RuntimeError):
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
    p = argparse.ArgumentParser(description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data_dir", required=True, help="dataset root (see dataloader.py for the layouts)")
    data.add_argument("--batch_size", type=int, default=2, help="images per micro-batch per GPU (default 2)")
    data.add_argument("--num_workers", type=int, default=4, help="data loader processes (default 4)")
    data.add_argument("--patch_size", type=int, default=None,
                      help="train on random square crops of this size (default: whole images)")
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
    opt.add_argument("--max_bad_steps", type=int, default=20,
                     help="stop after this many steps in a row with a non-finite loss or gradient (default 20)")
    opt.add_argument("--fp16", action="store_true", help="float16 autocast with loss scaling (CUDA only)")
    opt.add_argument("--bf16", action="store_true", help="bfloat16 autocast, no loss scaling (not with --fp16)")
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
    p.set_defaults(fine_tune=fine_tune, default_save_dir=d["save_dir"], checkpoint=None, trainable=None)
    if fine_tune:
        ft = p.add_argument_group("fine-tuning")
        ft.add_argument("--checkpoint", help="weights to start from (required unless --resume)")
        ft.add_argument("--trainable", nargs="+", default=d.get("trainable"), metavar="MODULE",
                        help="train only these top-level modules (default: "
                             f"{' '.join(d['trainable']) if d.get('trainable') else 'all'})")
    return p


# Options that describe this invocation, not the run: on --resume they are not taken from the checkpoint. The data
# folder is given every time; the run folder defaults to the --resume folder (wherever it lies now); the device, the
# data loader processes and the speed options belong to the machine (they do not change what is computed, and a
# carried-over flag such as --compile could not be switched off again); trusting pickle is asked for each time; and
# fine_tune, default_save_dir and checkpoint belong to the script (--checkpoint only seeds a new fine-tuning run).
PER_INVOCATION = frozenset({"resume", "save_dir", "data_dir", "device", "trust_checkpoint", "num_workers", "cache",
                            "plain", "compile", "recompute", "fine_tune", "default_save_dir", "checkpoint"})


def parse_args(parser, argv=None):
    """Parse the command line; with ``--resume``, the options recorded in the checkpoint (its ``args``) become the
    defaults and the command line is parsed again, so only options given now override them (``PER_INVOCATION``
    ones are never taken from the checkpoint).

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
    ckpt = utils.load_checkpoint(_run_file(args.resume), trusted=args.trust_checkpoint, mmap=True)
    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        return args
    known = set(vars(args)) - PER_INVOCATION
    parser.set_defaults(**{key: value for key, value in saved.items() if key in known})
    return parser.parse_args(argv)


def _run_file(path):
    """A checkpoint path, or a run folder standing for its last.pth."""
    path = Path(path)
    return path / "last.pth" if path.is_dir() else path


def check_args(args):
    """Fail on options that contradict each other or point at nothing, before any work starts; fills in
    ``save_dir`` and ``device``. Raises ConfigError with what to do."""
    if args.fp16 and args.bf16:
        raise ConfigError("--fp16 and --bf16 exclude each other: pick one (bf16 needs no loss scaling)")
    for name, low in (("batch_size", 1), ("accum_steps", 1), ("epochs", 1), ("val_interval", 1),
                      ("max_bad_steps", 1), ("num_workers", 0), ("warmup_epochs", 0), ("val_per_type", 0)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name} must be at least {low}, got {getattr(args, name)}")
    if args.warmup_epochs >= args.epochs:
        raise ConfigError(f"--warmup_epochs ({args.warmup_epochs}) must be smaller than --epochs ({args.epochs}): "
                          "lower the warm-up or train longer")
    if not args.lr > 0 or args.weight_decay < 0 or args.grad_clip < 0:
        raise ConfigError("--lr must be > 0, --weight_decay and --grad_clip >= 0")
    if args.ema is not None and not 0 < args.ema < 1:
        raise ConfigError(f"--ema is a decay between 0 and 1 (e.g. 0.999), got {args.ema}")
    try:
        AugmentPolicy(rates=dict(zip(STRONG_AUGMENTATIONS, args.aug_rates)),
                      alphas=dict(zip(STRONG_AUGMENTATIONS, args.aug_alphas)))
    except ValueError as err:
        raise ConfigError(f"--aug_rates / --aug_alphas: {err}") from None
    if args.patch_size is not None and args.patch_size < 8:
        raise ConfigError(f"--patch_size must be at least 8 pixels, got {args.patch_size}")
    if not Path(args.data_dir).is_dir():
        raise ConfigError(f"--data_dir {args.data_dir} is not a folder: point it at the dataset root")
    if args.resume:
        args.resume = str(_run_file(args.resume))
        if not Path(args.resume).is_file():
            raise ConfigError(f"--resume {args.resume} does not exist: give a checkpoint or a run folder with last.pth")
    if args.fine_tune and not args.resume:
        if not args.checkpoint:
            raise ConfigError("fine-tuning starts from weights: pass --checkpoint PATH (or --resume to continue a "
                              "fine-tuning run)")
        if not Path(args.checkpoint).is_file():
            raise ConfigError(f"--checkpoint {args.checkpoint} does not exist")
    args.save_dir = str(args.save_dir or (Path(args.resume).parent if args.resume else args.default_save_dir))
    last = Path(args.save_dir) / "last.pth"
    if last.is_file() and not (args.resume and Path(args.resume).parent.resolve() == last.parent.resolve()):
        raise ConfigError(f"{args.save_dir} already holds a run (last.pth): continue it with --resume "
                          f"{args.save_dir}, or choose another --save_dir")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {args.device}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available here; use --device cpu")
    if args.plain and (args.compile or args.recompute):
        raise ConfigError("--compile and --recompute work on the fast path: drop --plain or drop them")
    if args.compile and device.type != "cuda":
        raise ConfigError("--compile needs a CUDA device: on the CPU the fast path without it is the quicker one")
    if args.fp16 and device.type != "cuda":
        raise ConfigError("--fp16 needs a CUDA device (float16 autocast on the CPU is slow and unscaled): "
                          "use --bf16 or leave both off")
    args.device = str(device)


# -------------------------------------------------------------------------------------------------- helpers
class EMA:
    """Exponential moving average of a network's weights and buffers, updated after every optimizer step.

    Args:
        model (nn.Module): the network to follow; a frozen copy in eval mode is kept as ``self.module``.
        decay (float): weight of the old average at each update, e.g. 0.999.
    """

    def __init__(self, model, *, decay):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        torch._foreach_lerp_(list(self.module.state_dict().values()), list(model.state_dict().values()),
                             1 - self.decay)


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
        self.signum = None
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
            raise KeyboardInterrupt
        self.signum, self._first = signum, time.monotonic()
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this optimizer update and writing last.pth "
                   "(send it again to quit at once, without saving)")


def lr_factor(step, *, warmup_steps, total_steps, min_factor):
    """Learning rate of update ``step`` (0-based) relative to the peak: linear warm-up, then cosine to
    ``min_factor``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


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
        ema (EMA | None): updated after every step taken.
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

    def __call__(self, group, *, epoch, stop_requested=False):
        """Run the update.

        Args:
            group (list[dict]): micro-batches with "lq" and "gt" image tensors (moved to the model's device here).
            epoch (int): the 0-based epoch, for losses that change with it.
            stop_requested (bool): this process was asked to stop.

        Returns:
            UpdateResult
        """
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
        return self._step(loss_sum, images, stop_requested)

    def _step(self, loss_sum, images, stop_requested):
        """Clip, then step unless the loss or the gradient norm is not finite on some process."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf"))
        flags = torch.stack([~torch.isfinite(norm) | ~torch.isfinite(loss_sum),
                             torch.tensor(stop_requested, device=self.device)]).float()
        if self.ddp_model is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skipped, stop, value = torch.cat([flags, loss_sum.view(1).float()]).tolist()
        if not skipped:
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            if self.ema:
                self.ema.update(self.model)
        if self.scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return UpdateResult(bool(skipped), bool(stop), value, images)


def _groups(batches, size):
    """Consecutive lists of ``size`` batches (the last one may be shorter): one optimizer update each."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


# An epoch's running sums: the SUMMED ones are added over the processes at the epoch's end; skipped steps (agreed by
# all processes) and the training time are the same on every process.
SUMMED = ("loss_sum", "images", "seen")


def _fresh_partial():
    return {"loss_sum": 0.0, "images": 0, "seen": 0, "skipped": 0, "time_s": 0.0}


def rank_rng_state(saved, rank):
    """The random state process ``rank`` resumes with: ``saved`` is a checkpoint's "rng", a list indexed by rank
    (or, in checkpoints written before, rank 0's state alone). None when it holds none for this rank."""
    states = saved if isinstance(saved, list) else [saved]
    return states[rank] if rank < len(states) else None


@dataclass
class Result:
    """What a finished (or stopped) run reached."""
    run_dir: Path
    epoch: int
    step: int
    best_psnr: float
    signal: int | None = None


# ---------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One training run: from scratch, fine-tuning from ``--checkpoint``, or resumed from ``--resume``.

    Args:
        args (argparse.Namespace): parsed options of ``build_parser`` (checked here with ``check_args``).
    """

    def __init__(self, args):
        check_args(args)
        self.args = args
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.device = torch.device(args.device)
        if self.distributed:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            if self.device.type == "cuda":
                self.device = torch.device("cuda", local_rank)
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.main = self.rank == 0
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.benchmark = True  # training shapes are fixed (whole images or --patch_size crops)
        utils.seed_everything(args.seed + self.rank)
        self.run_dir = Path(args.save_dir)
        # The data are checked (every pair, every file) before anything big is loaded or built.
        self.train_loader, self.val_loader = build_loaders(
            args.data_dir, batch_size=args.batch_size, num_workers=args.num_workers, patch_size=args.patch_size,
            val_per_type=args.val_per_type, seed=args.seed, cache=args.cache, distributed=self.distributed)
        self.updates_per_epoch = math.ceil(len(self.train_loader) / args.accum_steps)

        resume = utils.load_checkpoint(args.resume, trusted=args.trust_checkpoint) if args.resume else None
        if resume is not None:
            missing = [k for k in TRAINING_STATE if not isinstance(resume, dict) or k not in resume]
            if missing:
                raise ConfigError(f"--resume {args.resume} holds weights, not a training run's state (no "
                                  f"{', '.join(missing)}): start a run from these weights with first_stage_ft.py "
                                  f"--checkpoint {args.resume}")
        init = None
        if args.fine_tune and resume is None:
            init = utils.load_checkpoint(args.checkpoint, trusted=args.trust_checkpoint)
        self.model_config = self._model_config(resume or init)
        self.raw = build_model(**self.model_config)
        if init is not None:
            load_weights(self.raw, init)
        if args.trainable:
            try:
                freeze_except(self.raw, args.trainable)
            except ValueError as err:
                raise ConfigError(f"--trainable: {err}") from None
        self.raw.to(self.device)
        if not args.plain:
            try:
                enable_fast_path(self.raw, compile=args.compile, checkpoint=args.recompute)
            except ValueError as err:
                raise ConfigError(f"--recompute: {err}") from None
        if self.distributed:  # DDP starts every process from rank 0's weights
            # The fast path's channels-last activations give some convolution weight gradients other strides than
            # their parameters (on the CPU only along size-1 dimensions: the same memory, tested). DDP copies every
            # gradient into its buckets anyway; a strided copy of the weights' size costs nothing next to a step.
            warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides", UserWarning)
            self.net = DistributedDataParallel(self.raw, device_ids=[self.device.index] if self.device.index is not None
                                               else None)
        else:
            self.net = self.raw
        self.ema = EMA(self.raw, decay=args.ema) if args.ema else None

        self.policy = AugmentPolicy(  # draws from the global RNG (checkpointed)
            strong=args.augment == "strong", rates=dict(zip(STRONG_AUGMENTATIONS, args.aug_rates)),
            alphas=dict(zip(STRONG_AUGMENTATIONS, args.aug_alphas)))
        self.loss = build_loss(args.loss, num_epochs=args.epochs)
        self.amp_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
        self.scaler = torch.amp.GradScaler("cuda") if args.fp16 else None

        self.optimizer = build_optimizer((p for p in self.raw.parameters() if p.requires_grad), lr=args.lr,
                                         weight_decay=args.weight_decay, device=self.device)
        self.update = Update(self.raw, self.optimizer, loss_fn=self.loss, autocast_dtype=self.amp_dtype,
                             grad_clip=args.grad_clip, scaler=self.scaler, ema=self.ema, policy=self.policy,
                             ddp_model=self.net if self.distributed else None)
        warmup, total = args.warmup_epochs * self.updates_per_epoch, args.epochs * self.updates_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, warmup_steps=warmup, total_steps=total, min_factor=MIN_LR / args.lr))

        self.epoch, self.step, self.best_psnr = 0, 0, float("-inf")
        self.bad_run = 0  # non-finite updates in a row, across epochs and resumes
        self.partial = _fresh_partial()  # this epoch's sums so far (a resume in the middle continues them)
        if resume is not None:
            self._load(resume)

    # -------------------------------------------------------------------------------------------- set-up
    def _model_config(self, checkpoint):
        """The model's build_model kwargs: a checkpoint's own config wins; an explicit --preset must agree."""
        preset = self.args.preset
        saved = checkpoint.get("model_config") if isinstance(checkpoint, dict) else None
        if saved:
            if preset and preset != saved.get("preset"):
                source = self.args.resume or self.args.checkpoint
                raise ConfigError(f"{source} holds a model of preset {saved.get('preset')!r}, not --preset {preset}: "
                                  "drop --preset (the checkpoint's is used) or start a new run")
            return dict(saved)
        return {"preset": preset or "official"}

    def _load(self, ckpt):
        """Restore everything a checkpoint holds so that training continues as if it had never stopped."""
        self.raw.load_state_dict(ckpt["model"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as err:
            raise ConfigError(f"--resume {self.args.resume}: the optimizer does not fit ({err}); resume with the "
                              "same --trainable modules") from None
        # The options of this invocation hold (--lr, --weight_decay and the schedule's length typed again override
        # the saved ones; unchanged, they equal them): the loaded groups and the schedule take them over.
        lambdas = self.scheduler.lr_lambdas
        step = ckpt["scheduler"]["last_epoch"]
        self.scheduler.load_state_dict({**ckpt["scheduler"], "base_lrs": [self.args.lr] * len(lambdas),
                                        "_last_lr": [self.args.lr * f(step) for f in lambdas]})
        for group, decay, lr in zip(self.optimizer.param_groups, (self.args.weight_decay, 0.0),
                                    self.scheduler.get_last_lr()):
            group.update(initial_lr=self.args.lr, lr=lr, weight_decay=decay)
        if (self.scaler is None) != (ckpt.get("scaler") is None):
            raise ConfigError(f"--resume {self.args.resume} was trained with{'out' if self.scaler else ''} --fp16: "
                              "resume with the same precision")
        if self.scaler is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
        self.epoch, self.step, self.best_psnr = ckpt["epoch"], ckpt["step"], ckpt["best_psnr"]
        self.bad_run = ckpt.get("bad_run", 0)
        saved = ckpt.get("partial") or {}
        # the summed entries were summed over the processes when saved: rank 0 carries them on
        self.partial = {k: saved.get(k, v) if self.main or k not in SUMMED else v for k, v in _fresh_partial().items()}
        if self.epoch >= self.args.epochs:
            raise ConfigError(f"--resume {self.args.resume} has already completed {self.epoch} of --epochs "
                              f"{self.args.epochs}: pass a larger --epochs to train longer")
        if not 0 <= self.step - self.epoch * self.updates_per_epoch < self.updates_per_epoch:
            raise ConfigError(f"--resume {self.args.resume} stopped at update {self.step} of epoch {self.epoch + 1}, "
                              f"which has {self.updates_per_epoch} updates here: resume with the same data, "
                              "--batch_size, --accum_steps and number of processes")
        state = rank_rng_state(ckpt["rng"], self.rank)
        if state is not None:  # else this process keeps its fresh seed (--seed + rank)
            utils.set_rng_state(state)
        if ckpt.get("loader_generator") is not None and self.train_loader.generator is not None:
            self.train_loader.generator.set_state(ckpt["loader_generator"])

    def _say(self, text):
        if self.main:
            tqdm.write(text)

    def checkpoint(self, *, rng=None):
        """The state of the run right now, in the checkpoint schema (a plain dict).

        Args:
            rng (list[dict] | None): every process's ``utils.get_rng_state()``, indexed by rank, as ``_rng_states``
                gathers them (default: this process's alone, which is all there is without DDP).
        """
        generator = self.train_loader.generator
        return {"format_version": FORMAT_VERSION, "model": self.raw.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema else None, "model_config": self.model_config,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "epoch": self.epoch, "step": self.step,
                "best_psnr": self.best_psnr, "bad_run": self.bad_run, "partial": dict(self.partial),
                "args": vars(self.args),
                "rng": rng if rng is not None else [utils.get_rng_state()],
                "loader_generator": generator.get_state() if generator is not None else None}

    # ---------------------------------------------------------------------------------------------- loop
    def fit(self, *, until_epoch=None):
        """Train to ``--epochs`` (or stop after ``until_epoch`` epochs, writing last.pth as usual).

        Returns:
            Result: the run folder, epochs and updates done, best validation PSNR, and the signal that stopped it.
        """
        args, stop_at = self.args, min(until_epoch or self.args.epochs, self.args.epochs)
        log = None
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
            log = utils.RunLog(self.run_dir)
            if args.resume and log.path.is_file():
                log.truncate_after(self.epoch)
            if args.trainable or args.fine_tune:
                self._say(trainable_summary(self.raw))
        batches = len(self.train_loader)
        accum = min(args.accum_steps, batches)
        if accum < args.accum_steps:
            self._say(f"--accum_steps {args.accum_steps} is more than the {batches} batches of an epoch: each update "
                      f"takes the whole epoch, {accum} batches")
        self._say(f"effective batch: {args.batch_size} images x {accum} accumulation steps x {self.world} "
                  f"process(es) = {args.batch_size * accum * self.world} per update; {self.updates_per_epoch} updates "
                  f"per epoch, {self.updates_per_epoch * args.epochs} in all; device {self.device}; run folder "
                  f"{self.run_dir}")
        stopped = None
        try:
            with StopRequest() as stop:
                while self.epoch < stop_at and stopped is None:
                    record, stop_now = self._train_epoch(stop)
                    stopped = (stop.signum or signal.SIGTERM) if stop_now else None
                    if self.step < (self.epoch + 1) * self.updates_per_epoch:  # stopped inside the epoch
                        self._save({"last.pth"})
                        break
                    self.epoch += 1
                    record.update(self._maybe_validate())
                    self._end_epoch(record, log)
            if stopped is not None:
                self._say(f"stopped after update {self.step}; continue with --resume {self.run_dir}")
            elif self.main:
                utils.plot_curves(self.run_dir)
        finally:
            if self.distributed:
                dist.destroy_process_group()
        return Result(self.run_dir, self.epoch, self.step, self.best_psnr, stopped)

    def _train_epoch(self, stop):
        """One epoch (or its rest, after a resume in the middle).

        Returns:
            (record, stopped): the training part of the epoch's log record, and whether a signal stopped it.
        """
        args, loader = self.args, self.train_loader
        loader.sampler.set_epoch(self.epoch)
        done = self.step - self.epoch * self.updates_per_epoch  # updates of this epoch already done (resume)
        batches = _groups(iter(loader), args.accum_steps)
        for _ in range(done):  # items are seeded by the sampler: skipping re-reads them without drawing at random
            next(batches)
        self.raw.train()
        bar = tqdm(total=len(loader), initial=done * args.accum_steps, desc=f"epoch {self.epoch + 1}/{args.epochs}",
                   unit="batch", leave=False, dynamic_ncols=True, disable=not self.main)
        if done == 0:
            self.partial = _fresh_partial()
        part = self.partial
        stopped, start, time_before, seen_now = False, time.perf_counter(), part["time_s"], 0
        try:
            while True:
                try:
                    group = next(batches)
                except StopIteration:
                    break
                except Exception:
                    # A signal can kill the loader's workers: with one process that is a stop between updates (the
                    # weights match self.step). With several, the others wait in this update's collectives, so the
                    # error is raised (last.pth keeps the last finished epoch).
                    if stop.signum is None or self.distributed:
                        raise
                    stopped = True
                    break
                result = self._update(group, stop)
                bad, stopped, value, count = result.skipped, result.stop, result.loss_sum, result.images
                self.step += 1
                part["seen"] += count
                seen_now += count
                part["time_s"] = time_before + time.perf_counter() - start
                bar.update(len(group))
                if bad:
                    part["skipped"] += 1
                    self.bad_run += 1
                    self._say(f"epoch {self.epoch + 1} update {self.step}: non-finite loss or gradient, step skipped")
                    if self.bad_run >= args.max_bad_steps:
                        raise TrainingError(
                            f"{self.bad_run} updates in a row had a non-finite loss or gradient (epoch "
                            f"{self.epoch + 1}, update {self.step}); last.pth, if any, keeps the state after epoch "
                            f"{self.epoch}. Try a lower --lr, --bf16 instead of --fp16, or check the data")
                else:
                    self.bad_run = 0
                    part["loss_sum"] += value
                    part["images"] += count
                    rate = seen_now * self.world / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{value / count:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                    img_s=f"{rate:.1f}", refresh=False)
                if stopped:
                    break
        finally:
            bar.close()
        totals = torch.tensor([float(part[k]) for k in SUMMED], dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(totals)
        summed = dict(zip(SUMMED, totals.tolist()))
        if self.step < (self.epoch + 1) * self.updates_per_epoch:
            # stopped inside the epoch: last.pth keeps the sums so far, over all processes, for rank 0 to carry on
            part.update({k: (v if self.main else 0) for k, v in summed.items()})
            return {}, stopped
        return {"train_loss": summed["loss_sum"] / summed["images"] if summed["images"] else None,
                "images_per_s": summed["seen"] / part["time_s"] if part["time_s"] else None,
                "skipped_steps": part["skipped"], "time_s": part["time_s"]}, stopped

    def _update(self, group, stop):
        """One optimizer update (``self.update``) and the schedule's step after it.

        Returns:
            UpdateResult: whether the step was skipped, whether to stop, this process's loss sum and images.
        """
        result = self.update(group, epoch=self.epoch, stop_requested=stop.signum is not None)
        with warnings.catch_warnings():  # a skipped step still moves the schedule, which torch warns about
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        return result

    # ----------------------------------------------------------------------------------------- validation
    def _maybe_validate(self):
        """Validate after every --val_interval epochs and after the last one; empty when it is not time."""
        if self.val_loader is None or (self.epoch % self.args.val_interval and self.epoch != self.args.epochs):
            return {}
        return self.validate()

    @torch.no_grad()
    def validate(self):
        """Validation loss and the grader's PSNR (clamped, uint8-rounded), per degradation type and overall, with
        the EMA weights when they are kept. Each process scores its share; the sums are combined."""
        net = self.ema.module if self.ema else self.raw
        net.eval()
        sums = defaultdict(lambda: [0.0, 0])  # kind -> [PSNR sum, images]; "" holds the validation loss
        for batch in tqdm(self.val_loader, desc="validation", unit="batch", leave=False, dynamic_ncols=True,
                          disable=not self.main):
            lq, gt = batch["lq"].to(self.device), batch["gt"].to(self.device)
            pred = net(lq).float()
            sums[""][0] += float(self.loss(pred, gt, self.epoch - 1)) * lq.shape[0]
            sums[""][1] += lq.shape[0]
            for kind, value in zip(batch["kind"], scoring.psnr_per_image(pred.clamp(0, 1), gt)):
                sums[kind][0] += value
                sums[kind][1] += 1
        self.raw.train()
        if self.distributed:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, dict(sums))
            sums = defaultdict(lambda: [0.0, 0])
            for part in gathered:
                for kind, (total, n) in part.items():
                    sums[kind][0] += total
                    sums[kind][1] += n
        loss_total, n = sums.pop("", (0.0, 0))
        record = {"val_loss": loss_total / n, "val_psnr": sum(s for s, _ in sums.values()) / n}
        record.update({f"val_psnr_{kind}": total / count for kind, (total, count) in sorted(sums.items())})
        return record

    def _end_epoch(self, record, log):
        """Write last.pth (and best.pth when validation improved, or every epoch without validation), log the
        epoch and say how it went."""
        improved = "val_psnr" in record and record["val_psnr"] > self.best_psnr
        if improved:
            self.best_psnr = record["val_psnr"]
        self._save({"last.pth"} | ({"best.pth"} if improved or self.val_loader is None else set()))
        record = {"epoch": self.epoch, "step": self.step, "lr": self.scheduler.get_last_lr()[0], **record}
        record.setdefault("val_loss", None)
        record.setdefault("val_psnr", None)
        if log is not None:
            log.append(record)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "time_s")
        self._say(f"epoch {self.epoch}/{self.args.epochs}: {shown}" + (" (best)" if improved else ""))

    def _rng_states(self):
        """Every process's random state, indexed by rank (a collective: every process must call it)."""
        state = utils.get_rng_state()
        if not self.distributed:
            return [state]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, state)
        return gathered

    def _save(self, names):
        """Write the current state under each name in the run folder (rank 0 writes; every process must call it,
        since it gathers their random states, and all wait for the file)."""
        rng = self._rng_states()
        if self.main:
            state = self.checkpoint(rng=rng)
            for name in sorted(names):
                utils.save_checkpoint(self.run_dir / name, state)
        if self.distributed:
            dist.barrier()


def train(args, *, until_epoch=None):
    """Run the training the options describe (see ``Trainer``) and return its ``Result``."""
    return Trainer(args).fit(until_epoch=until_epoch)


def main(argv=None, *, parser=None):
    """Command-line entry point; the fine-tuning scripts pass their own ``parser`` (see ``build_parser``)."""
    parser = parser or build_parser()
    try:
        result = train(parse_args(parser, argv))
    except (ConfigError, DataError, utils.CheckpointError, TrainingError) as err:
        parser.exit(2 if isinstance(err, ConfigError) else 1, f"{parser.prog}: error: {err}\n")
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
