"""The whole pipeline on a small synthetic rain and snow set, on the CPU, in a few minutes.

    python demo.py                     # writes demo_output/

Steps, each the same script a user runs on the real data:
 1. synthetic.py renders rain and snow onto matplotlib's sample photographs (homework layout, with test/clean);
 2. trainer.py trains the tiny preset from scratch with the Guided Frequency Loss and strong augmentation;
 3. first_stage_ft.py fine-tunes every parameter without strong augmentation;
 4. second_stage_ft.py fine-tunes only the six modules nearest the output;
 5. inference.py restores the test images with 8-view test-time augmentation into pred.npz and scores them;
 6. utils.py draws each run's curves, vis.py the side-by-side pictures;
and finally prints the degraded and restored PSNR of the test set, per type and overall.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import first_stage_ft
import inference
import second_stage_ft
import synthetic
import trainer
import vis
from dataloader import list_images, read_image
from scoring import psnr
from utils import ConfigError, ToolkitError, listing, positive_int, run_cli, setup_logging

log = logging.getLogger(__name__)
PRESET = "tiny"
MARKER = "demo.json"  # written first into the output folder: marks it as a demo's, finished or not
# What a demo writes into its folder: replacing an earlier demo's folder names anything else it removes.
DEMO_FILES = (MARKER, "data", "train", "ft_first", "ft_second", "pred.npz", "pred_scores.csv", "vis")


class StepFailed(ToolkitError):
    """A step of the demo ended early (its script exited with ``exit_code``)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def degraded_psnr(data: Path) -> dict[str, float]:
    """Mean PSNR of the test inputs against their clean images, per type and overall."""
    kinds = json.loads((data / "synthetic.json").read_text())["test_kinds"]
    values = {name: psnr(read_image(path), read_image(data / "test" / "clean" / name))
              for name, path in ((p.name, p) for p in list_images(data / "test" / "degraded"))}
    return _by_kind(values, kinds)


def _by_kind(values: dict[str, float], kinds: dict[str, str]) -> dict[str, float]:
    out = {}
    for kind in sorted(set(kinds.values())):
        group = [v for name, v in values.items() if kinds[name] == kind]
        out[kind] = sum(group) / len(group)
    out["overall"] = sum(values.values()) / len(values)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " Everything goes into --out.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="output folder (default: %(default)s); replaced if "
                        "it holds an earlier demo, finished or not (nothing else is replaced)")
    parser.add_argument("--seed", type=synthetic.non_negative_int, default=0,
                        help="seed of the data and of training, >= 0 (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=12, help="epochs of training from scratch (default: "
                        "%(default)s); each fine-tuning stage runs a third of them")
    parser.add_argument("--train_per_type", type=positive_int, default=48, help="training pairs per type (default: "
                        "%(default)s)")
    parser.add_argument("--test_per_type", type=positive_int, default=8, help="test images per type (default: "
                        "%(default)s)")
    parser.add_argument("--size", type=synthetic.image_side, default=64,
                        help=f"image size in pixels, at least {synthetic.MIN_IMAGE_SIZE} (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads for PyTorch (default: "
                        "%(default)s: the tiny model gains little from more, and they slow it many times over when "
                        "other programs share the cores)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    return run_cli(parser.prog, lambda: run(args))


def _step(number: str, script: str, main: Any, argv: list[str]) -> Any:
    """Run one step's script; one that ends early (Ctrl-C, SIGTERM, an error it reported) ends the demo with its
    exit code and a line saying what to do, which for the demo is to run it again (it has no --resume)."""
    try:
        return main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        if code == 0:
            return None
        raise StepFailed(f"stopped in step {number} ({script} exited with {code}); the demo has no --resume of its "
                         "own: run demo.py again, which starts it over in the same --out", code) from None


def prepare_output(out: Path) -> Path:
    """The demo's output folder, emptied of an earlier demo (naming any files of the user's it also held) and
    marked as running; a link or a folder of other contents is refused."""
    if out.is_symlink():
        raise ConfigError(f"--out {out} is a link (to {out.readlink()}): the demo never replaces what a link points "
                          "at; name a folder itself, or a new one")
    try:
        if synthetic.replaceable_output(out, MARKER, what="an earlier demo's output"):
            others = sorted(p.name for p in out.iterdir() if p.name not in DEMO_FILES
                            and not (p.name.startswith(".") and p.name.endswith((".tmp", ".lock"))))
            if others:
                log.warning("replacing the earlier demo in %s, which also held files the demo does not write; they "
                            "are removed with it: %s", out, listing(others, limit=10))
            shutil.rmtree(out)
    except FileExistsError as err:
        raise ConfigError(str(err)) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"status": "running"}))
    return out


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The whole pipeline of the demo, as ``main`` describes it."""
    torch.set_num_threads(args.threads)
    out = prepare_output(Path(args.out))
    start = time.time()
    data = out / "data"
    ft_epochs = max(1, args.epochs // 3)
    common = ["--data_dir", str(data), "--batch_size", "8", "--accum_steps", "1", "--num_workers", "0",
              "--val_per_type", "4", "--seed", str(args.seed), "--loss", "gfl"]

    _banner("1/6 rendering synthetic rain and snow")
    synthetic.make_dataset(data, train_per_type=args.train_per_type, test_per_type=args.test_per_type,
                           size=args.size, seed=args.seed)

    _banner(f"2/6 training the {PRESET} preset from scratch")
    warmup = min(1, args.epochs - 1)  # the trainer needs fewer warm-up epochs than epochs
    _step("2/6", "trainer.py", trainer.main, common + ["--preset", PRESET, "--epochs", str(args.epochs), "--warmup",
                                                       str(warmup), "--lr", "2e-3", "--save_dir", str(out / "train")])

    _banner("3/6 first fine-tuning stage (all parameters, no strong augmentation)")
    _step("3/6", "first_stage_ft.py", first_stage_ft.main,
          common + ["--checkpoint", str(out / "train" / "best.pth"), "--epochs", str(ft_epochs), "--warmup", "0",
                    "--lr", "5e-4", "--save_dir", str(out / "ft_first")])

    _banner("4/6 second fine-tuning stage (six modules nearest the output)")
    _step("4/6", "second_stage_ft.py", second_stage_ft.main,
          common + ["--checkpoint", str(out / "ft_first" / "best.pth"), "--epochs", str(ft_epochs), "--warmup", "0",
                    "--lr", "5e-4", "--save_dir", str(out / "ft_second")])

    _banner("5/6 predicting the test set with 8-view test-time augmentation")
    npz = out / "pred.npz"
    scores = _step("5/6", "inference.py", inference.main, ["--checkpoint", str(out / "ft_second" / "best.pth"),
                                                            "--input_folder", str(data / "test" / "degraded"),
                                                            "--gt_folder", str(data / "test" / "clean"),
                                                            "--output_npz", str(npz)])

    _banner("6/6 pictures")
    pictures = _step("6/6", "vis.py", vis.main, ["--pred_npz", str(npz), "--input_folder",
                                                 str(data / "test" / "degraded"), "--gt_folder",
                                                 str(data / "test" / "clean"), "--out_dir", str(out / "vis")])

    kinds = json.loads((data / "synthetic.json").read_text())["test_kinds"]
    result = {"degraded": degraded_psnr(data), "restored": _by_kind({s.name: s.psnr for s in scores}, kinds)}
    (out / MARKER).write_text(json.dumps(result, indent=2))
    print(f"\nTest set PSNR (dB, uint8 RGB) after {time.time() - start:.0f} s:")
    print(f"{'':10}" + "".join(f"{k:>10}" for k in result["degraded"]))
    for row, values in result.items():
        print(f"{row:10}" + "".join(f"{v:10.2f}" for v in values.values()))
    curves = sorted(str(p) for p in out.glob("*/curves_*.png"))
    print("curves:", ", ".join(curves))
    print("pictures:", ", ".join(str(p) for p in pictures))
    return result


if __name__ == "__main__":
    main()
