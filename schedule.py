"""The schedule of a training run: its phases (one, or those of ``--progressive``: Restormer's progressive training
on growing crops), the optimizer updates of every epoch (which a resume and the learning rate count in), and the
learning rate of every update (a linear warm-up, then a cosine decay, as nanoGPT sets it: a function of the step).
"""
from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dataloader import DataError, close_workers, make_train_loader
from utils import ConfigError

log = logging.getLogger(__name__)
MIN_LR = 1e-6  # where the cosine ends (a tenth of the peak for --lr below 1e-5: see schedule_floor)
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


def training_phases(args):
    """The phases of the run: those of --progressive (each parsed and checked here, once, whether it came from the
    command line or a checkpoint's options), or one of --patch_size and --batch_size for all --epochs.

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


class PhasePlan:
    """The phases of a run with their training loaders, and the optimizer updates of every epoch: what the schedule
    and a resume count in.

    Args:
        phases (list[Phase]): the run's phases (``training_phases``).
        first (DataLoader): build_loaders' training loader, of the first phase's sizes; it serves every phase of
            its sizes, and the others get loaders of their own, each checked now (crops larger than an image, a
            micro-batch larger than a process's share of the data).
        args (argparse.Namespace): the run's options (--accum_steps, --progressive, --num_workers, --seed).
        processes (run.Processes): the processes training together.
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
        """How epoch ``epoch`` is cut into updates (``run.EPOCH_LAYOUT``)."""
        return {"batch_size": self.phases[self.phase_of(epoch)].batch_size, "accum_steps": self.accum_steps,
                "processes": self.world, "train_pairs": self.train_pairs, "epoch_start": self.start_of(epoch)}

    def release(self, index):
        """Let go of phase ``index``'s loader (its worker processes end with it) unless a later phase shares it."""
        loader = self.loaders[index]
        if all(other is not loader for other in self.loaders[index + 1:]):
            self.loaders = [None if other is loader else other for other in self.loaders]
            close_workers(loader)

    @contextmanager
    def workers_closed(self, *others) -> Iterator[None]:
        """Within, the phases' loaders (and ``others``) keep their workers; on leaving, the workers end at once."""
        try:
            yield
        finally:
            close_workers(*self.loaders, *others)

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
