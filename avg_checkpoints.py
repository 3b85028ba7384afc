"""Average the weights of several checkpoints of one model size into one plain weights file (weight averaging of
snapshots, as timm's ``avg_checkpoints.py`` does) that every script loads: ``inference.py --checkpoint``,
``first_stage_ft.py --checkpoint`` and ``vis.py`` through it.

::

    python avg_checkpoints.py run/snapshots/epoch_0008.pth run/snapshots/epoch_0009.pth run/last.pth --out avg.pth
    python avg_checkpoints.py --run run --last 3 --out run/avg_last3.pth     # the run's newest 3 snapshots

Each checkpoint gives the weights ``inference.py`` would use (its EMA weights when it holds some, ``--no_ema`` for
the plain ones). The average is taken in float64 and stored in each weight's own dtype. Checkpoints of different
sizes (another preset, other shapes) are refused with what differs.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path


from model import add_arch_argument, model_config, model_from_checkpoint
from run import SNAPSHOT_DIR, checkpoint_file, run_snapshots
from utils import (ConfigError, check_output_path, listing, load_checkpoint, run_cli, same_path, save_checkpoint,
                   setup_logging)

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def average_checkpoints(paths: Sequence[str | os.PathLike], *, use_ema: bool = True,
                        trusted: bool = False, arch: str | None = None) -> dict:
    """The averaged weights of ``paths`` as a plain weights checkpoint ``{"model", "model_config", ...}``.

    Raises:
        ConfigError: fewer than two files, or checkpoints of different model sizes (named).
        CheckpointError: a file that cannot be read or holds no weights.
    """
    if len(paths) < 2:
        raise ConfigError(f"averaging needs at least two checkpoints, got {len(paths)}")
    configs, total, reference = [], None, None
    for path in paths:
        checkpoint = load_checkpoint(path, trusted=trusted)
        model = model_from_checkpoint(checkpoint, arch=arch, use_ema=use_ema, source=str(path))  # checked here
        config, weights = model_config(checkpoint, arch=arch, source=str(path)), model.state_dict()
        if reference is None:
            reference, total = (config, weights), {k: v.double() for k, v in weights.items()}
        else:
            _check_same_model(reference, (config, weights), paths[0], path)
            for key, value in weights.items():
                total[key] += value.double()
        configs.append(config)
    config, first = reference
    averaged = {k: (total[k] / len(paths)).to(v.dtype) if v.is_floating_point() else v for k, v in first.items()}
    return {"format_version": FORMAT_VERSION, "model": averaged, "model_config": config,
            "averaged_from": [str(p) for p in paths]}


def _check_same_model(reference: tuple[dict, dict], other: tuple[dict, dict], first: str | os.PathLike,
                      path: str | os.PathLike) -> None:
    (config_a, weights_a), (config_b, weights_b) = reference, other
    if config_a != config_b:
        raise ConfigError(f"{path} is a model of another size than {first} ({config_b} vs {config_a}): average "
                          "checkpoints of one run or one preset only")
    differ = [f"{k}: {tuple(weights_a[k].shape)} vs {tuple(v.shape)}" for k, v in weights_b.items()
              if v.shape != weights_a[k].shape]
    if differ:
        raise ConfigError(f"{path} and {first} differ in shape: {listing(differ, limit=5)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="checkpoint files to average (two or more; a run folder "
                        "stands for its best.pth)")
    parser.add_argument("--run", help="a run folder: average its newest --last snapshots (trainer.py --keep_last)")
    parser.add_argument("--last", type=int, default=None, help="with --run: how many of its newest snapshots "
                        "(default: all)")
    parser.add_argument("--out", required=True, help="the averaged weights file to write (.pth)")
    parser.add_argument("--no_ema", action="store_true", help="average the plain weights of checkpoints that also "
                        "hold EMA weights (by default their EMA weights, as inference.py uses)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="allow checkpoints that need pickle to load (only files you trust)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    add_arch_argument(parser)
    return parser


def _chosen(args: argparse.Namespace) -> list[Path]:
    """The checkpoint files to average (a run folder given as a checkpoint stands for its best.pth), the --out file
    checked: writable, not one of them, not replacing a file without --overwrite."""
    paths = [checkpoint_file(p, option="checkpoint") for p in args.checkpoints]
    if args.run:
        snapshots = run_snapshots(args.run)
        if not snapshots:
            raise ConfigError(f"--run {args.run} holds no snapshots ({SNAPSHOT_DIR}/epoch_N.pth): train with "
                              "--keep_last K, or name the checkpoint files")
        if args.last is not None and args.last < 1:
            raise ConfigError(f"--last must be at least 1, got {args.last}")
        paths += snapshots[-args.last:] if args.last else snapshots
        if args.last and args.last > len(snapshots):
            log.warning("--run %s holds %d snapshot(s), fewer than --last %d: averaging those %d", args.run,
                        len(snapshots), args.last, len(snapshots))
    elif args.last is not None:
        raise ConfigError("--last goes with --run")
    twice = sorted({str(p) for p in paths if sum(same_path(p, q) for q in paths) > 1})
    if twice:
        raise ConfigError(f"{listing(twice)} given more than once: each checkpoint is averaged once; name it once "
                          "(to weight it more, copy it under another name)")
    out = check_output_path(args.out, "--out", inputs=paths)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {out} exists: choose another name or pass --overwrite")
    return paths


def main(argv: Sequence[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()

    def work() -> Path:
        paths = _chosen(args)
        state = average_checkpoints(paths, use_ema=not args.no_ema, trusted=args.trust_checkpoint,
                                    arch=args.arch)
        out = save_checkpoint(args.out, state)
        log.info("averaged %d checkpoints (%s) into %s", len(paths), listing([p.name for p in paths], limit=6), out)
        return out

    return run_cli(parser.prog, work)


if __name__ == "__main__":
    main()
