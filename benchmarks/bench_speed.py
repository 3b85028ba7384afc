"""Speed, memory and accuracy of PromptIR's plain and fast paths, as one markdown table held to its targets.

::

    python benchmarks/bench_speed.py                       # CPU: official model, one 256x256 image; small-preset step
    python benchmarks/bench_speed.py --gpu --out bench.md  # every GPU case in this process (gpu_check.sh is the
                                                           # prepared check: compiled cases in their own process)
    python benchmarks/bench_speed.py --cases floors        # computed FLOP and byte floors of the GPU cases
    python benchmarks/bench_speed.py --smoke --cases gpu-train-b8,gpu-accuracy   # GPU cases' code on the CPU, tiny

Rows: milliseconds per step or per image set (the mean of two timings, each a median; a difference between two
variants within the spread of their timings is called noise), images per second, peak GPU memory
(``torch.cuda.max_memory_allocated``, counted from after the warm-up), the relative error ``||out - ref|| / ||ref||``
of the variant's output against the plain network in float64 on the same input and weights (random weights and
inputs: timing does not depend on them), the fraction of the measured ceilings (``ceilings``: a bf16 matrix
product and a device-to-device copy) the step uses, and whether the row meets its target (``TARGETS``; the table's
first rows sum them up). Every GPU row runs with cuDNN autotuning on, TF32 for float32 (``gpu_settings``, restored
when the run ends), and trainer.py's own optimizer (fused AdamW on CUDA); a training row times ``trainer.Update`` on
fixed batches already on the device (no loading, no augmentation). The first update's time (autotuning,
compilation) is reported in the notes and kept out of the timings. The accuracy rows run without autotuning and
TF32, on cuDNN's deterministic algorithms, the arithmetic their bounds are about.

Time: ``--budget`` is shared among the cases by their ``Case.share``; a case starts no variant once its share, and
whatever the cases before it left unused, is spent, so the cases after it still run. Each row is appended to
``<out stem>_rows.jsonl`` the moment it exists and the table ``--out`` is rewritten; ``--rest FILE`` skips the
variants a previous run's rows file holds (except those it never finished) and carries its rows into this table.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import sys
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]  # the project root: the modules measured here live there
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import utils
from fast_path import enable_fast_path
from GFL_Loss import build_loss
from model import add_arch_argument, build_model
from trainer import Update, build_optimizer

log = logging.getLogger("bench_speed")

BF16, FP16 = torch.bfloat16, torch.float16
GIB = 2**30
# An H200's ceilings (an 8192^3 bf16 matrix product on random data; a device-to-device copy, bytes read + written),
# the card the GPU check is prepared for: used when no ceiling was measured in this run (case "ceilings").
H200_BF16_FLOPS, H200_COPY_BYTES_PER_S = 788e12, 4.3e12
MATMUL_OPS = {"convolution", "convolution_backward", "mm", "bmm", "addmm", "baddbmm"}
# The training rows' optimizer settings: trainer.py's defaults.
LR, WEIGHT_DECAY, GRAD_CLIP = 2e-4, 1e-4, 1.0
RECOMPUTE = ("decoder_level1", "refinement")  # the full-resolution stages, which hold most activation memory
DEFAULT_GPU_BUDGET_S = 450.0

# Row status. A "pending" row (its case's share was spent, CUDA broke earlier in the process, or the process was
# stopped at the budget while it ran) and a "running" one (its process ended during it) are run again by --rest.
OK, FAILED, SKIPPED, PENDING, RUNNING = "ok", "failed", "skipped", "pending", "running"
REDO = {PENDING, RUNNING}


@dataclass
class Row:
    """One line of the table.

    Args:
        case: the case as shown (its sizes included), e.g. "train b8 128x128".
        variant: what differs within the case, e.g. "fast bf16".
        ms: milliseconds per step, or for the whole image set of an inference row.
        images_per_s: images per second.
        peak_bytes: peak GPU memory of the variant.
        error: relative error against float64.
        notes: what else was seen (first-step time, ratios, why it failed or was skipped).
        status: OK, FAILED, SKIPPED, PENDING or RUNNING.
        case_id: the ``CASES`` key that made it (targets are chosen by it).
        baselines: variants of the same case it is compared with ("xN vs ..." in the notes; the first one for a
            speed-up target).
        images: images in the timed set (inference rows).
        spread: how far apart the variant's two timings are, relative to the faster one (a difference between two
            variants within the larger of their spreads is noise).
        rate: a ceiling row's measured rate (FLOP/s of the matrix product, bytes/s of the copy).
    """
    case: str
    variant: str
    ms: float | None = None
    images_per_s: float | None = None
    peak_bytes: int | None = None
    error: float | None = None
    notes: str = ""
    status: str = OK
    case_id: str = ""
    baselines: list[str] = field(default_factory=list)
    images: int | None = None
    spread: float | None = None
    rate: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.case, self.variant


ROW_FIELDS = {f.name for f in fields(Row)}


def load_rows(path: str | Path) -> list[Row]:
    """The rows of a rows file (``*_rows.jsonl``), or of the one rows file inside a folder. A line cut short by a
    killed writer is left out.

    Raises:
        utils.ConfigError: no such file, or a folder without exactly one rows file.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*_rows.jsonl"))
        if len(found) != 1:
            raise utils.ConfigError(f"--rest {path}: a folder must hold exactly one *_rows.jsonl file, it holds "
                                    f"{utils.listing([p.name for p in found]) or 'none'}")
        path = found[0]
    if not path.is_file():
        raise utils.ConfigError(f"--rest {path}: no such file; give the rows file of an earlier run "
                                "(check_rows.jsonl of gpu_check.sh, <out stem>_rows.jsonl of bench_speed.py)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and {"case", "variant"} <= set(data):
            rows.append(Row(**{k: v for k, v in data.items() if k in ROW_FIELDS}))
    return rows


def latest(rows: Sequence[Row]) -> dict[tuple[str, str], Row]:
    """The last row of each (case, variant), in the order the keys first appeared."""
    order: dict[tuple[str, str], Row] = {}
    for row in rows:
        order[row.key] = row
    first = list(dict.fromkeys(row.key for row in rows))
    return {key: order[key] for key in first}


# ------------------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    """A figure the toolkit is held to.

    Args:
        text: the target as the table states it.
        label: its short form in a row's target column.
        cases: the case ids whose rows it judges (the fast rows; the plain ones too with ``plain_too``).
        value: ``value(row, rows by key)``: the row's figure, or None where it has none.
        bound: ``bound(row)``: the limit for this row.
        higher: True when a figure must reach the bound, False when it must stay at or under it.
        show: format of the figure.
        speed: a speed or memory figure (not judged on a smoke run, whose model and images are tiny).
        every: met when every judged row meets it (else when the best one does).
        plain_too: judge the plain rows as well.
    """
    text: str
    label: str
    cases: tuple[str, ...]
    value: Callable[[Row, dict], float | None]
    bound: Callable[[Row], float]
    higher: bool
    show: str
    speed: bool = True
    every: bool = False
    plain_too: bool = False

    def applies(self, row: Row) -> bool:
        return row.case_id in self.cases and (self.plain_too or row.variant.startswith("fast"))

    def met(self, row: Row, value: float) -> bool:
        limit = self.bound(row)
        return value >= limit if self.higher else value <= limit


def _speedup(row: Row, rows: dict, baseline: str | None = None) -> float | None:
    """How many times faster than ``baseline`` (default: the row's first) the row is, if both were measured."""
    base = rows.get((row.case, baseline or (row.baselines[0] if row.baselines else None)))
    if base is None or base.status != OK or not base.ms or not row.ms:
        return None
    return base.ms / row.ms


def ratio_note(row: Row, rows: dict, baseline: str) -> str | None:
    """"xN vs BASELINE", marked as noise when N is within the larger of the two rows' timing spreads of 1."""
    value = _speedup(row, rows, baseline)
    if value is None:
        return None
    spreads = [r.spread for r in (row, rows[(row.case, baseline)]) if r.spread is not None]
    noise = bool(spreads) and abs(value - 1) <= max(spreads)
    return f"x{value:.2f} vs {baseline}" + (f" (within the timing spread {max(spreads):.0%}: noise)" if noise else "")


def _accuracy_bound(row: Row) -> float:
    return 1e-5 if "fp32" in row.variant else 1e-2


TRAIN_B8_CASES = ("gpu-train-b8", "gpu-compiled-train", "gpu-graph")
TARGETS = [
    Target("training step, batch 8 of 128x128: at least 150 images/s (official code: 33 to 45 on an H100)",
           ">= 150 images/s", TRAIN_B8_CASES, lambda r, rows: r.images_per_s, lambda r: 150.0, True, "{:.0f} images/s"),
    Target("training step, batch 8 of 128x128: peak memory at most 8 GiB (official code: 13 to 31)", "<= 8 GiB",
           TRAIN_B8_CASES, lambda r, rows: None if r.peak_bytes is None else r.peak_bytes / GIB, lambda r: 8.0, False,
           "{:.2f} GiB"),
    Target("the recipe's step (batch 2 of 256x256, 4 micro-batches): at least 4x our plain path at its precision",
           ">= 4x plain", ("gpu-train-recipe",), _speedup, lambda r: 4.0, True, "x{:.2f}"),
    Target("inference.py, 100 images of 256x256 with 8-view TTA, end to end: under 5 s (official, batched: ~16 s)",
           "< 5 s", ("gpu-infer-tta", "gpu-compiled-infer"),
           lambda r, rows: r.ms / 1e3 if r.ms is not None and r.images == 100 else None, lambda r: 5.0, False,
           "{:.2f} s"),
    Target("accuracy against float64 at 256x256: fp32 within 1e-5, bf16 and fp16 within 1e-2 (relative)",
           "within bound", ("gpu-accuracy",), lambda r, rows: r.error, _accuracy_bound, False, "{:.1e}",
           speed=False, every=True, plain_too=True),
]


def judge(target: Target, row: Row, rows: dict, smoke: bool) -> tuple[str, float | None]:
    """("met" / "not met" / "unmeasured ...", the figure) of one row."""
    if target.speed and smoke:
        return "unmeasured (smoke run)", None
    value = target.value(row, rows) if row.status == OK else None
    if value is None:
        return "unmeasured", None
    return ("met" if target.met(row, value) else "not met"), value


def target_rows(rows: dict, smoke: bool) -> list[Row]:
    """One summary row per target: met when the best judged fast row (every one, for ``every`` targets) meets it."""
    out = []
    for t in TARGETS:
        judged = [(row, *judge(t, row, rows, smoke)) for row in rows.values()
                  if t.applies(row) and row.variant.startswith("fast")]
        measured = [(row, status, value) for row, status, value in judged if value is not None]
        if t.speed and smoke:
            status, notes = "unmeasured (smoke run)", "a smoke run checks the code, not the speed"
        elif not measured:
            status, notes = "unmeasured", "no fast row measured"
        else:
            failing = [m for m in measured if m[1] != "met"]
            if t.every:
                shown = failing[0] if failing else measured[0]
                status = "not met" if failing else "met"
                how = f"{len(measured) - len(failing)} of {len(measured)} fast rows within"
            else:
                key = (lambda m: m[2]) if t.higher else (lambda m: -m[2])
                shown = max(measured, key=key)
                status, how = shown[1], "best"
            row, _, value = shown
            notes = f"{how}: {row.case} / {row.variant}: {t.show.format(value)}"
        out.append(Row("target", t.text, notes=notes, status=status))
    return out


# -------------------------------------------------------------------------------------------------------- table
def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def table(rows: Sequence[Row], *, smoke: bool) -> str:
    """The markdown table: the targets' summary rows, then the last row of each (case, variant)."""
    by_key = latest(rows)
    lines = ["| case | variant | ms | images/s | peak memory | error vs float64 | notes | target |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in target_rows(by_key, smoke):
        lines.append(f"| {r.case} | {_cell(r.variant)} | - | - | - | - | {_cell(r.notes)} | {r.status} |")
    for r in by_key.values():
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / GIB:.2f} GiB"
        verdicts = [f"{t.label}: {judge(t, r, by_key, smoke)[0]}" for t in TARGETS if t.applies(r)]
        notes = r.notes if r.status in (OK, FAILED, SKIPPED) or r.notes.startswith(r.status) else \
            f"{r.status}: {r.notes}"
        ratios = [note for name in r.baselines if (note := ratio_note(r, by_key, name)) is not None]
        notes = "; ".join([notes, *ratios]) if notes else "; ".join(ratios)
        lines.append(f"| {_cell(r.case)} | {_cell(r.variant)} | {fmt(r.ms, '.1f')} | {fmt(r.images_per_s, '.1f')} | "
                     f"{peak} | {fmt(r.error, '.1e')} | {_cell(notes)} | {'; '.join(verdicts)} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- bench
def _describe(err: BaseException) -> str:
    if isinstance(err, SystemExit):
        return f"exited with code {err.code}"
    first = (str(err).strip().splitlines() or [""])[0][:160]
    return f"{type(err).__name__}: {first}".replace("|", "/")


def _breaks_cuda(err: BaseException) -> bool:
    """A CUDA error that leaves the process's CUDA context unusable (an illegal access, a device-side assert), as
    opposed to running out of memory or a Python-level failure."""
    return type(err).__name__ == "AcceleratorError" or "CUDA error" in str(err)


@dataclass
class Bench:
    """Runs the variants of the cases (``run``: the one runner), keeps the time budget, and writes every row the
    moment it exists.

    Args:
        out: the table file (rewritten after every row); beside it ``<stem>_rows.jsonl`` (every row appended as
            JSON) and the cases' own files (``side_file``). None: nothing is written.
        budget_s: seconds for all cases, shared by ``shares`` (inf: no limit).
        quick: fewer variants, steps and repeats.
        threads: CPU threads of the CPU cases.
        tiny: the tiny preset and images a sixteenth of the size (at least 16 pixels): checks the code, not the
            speed.
        arch: the network measured (``model.ARCHS``).
        device: "cuda", or "cpu" for a smoke run of the GPU cases.
        shares: seconds of the budget each case id may use; ``plan`` is the order the cases run in.
        rest: rows of an earlier run: their variants are not run again unless they never finished.
        clock: the clock the budget is kept by.
        start: the clock's reading the budget counts from (default: now).
    """

    out: Path | None
    budget_s: float = math.inf
    quick: bool = False
    threads: int = 2
    tiny: bool = False
    arch: str = "promptir"
    device: str = "cuda"
    shares: dict[str, float] = field(default_factory=dict)
    plan: list[str] = field(default_factory=list)
    rest: Sequence[Row] = ()
    clock: Callable[[], float] = time.perf_counter
    start: float | None = None
    rows: list[Row] = field(default_factory=list)

    def __post_init__(self):
        self.start = self.clock() if self.start is None else self.start
        self.case_id, self.deadline, self.broken = "", math.inf, None
        self.earlier = latest(self.rest)
        self.rows = list(self.rest)
        if self.rows_file is not None:
            self.rows_file.parent.mkdir(parents=True, exist_ok=True)
            self.rows_file.write_text("".join(json.dumps(asdict(r)) + "\n" for r in self.rows))
            self.save()

    @property
    def smoke(self) -> bool:
        return self.tiny and self.device == "cpu"

    @property
    def rows_file(self) -> Path | None:
        return self.side_file("rows.jsonl")

    def side_file(self, name: str) -> Path | None:
        return None if self.out is None else self.out.with_name(f"{self.out.stem}_{name}")

    def size(self, pixels: int) -> int:
        return max(16, pixels // 16) if self.tiny else pixels

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model("tiny" if self.tiny else "official", arch=self.arch)

    # ------------------------------------------------------------------------------------------ time
    def begin(self, case_id: str) -> None:
        """Start a case: it may start variants until the budget's end less the shares of the cases after it in
        ``plan``, and at least for its own share (never past the budget's end)."""
        self.case_id = case_id
        now, end = self.clock(), self.start + self.budget_s
        later = self.plan[self.plan.index(case_id) + 1:] if case_id in self.plan else []
        reserved = sum(self.shares.get(c, 0.0) for c in later)
        self.deadline = min(end, max(end - reserved, now + self.shares.get(case_id, 0.0)))
        log.info("case %s at %.0f s (may start variants for %.0f s)", case_id, now - self.start,
                 self.deadline - now)

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def timing_room(self) -> float:
        """The seconds a variant's second timing may take: none on a smoke run, which checks code and times once."""
        return 0.0 if self.smoke else self.remaining()

    # ---------------------------------------------------------------------------------------- runner
    def run(self, case: str, variant: str, measure: Callable[[], dict | list[Row]], *,
            needs_cuda: bool = False, own_process: bool = False) -> Row | None:
        """Run one variant, the one way every case runs its variants: a variant done in the ``rest`` rows is kept;
        one that needs CUDA is skipped without it; none starts after the case's share is spent, nor once CUDA has
        broken in this process (unless ``own_process``: it runs in a process of its own); an exception (out of
        memory, a compile or capture failure, an exit) becomes a row saying so. ``measure()`` returns the row's
        fields (a dict) or, for variants measured together, their rows. Returns the row (the first of several)."""
        earlier = self.earlier.get((case, variant))
        if earlier is not None and earlier.status not in REDO:
            log.info("  %s | %s: kept from the earlier run (%s)", case, variant, earlier.status)
            return earlier
        if needs_cuda and self.device != "cuda":
            return self.add(Row(case, variant, status=SKIPPED, notes="skipped: needs CUDA"))
        if self.broken and not own_process:
            return self.add(Row(case, variant, status=PENDING,
                                notes=f"not run: {self.broken}; run it again with --rest in a new process"))
        if self.clock() >= self.deadline:
            return self.add(Row(case, variant, status=PENDING,
                                notes=f"not run: this case's share of the {self.budget_s:.0f} s budget was spent; "
                                      "run it again with --rest"))
        self.add(Row(case, variant, status=RUNNING, notes="running: the process ended before this variant did"))
        try:
            result = measure()
        except (Exception, SystemExit) as err:  # noqa: BLE001 - every failure is reported in the table
            if _breaks_cuda(err):
                self.broken = f"CUDA failed in {case} / {variant} ({type(err).__name__})"
            result = {"status": FAILED, "notes": f"failed: {_describe(err)}"}
        finally:
            try:
                free_memory(self.device)
            except Exception:  # noqa: BLE001 - a broken CUDA context cannot even be freed; it is reported
                pass
        if isinstance(result, dict):
            return self.add(Row(case, variant, **result))
        for row in result:
            self.add(row)
        self.add(Row(case, variant, notes="measured together: " + ", ".join(row.variant for row in result)))
        return result[0] if result else None

    def add(self, row: Row) -> Row:
        """Keep a row, append it to the rows file and rewrite the table."""
        row.case_id = row.case_id or self.case_id
        self.rows.append(row)
        if row.status == RUNNING:
            log.info("  %s | %s: started", row.case, row.variant)
        else:
            log.info("  %s | %s | %s ms | %s | %s", row.case, row.variant, fmt(row.ms, ".1f"), fmt(row.error, ".1e"),
                     row.notes)
        if self.rows_file is not None:
            with open(self.rows_file, "a") as f:
                f.write(json.dumps(asdict(row)) + "\n")
                f.flush()
            self.save()
        return row

    def absorb(self, rows: Sequence[Row]) -> None:
        """Take over the rows another process appended to the rows file (``rows``: all of that file)."""
        self.rows = list(rows)
        self.save()

    def ceilings(self) -> tuple[float, float, str]:
        """(bf16 FLOP/s, copy bytes/s, whose): this run's measured ceilings (case "ceilings", kept from --rest
        too), else an H200's."""
        rows = latest(self.rows)
        measured = [rows.get(("ceilings", name)) for name in (CEILING_MATMUL, CEILING_COPY)]
        if all(r is not None and r.status == OK and r.rate for r in measured):
            return measured[0].rate, measured[1].rate, "measured"
        return H200_BF16_FLOPS, H200_COPY_BYTES_PER_S, "an H200's"

    def machine_use(self, *, fast: bool, batch: int, size: int, train: bool, amp: torch.dtype | None, times: float,
                    ms: float) -> str:
        """What fraction of the two ceilings a row's step uses: the FLOPs and op-by-op bytes of ``times`` forwards
        (and backwards when ``train``) of ``batch`` images of ``size`` pixels over ``ms``, counted on one image on
        the bench's device (both grow with the batch alone) and halved for bf16 and fp16."""
        flops, eager, _ = count_costs(fast=fast, batch=1, size=size, train=train,
                                      preset="tiny" if self.tiny else "official", device=self.device,
                                      arch=self.arch)
        flops, nbytes = flops * batch * times, eager * batch * times / (1 if amp is None else 2)
        rate, bandwidth, whose = self.ceilings()
        seconds = ms / 1e3
        return (f"{flops / seconds / rate:.1%} of {whose} bf16 matrix rate, {nbytes / seconds / bandwidth:.1%} of its "
                f"copy bandwidth ({flops / 1e12:.3g} TFLOP and {nbytes / GIB:.3g} GiB op by op, counted)")

    def find(self, case: str, variant: str) -> Row | None:
        row = latest(self.rows).get((case, variant))
        return row if row is not None and row.status == OK else None

    def table(self) -> str:
        return table(self.rows, smoke=self.smoke)

    def save(self) -> None:
        if self.out is not None:
            text = self.table() + "\n"
            utils.atomic_write(self.out, lambda f: f.write(text.encode()))


# ------------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def gpu_settings(*, tf32: bool = True, autotune: bool = True, deterministic: bool = False):
    """The settings the GPU rows run with, restored on exit (a test that calls ``main`` leaves its process as it
    found it). By default those trainer.py sets: TF32 for float32 and cuDNN autotuning.

    One API each, trainer.py's: ``torch.set_float32_matmul_precision`` for matrix products ("high": TF32,
    "highest": none) and ``torch.backends.cudnn.allow_tf32`` for convolutions. Never also
    ``torch.backends.cuda.matmul.allow_tf32``: after a mix of the two, PyTorch (2.9 to 2.14 at least) refuses to
    read the precision back ("mix of the legacy and new APIs").

    Args:
        tf32: TF32 for float32 matrix products and convolutions.
        autotune: cuDNN times its algorithms on each new shape and keeps the fastest (``cudnn.benchmark``); without
            it cuDNN takes its heuristic's choice.
        deterministic: cuDNN only picks deterministic algorithms.
    """
    cudnn = torch.backends.cudnn
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # the process mixed the two APIs before: PyTorch's default is what can be restored
        precision = "highest"
    before = precision, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic = tf32, autotune, deterministic
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic = before[1:]


def settings_text() -> str:
    """The settings in force, as a row's notes say them."""
    cudnn = torch.backends.cudnn
    return (f"float32 matmul precision {torch.get_float32_matmul_precision()}, cuDNN TF32 "
            f"{'on' if cudnn.allow_tf32 else 'off'}, autotuning {'on' if cudnn.benchmark else 'off'}, "
            f"{'deterministic' if cudnn.deterministic else 'any'} algorithms")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().to(ref.device), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def variant_model(base: torch.nn.Module, device: str, *, fast: bool, channels_last: bool = True,
                  compile: bool = False, recompute: tuple[str, ...] = ()) -> torch.nn.Module:
    """A copy of ``base`` on ``device``, on the fast path when ``fast`` (the one place a variant's model is made)."""
    model = copy.deepcopy(base).to(device)
    if fast:
        enable_fast_path(model, channels_last=channels_last, compile=compile, recompute=recompute)
    return model


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    reset_peak(device)


def reset_peak(device: str) -> None:
    """Start the peak memory count afresh (from what is allocated now)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str, amp: torch.dtype | None, *, cache: bool = True):
    return torch.autocast(device, dtype=amp or BF16, enabled=amp is not None, cache_enabled=cache)


def precision_name(amp: torch.dtype | None) -> str:
    return {None: "fp32", BF16: "bf16", FP16: "fp16"}[amp]


# -------------------------------------------------------------------------------------------- counting (floors)
class ByteCounter(TorchDispatchMode):
    """Bytes each non-view ATen op reads and writes (every tensor argument once, every output once): ``total`` for
    op-by-op eager execution, ``matmul`` for the convolutions and matrix products alone (as if every other op were
    fused into them)."""

    def __init__(self):
        super().__init__()
        self.total = self.matmul = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
            n = sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
            self.total += n
            if func.overloadpacket.__name__ in MATMUL_OPS:
                self.matmul += n
        return out


@functools.cache
def count_costs(*, fast: bool, batch: int, size: int, train: bool, preset: str = "official",
                device: str = "meta", arch: str = "promptir") -> tuple[float, int, int]:
    """(FLOPs, eager bytes, matmul-boundary bytes) of one float32 forward (and backward when ``train``) of the
    network, counted on ``device``: the meta device needs no GPU, but its kernels are slow Python (seconds per pass
    of the official network); a GPU runs the pass in a fraction of a second. Training FLOPs are three forwards: the
    FLOP counter takes a depthwise convolution's backward for a dense one."""
    with torch.device(device):
        model = build_model(preset, arch=arch)
    if fast:
        enable_fast_path(model)
    x = torch.rand(batch, 3, size, size, device=device)
    flops, counter = FlopCounterMode(display=False), ByteCounter()
    with torch.set_grad_enabled(train):
        with flops:
            out = model(x)
        forward_flops = flops.get_total_flops()
        model.zero_grad()
        with counter:
            out = model(x)
            if train:
                out.abs().mean().backward()
    return forward_flops * (3 if train else 1), counter.total, counter.matmul


CEILING_MATMUL, CEILING_COPY = "bf16 matrix product", "device-to-device copy"


def case_ceilings(bench: Bench) -> None:
    """The two ceilings the other rows are held against, measured first: a large bf16 matrix product on random data
    (8192^3; 128^3 on a smoke run) and a device-to-device copy (1 GiB; 16 MiB on a smoke run; bytes read plus bytes
    written), each timed twice (medians of 10 after 3 warm-ups)."""
    device, n = bench.device, 128 if bench.tiny else 8192
    elements = 2**22 if bench.tiny else 2**28  # float32

    def measure(work: Callable[[], object], amount: float, unit: str, what: str) -> dict:
        timings, spread_ = time_twice(work, warmup=3, reps=10, device=device, room_s=bench.remaining)
        ms = statistics.mean(timings)
        rate = amount / ms * 1e3
        return {"ms": ms, "rate": rate, "spread": spread_,
                "notes": f"{rate / 1e12:.3g} {unit} ({what}); {timing_note(timings, 10)}"}

    def matmul() -> dict:
        torch.manual_seed(0)
        a, b = (torch.randn(n, n, device=device, dtype=BF16) for _ in range(2))
        return measure(lambda: a @ b, 2 * n**3, "TFLOP/s", f"{n}x{n} by {n}x{n}, random data")

    def copy_() -> dict:
        src = torch.randn(elements, device=device)
        dst = torch.empty_like(src)
        return measure(lambda: dst.copy_(src), 2 * src.nbytes, "TB/s", f"{src.nbytes / GIB:.2f} GiB, read + written")

    bench.run("ceilings", CEILING_MATMUL, matmul)
    bench.run("ceilings", CEILING_COPY, copy_)


def case_floors(bench: Bench) -> None:
    """Computed lower bounds for the GPU cases: FLOPs over the matrix-product rate, and bytes over the copy rate
    (bf16 activations taken as half the float32 bytes); the rates are this run's measured ceilings (measured here
    first on a GPU), else an H200's."""
    if bench.device == "cuda" and torch.cuda.is_available() and bench.ceilings()[2] != "measured":
        case_ceilings(bench)
    cases = [("train b8 128x128", dict(batch=8, size=128, train=True), 8),
             ("train b2 256x256 (one micro-step)", dict(batch=2, size=256, train=True), 2),
             ("inference 8 TTA views 256x256", dict(batch=8, size=256, train=False), 1)]

    def floor(kwargs: dict, images: int, fast: bool) -> dict:
        rate, bandwidth, source = bench.ceilings()
        flops, eager, matmul = count_costs(fast=fast, arch=bench.arch, **kwargs)
        flop_ms, byte_ms = flops / rate * 1e3, matmul / 2 / bandwidth * 1e3
        ms = max(flop_ms, byte_ms)
        return {"ms": ms, "images_per_s": images / ms * 1e3,
                "notes": f"computed ({source} ceilings): {flops / 1e12:.2f} TFLOP -> {flop_ms:.1f} ms; "
                         f"matmul-boundary {matmul / 2 / GIB:.1f} GiB bf16 -> {byte_ms:.1f} ms; op-by-op eager "
                         f"{eager / 2 / GIB:.1f} GiB -> {eager / 2 / bandwidth * 1e3:.1f} ms"}

    for name, kwargs, images in cases:
        for fast in (False, True):
            bench.run(f"floor: {name}", "fast" if fast else "plain",
                      lambda a=(kwargs, images, fast): floor(*a))


# ------------------------------------------------------------------------------------------------------- timing
def time_twice(fn: Callable[[], object], *, warmup: int, reps: int, device: str,
               room_s: Callable[[], float] = lambda: math.inf) -> tuple[list[float], float | None]:
    """Two timings of ``fn`` (each the median of ``reps`` calls) after ``warmup`` untimed calls, with the peak
    memory count reset between the warm-up and the timings: the peak is the steady state's, without cuDNN's
    autotuning workspaces or compilation. The second timing is left out when ``room_s()`` (the seconds left to the
    case) is under twice the first's length. Returns the timings in ms and their spread (None with one)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    timings = [median_ms(fn, warmup=0, reps=reps, device=device)]
    if room_s() >= 2 * (time.perf_counter() - start):
        timings.append(median_ms(fn, warmup=0, reps=reps, device=device))
    return timings, spread(timings)


ONCE_LATE, ONCE_SMOKE = "the case's share was running out", "a smoke run times once"


def spread(timings: Sequence[float]) -> float | None:
    return abs(timings[0] - timings[1]) / min(timings) if len(timings) == 2 and min(timings) > 0 else None


def timing_note(timings: Sequence[float], reps: int, *, smoke: bool = False) -> str:
    if len(timings) == 1:
        return f"median of {reps}, timed once ({ONCE_SMOKE if smoke else ONCE_LATE})"
    return f"medians of {reps}, timed twice: {timings[0]:.1f} and {timings[1]:.1f} ms (spread {spread(timings):.0%})"


def median_ms(fn: Callable[[], object], *, warmup: int, reps: int, device: str = "cuda") -> float:
    """Median milliseconds of ``fn`` after ``warmup`` calls; on CUDA timed with events on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device != "cuda":
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class TrainerStep:
    """trainer.py's optimizer update on fixed micro-batches: ``trainer.build_optimizer`` (fused AdamW on CUDA) and
    ``trainer.Update`` (the loss by name, autocast, a GradScaler for float16, clipping, skipping non-finite steps).
    Keeps the first forward output, for the error column, and counts skipped updates.

    Args:
        model: the network, on its device.
        group: the micro-batches of one update, ``{"lq", "gt"}`` dicts.
        amp: the autocast dtype, None for float32.
        loss: a GFL_Loss name.
    """

    def __init__(self, model: torch.nn.Module, group: list[dict], *, amp: torch.dtype | None, loss: str):
        device = next(model.parameters()).device
        self.optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], lr=LR,
                                         weight_decay=WEIGHT_DECAY, device=device)
        scaler = torch.amp.GradScaler(device.type) if amp == FP16 else None
        self.update = Update(model, self.optimizer, loss_fn=build_loss(loss), autocast_dtype=amp,
                             grad_clip=GRAD_CLIP, scaler=scaler)
        self.group, self.skipped, self.first_output = group, 0, None
        self._hook = model.register_forward_hook(self._keep_first)

    def _keep_first(self, module, inputs, output) -> None:
        self.first_output = output.detach().float().clone()
        self._hook.remove()

    def __call__(self) -> None:
        self.skipped += self.update(self.group, epoch=0).skipped


class GraphStep:
    """The whole optimizer update captured in one CUDA graph and replayed: forward and backward of every
    micro-batch, clipping and fused AdamW (bfloat16 or float32; no loss scaling).

    Its own code rather than ``trainer.Update``: the Update reads the loss and the gradient norm on the host to
    decide whether to skip the step, and frees the gradients after it; a captured graph allows neither (no host
    synchronisation inside, and the gradients must keep their addresses between replays). Here the gradients are
    zeroed in place and every step is taken. The optimizer is ``trainer.build_optimizer``'s, made capturable (its
    step counts live on the device), with the same learning rate, decay, clipping and loss.
    """

    def __init__(self, model: torch.nn.Module, group: list[dict], *, amp: torch.dtype | None, loss: str):
        if amp == FP16:
            raise ValueError("a CUDA-graphed step runs without a GradScaler: use bf16 or fp32")
        self.model, self.group, self.amp = model, group, amp
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.optimizer = build_optimizer(self.params, lr=LR, weight_decay=WEIGHT_DECAY, device=self.device)
        for group_ in self.optimizer.param_groups:
            group_["capturable"] = True
        self.loss = build_loss(loss)
        self.skipped, self.first_output = 0, None
        self._graph: torch.cuda.CUDAGraph | None = None

    def _step(self) -> None:
        images = sum(batch["lq"].shape[0] for batch in self.group)
        for batch in self.group:
            with autocast(self.device.type, self.amp, cache=False):  # no cast cache kept across a capture
                out = self.model(batch["lq"])
                loss = self.loss(out, batch["gt"], 0)
            if self.first_output is None:
                self.first_output = out.detach().float().clone()
            (loss * (batch["lq"].shape[0] / images)).backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)

    def __call__(self) -> None:
        if self._graph is None:
            self._step()
        else:
            self._graph.replay()

    def capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream before capture, as CUDA graphs require
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._graph = graph


@dataclass(frozen=True)
class TrainVariant:
    name: str
    fast: bool
    amp: torch.dtype | None
    channels_last: bool = True
    compile: bool = False
    graph: bool = False
    recompute: tuple[str, ...] = ()
    baselines: tuple[str, ...] = ()

    @property
    def needs_cuda(self) -> bool:
        return self.compile or self.graph


def train_case(bench: Bench, variants: Sequence[TrainVariant], *, batch: int, size: int, accum: int, loss: str,
               steps: int, warmup: int = 2) -> None:
    """Run training variants on one set of micro-batches (``accum`` of ``batch`` images of ``size`` pixels)."""
    device, size = bench.device, bench.size(size)
    case = f"train b{batch} {size}x{size}" + (f" accum {accum}" if accum > 1 else "")
    warmup, steps = (0, 1) if bench.tiny else (warmup, steps)  # tiny: the first update is the warm-up

    @functools.cache
    def inputs() -> tuple[torch.nn.Module, list[dict], torch.Tensor]:
        base = bench.model()
        torch.manual_seed(1)
        x = torch.rand(accum, batch, 3, size, size, device=device)
        y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
        with torch.no_grad():
            ref = variant_model(base, device, fast=False).double()(x[0].double())
        return base, [{"lq": x[i], "gt": y[i]} for i in range(accum)], ref

    def measure(v: TrainVariant) -> dict:
        base, group, ref = inputs()
        free_memory(device)  # the peak memory is the variant's own, not the float64 reference's
        model = variant_model(base, device, fast=v.fast, channels_last=v.channels_last, compile=v.compile,
                              recompute=v.recompute)
        step = (GraphStep if v.graph else TrainerStep)(model, group, amp=v.amp, loss=loss)
        start = time.perf_counter()
        step()
        synchronize(device)
        first_s = time.perf_counter() - start
        error = rel_err(step.first_output, ref)
        if v.graph:
            step.capture()
        skipped_before = step.skipped
        timings, spread_ = time_twice(step, warmup=warmup, reps=steps, device=device, room_s=bench.timing_room)
        ms, peak = statistics.mean(timings), peak_memory(device)
        notes = [f"first update {first_s:.1f} s" + (" (compiles)" if v.compile else ""),
                 timing_note(timings, steps, smoke=bench.smoke),
                 "peak memory from after the warm-up", bench.machine_use(fast=v.fast, batch=batch, size=size,
                                                                          train=True, amp=v.amp, times=accum, ms=ms)]
        if step.skipped:
            later = warmup + steps * len(timings)
            notes.append(f"{step.skipped - skipped_before} of the {later} later updates skipped "
                         "(non-finite; a GradScaler lowers its scale on the first ones)")
        return {"ms": ms, "images_per_s": batch * accum / ms * 1e3, "peak_bytes": peak,
                "error": error, "notes": "; ".join(notes), "baselines": list(v.baselines), "spread": spread_}

    for v in variants:
        bench.run(case, v.name, lambda v=v: measure(v), needs_cuda=v.needs_cuda)


PLAIN_FP32 = "plain fp32 (tf32)"
# Each case's variants run most important first (the fast row its target judges), so that a spent share drops the
# least important; the ratios against the plain rows are worked out when the table is written.
RECOMPUTED = " + recompute " + "/".join(RECOMPUTE)
TRAIN_B8 = [
    TrainVariant("fast bf16", fast=True, amp=BF16, baselines=("plain bf16", PLAIN_FP32)),
    TrainVariant("fast bf16" + RECOMPUTED, fast=True, amp=BF16, recompute=RECOMPUTE,
                 baselines=("fast bf16", PLAIN_FP32)),
    TrainVariant(PLAIN_FP32, fast=False, amp=None),
    TrainVariant("fast fp32 (tf32)", fast=True, amp=None, baselines=(PLAIN_FP32,)),
    TrainVariant("plain bf16", fast=False, amp=BF16, baselines=(PLAIN_FP32,)),
    TrainVariant("fast bf16, NCHW", fast=True, amp=BF16, channels_last=False, baselines=("plain bf16", PLAIN_FP32)),
    TrainVariant("fast fp32 (tf32)" + RECOMPUTED, fast=True, amp=None, recompute=RECOMPUTE,
                 baselines=("fast fp32 (tf32)",)),
]
COMPILED_TRAIN_B8 = [
    TrainVariant("fast bf16 compiled", fast=True, amp=BF16, compile=True, baselines=("plain bf16", PLAIN_FP32)),
    TrainVariant("fast bf16 compiled" + RECOMPUTED, fast=True, amp=BF16, compile=True,
                 recompute=RECOMPUTE, baselines=("plain bf16", PLAIN_FP32)),
]
GRAPH_TRAIN_B8 = [
    TrainVariant("fast bf16, whole step in one CUDA graph", fast=True, amp=BF16, graph=True,
                 baselines=("plain bf16", PLAIN_FP32)),
    TrainVariant("fast bf16 compiled, whole step in one CUDA graph", fast=True, amp=BF16, compile=True, graph=True,
                 baselines=("plain bf16", PLAIN_FP32)),
]
RECIPE = "plain fp16 + GradScaler"
TRAIN_RECIPE = [
    TrainVariant("fast fp16 + GradScaler", fast=True, amp=FP16, baselines=(RECIPE,)),
    TrainVariant(RECIPE, fast=False, amp=FP16),
    TrainVariant("fast bf16", fast=True, amp=BF16, baselines=("plain bf16", RECIPE)),
    TrainVariant("plain bf16", fast=False, amp=BF16, baselines=(RECIPE,)),
]


def case_train_b8(bench: Bench) -> None:
    """Training step, batch 8 of 128x128 crops (the official size), L1 loss as the official code trains: plain and
    fast, float32 (TF32) and bf16."""
    train_case(bench, TRAIN_B8, batch=8, size=128, accum=1, loss="l1",
               steps=5 if bench.quick else 10)


def case_compiled_train(bench: Bench) -> None:
    """The batch-8 training step with compiled blocks (compiled under bf16 autocast; then with recomputation)."""
    train_case(bench, COMPILED_TRAIN_B8[:1] if bench.quick else COMPILED_TRAIN_B8, batch=8, size=128, accum=1,
               loss="l1", steps=5 if bench.quick else 10)


def case_graph(bench: Bench) -> None:
    """The batch-8 training step captured whole in one CUDA graph (eager blocks, then compiled ones)."""
    train_case(bench, GRAPH_TRAIN_B8[:1] if bench.quick else GRAPH_TRAIN_B8, batch=8, size=128, accum=1, loss="l1",
               steps=5 if bench.quick else 10)


def case_train_recipe(bench: Bench) -> None:
    """The README's recipe's step: batch 2 of 256x256, 4 accumulated micro-batches per update, trainer.py's default
    loss (GFL), float16 with a GradScaler, plain and fast; then bf16."""
    train_case(bench, TRAIN_RECIPE[:3] if bench.quick else TRAIN_RECIPE, batch=2, size=256, accum=4, loss="gfl",
               steps=3 if bench.quick else 5, warmup=1)


ACCURACY = [("fast fp32, TF32 off", True, None), ("fast bf16", True, BF16), ("fast fp16", True, FP16),
            ("plain fp32, TF32 off", False, None), ("plain bf16", False, BF16), ("plain fp16", False, FP16)]


def case_accuracy(bench: Bench) -> None:
    """Accuracy against float64 at 256x256 (where float16 sums pass its largest value), without autograd: float32
    with TF32 off, and bf16 and fp16 autocast (the recipe trains in fp16), plain and fast; cuDNN without autotuning,
    deterministic algorithms only (each row's notes say so)."""
    device, size = bench.device, bench.size(256)
    case = f"accuracy b2 {size}x{size}"

    @functools.cache
    def inputs() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
        base = bench.model()
        torch.manual_seed(2)
        x = torch.rand(2, 3, size, size, device=device)
        with torch.no_grad():
            ref = variant_model(base, device, fast=False).double()(x.double())
        return base, x, ref

    def measure(fast: bool, amp: torch.dtype | None) -> dict:
        base, x, ref = inputs()
        model = variant_model(base, device, fast=fast).eval()
        with torch.no_grad(), autocast(device, amp):
            out = model(x)
        finite = bool(torch.isfinite(out).all())
        kernels = f"cuDNN: {settings_text()}" if device == "cuda" else "the CPU's kernels (no cuDNN)"
        return {"error": rel_err(out, ref), "notes": "bound " + ("1e-2" if amp else "1e-5") + f"; {kernels}" +
                ("" if finite else "; non-finite values in the output")}

    # The bound is about float32 arithmetic, so the convolutions run cuDNN's heuristic choice among its
    # deterministic algorithms (no autotuning): autotuning may pick a Winograd or FFT algorithm, whose own error can
    # pass 1e-5 in float32 (the timed rows run with autotuning, as trainer.py does).
    with gpu_settings(tf32=False, autotune=False, deterministic=True):
        for name, fast, amp in ACCURACY:
            bench.run(case, name, lambda a=(fast, amp): measure(*a))


# ----------------------------------------------------------------------------------------------------- profile
def case_profile(bench: Bench) -> None:
    """Where a training step's time goes: ``torch.profiler`` over 3 updates of batch 8 at 128x128, per operator,
    for the plain fp32 path and the fast bf16 one (a smoke run: one update of the plain one). The row's ms is the
    operators' summed self time per step (device time on a GPU, CPU time on the CPU); its notes name the eight
    largest. With ``--out``, the profiler's whole table goes beside it (``<out stem>_profile_<variant>.txt``)."""
    from torch.profiler import ProfilerActivity, profile

    device, size = bench.device, bench.size(128)
    case = f"profile: train step b8 {size}x{size}, self time per operator"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    reps, warmup = (1, 1) if bench.tiny else (3, 2)

    @functools.cache
    def inputs() -> tuple[torch.nn.Module, list[dict]]:
        base = bench.model()
        torch.manual_seed(5)
        x = torch.rand(8, 3, size, size, device=device)
        return base, [{"lq": x, "gt": x.clamp(0.1, 0.9)}]

    def self_time_us(event) -> float:
        if device != "cuda":
            return event.self_cpu_time_total
        value = getattr(event, "self_device_time_total", None)
        return getattr(event, "self_cuda_time_total", 0.0) if value is None else value

    def measure(name: str, fast: bool, amp: torch.dtype | None) -> dict:
        base, group = inputs()
        free_memory(device)
        step = TrainerStep(variant_model(base, device, fast=fast), group, amp=amp, loss="l1")
        for _ in range(warmup):
            step()
        synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(reps):
                step()
            synchronize(device)
        # operators only (CPU-side events, to which the profiler attributes the kernels they launch): the kernels'
        # own rows would count the same time twice
        averages = prof.key_averages()
        events = [e for e in averages if str(e.device_type).endswith("CPU")]
        total_ms = sum(self_time_us(e) for e in events) / reps / 1e3
        top = sorted(events, key=self_time_us, reverse=True)[:8]
        notes = ", ".join(f"{e.key} {self_time_us(e) / reps / 1e3:.1f}" for e in top)
        path = bench.side_file(f"profile_{name.split(' (')[0].replace(' ', '_')}.txt")
        if path is not None:
            sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
            path.write_text(averages.table(sort_by=sort, row_limit=40) + "\n")
        return {"ms": total_ms, "peak_bytes": peak_memory(device), "notes": f"largest (ms): {notes}"}

    # a smoke run checks the code with one variant, the plain fp32 one: on the CPU the fast path's bf16 step records
    # 9 times as many events as an fp32 step, and the profiler's bookkeeping of them takes 16 s
    for name, fast, amp in ((PLAIN_FP32, False, None), ("fast bf16", True, BF16))[:1 if bench.tiny else 2]:
        bench.run(case, name, lambda a=(name, fast, amp): measure(*a))


# --------------------------------------------------------------------------------------------------- inference
def write_random_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def seconds_of_inference(argv: list[str], root: Path, device: str) -> float:
    """Seconds of one ``inference.main(argv)`` call, end to end, writing a fresh npz in ``root``."""
    import inference

    start = time.perf_counter()
    inference.main([*argv, "--output_npz", str(root / f"pred_{time.monotonic_ns()}.npz")])
    synchronize(device)
    return time.perf_counter() - start


INFER_VARIANTS = [("fast bf16", True, BF16), ("fast fp32 (tf32)", True, None), ("plain bf16", False, BF16),
                  (PLAIN_FP32, False, None)]
COMPILED_INFER_VARIANTS = [("fast bf16 compiled", True, BF16), ("fast fp32 (tf32) compiled", True, None)]


def infer_case(bench: Bench, variants: Sequence[tuple[str, bool, torch.dtype | None]], *, compiled: bool) -> None:
    """``inference.py`` end to end (``inference.main``: checkpoint load, decoding, 8 TTA views per image, pred.npz)
    on 100 random 256x256 images, after a warm-up of a model loaded the same way (``inference.load_model``) on the
    8 views of one image, which also gives the error against float64. cuDNN autotuning and TF32 are on in this
    process, as for every row; inference.py run on its own leaves PyTorch's defaults."""
    import inference

    device, size = bench.device, bench.size(256)
    count = 4 if bench.tiny else 20 if bench.quick else 100
    case = f"inference.py {count} x {size}x{size}, TTA 8"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        @functools.cache
        def inputs() -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
            base = bench.model()
            checkpoint = utils.save_checkpoint(root / "model.pth", {
                "model": base.state_dict(), "model_config": {"arch": bench.arch,
                                                        "preset": "tiny" if bench.tiny else "official"}})
            write_random_images(root / "degraded", count, size)
            torch.manual_seed(6)
            views = torch.stack([torch.rot90(torch.rand(3, size, size), k, (1, 2)) for k in range(4)] * 2).to(device)
            with torch.no_grad():
                ref = variant_model(base, device, fast=False).double()(views.double())
            return checkpoint, root / "degraded", views, ref

        def measure(name: str, fast: bool, amp: torch.dtype | None) -> dict:
            checkpoint, folder, views, ref = inputs()
            free_memory(device)
            start = time.perf_counter()
            model = inference.load_model(checkpoint, device=device, plain=not fast, compile=compiled)
            with torch.inference_mode(), autocast(device, amp):
                error = rel_err(model(views), ref)  # also the warm-up (autotuning, compilation) at the TTA batch
            synchronize(device)
            warm_s = time.perf_counter() - start
            del model
            reset_peak(device)  # the peak of inference.py's own run, without the warm-up's autotuning workspaces

            argv = ["--checkpoint", str(checkpoint), "--input_folder", str(folder), "--tta", "8", "--device", device,
                    "--no_progress", *([] if fast else ["--plain"]), *(["--compile"] if compiled else []),
                    *{None: [], BF16: ["--bf16"], FP16: ["--fp16"]}[amp]]
            timings = [seconds_of_inference(argv, root, device)]
            if bench.timing_room() >= 2 * timings[0]:
                timings.append(seconds_of_inference(argv, root, device))
            seconds, peak = statistics.mean(timings), peak_memory(device)
            twice = (f"timed twice: {timings[0]:.2f} and {timings[1]:.2f} s (spread {spread(timings):.0%})"
                     if len(timings) == 2 else f"timed once ({ONCE_SMOKE if bench.smoke else ONCE_LATE})")
            notes = [f"{count} images end to end in {seconds:.2f} s (checkpoint load, decoding, 8 views each, "
                     f"pred.npz); {twice}", f"warm-up {warm_s:.1f} s" + (" (compiles)" if compiled else ""),
                     "peak memory from after the warm-up",
                     bench.machine_use(fast=fast, batch=8, size=size, train=False, amp=amp, times=count,
                                       ms=seconds * 1e3)]
            baseline = PLAIN_FP32 if amp is None else f"plain {precision_name(amp)}"
            return {"ms": seconds * 1e3, "images_per_s": count / seconds, "peak_bytes": peak,
                    "error": error, "notes": "; ".join(notes), "baselines": [baseline] if fast else [],
                    "images": count, "spread": spread(timings)}

        for name, fast, amp in variants:
            bench.run(case, name, lambda a=(name, fast, amp): measure(*a), needs_cuda=compiled)


def case_infer_tta(bench: Bench) -> None:
    """inference.py on 100 images with 8-view TTA: plain and fast, float32 (TF32) and bf16."""
    infer_case(bench, INFER_VARIANTS, compiled=False)


def case_compiled_infer(bench: Bench) -> None:
    """inference.py --compile on 100 images with 8-view TTA: blocks compiled under inference mode and autocast."""
    infer_case(bench, COMPILED_INFER_VARIANTS[:1] if bench.quick else COMPILED_INFER_VARIANTS, compiled=True)


# ------------------------------------------------------------------------------------------- same numbers, trained
PSNR_VARIANTS = [("plain fp32", ["--plain"]), ("fast fp32", []), ("plain bf16", ["--plain", "--bf16"]),
                 ("fast bf16", ["--bf16"])]


def case_psnr(bench: Bench) -> None:
    """A short training run through trainer.py on a synthetic rain and snow set (synthetic.py), once per path and
    precision from the same seed: the fast path's best validation PSNR against the plain path's at the same
    precision (the bound: within 0.1 dB). ``fp32`` on a GPU means TF32, as trainer.py sets it."""
    import synthetic
    import trainer

    device = bench.device
    preset, per_type, size, epochs = ("tiny", 8, 32, 2) if bench.tiny else ("small", 64, 96, 12 if bench.quick
                                                                              else 20)
    case = f"trained PSNR, {preset} preset, {epochs} epochs"
    with tempfile.TemporaryDirectory() as tmp:
        @functools.cache
        def data() -> Path:
            return synthetic.make_dataset(Path(tmp) / "data", train_per_type=per_type, test_per_type=1, size=size,
                                          seed=0, progress=False)

        def measure(name: str, extra: list[str]) -> dict:
            common = ["--data_dir", str(data()), "--preset", preset, "--epochs", str(epochs), "--warmup_epochs", "1",
                      "--batch_size", "8", "--accum_steps", "1", "--patch_size", str(size * 2 // 3), "--lr", "1e-3",
                      "--num_workers", "0", "--val_per_type", "4", "--loss", "l1", "--seed", "0",
                      "--device", device]
            start = time.perf_counter()
            argv = common + ["--save_dir", str(Path(tmp) / name.replace(" ", "_"))] + extra
            result = trainer.train(trainer.parse_args(trainer.build_parser(), argv))
            seconds = time.perf_counter() - start
            notes = [f"best val PSNR {result.best_psnr:.3f} dB after {result.step} updates in {seconds:.0f} s "
                     "(ms: per update, loading and validation included)"]
            plain = bench.find(case, name.replace("fast", "plain"))
            if name.startswith("fast") and plain is not None:
                plain_psnr = float(plain.notes.split("best val PSNR ")[1].split(" dB")[0])
                notes.append(f"{result.best_psnr - plain_psnr:+.3f} dB vs {plain.variant} (bound 0.1)")
            return {"ms": seconds / result.step * 1e3, "peak_bytes": peak_memory(device), "notes": "; ".join(notes)}

        for name, extra in PSNR_VARIANTS:
            bench.run(case, name, lambda a=(name, extra): measure(*a))


# ---------------------------------------------------------------------------------------------------- CPU cases
def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin so that drift on a shared machine hits all alike, after
    one untimed round (first-call set-up such as oneDNN's kernel generation)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def case_cpu_infer(bench: Bench) -> None:
    """The official network on one 256x256 image on the CPU, no TTA, ``--threads`` threads; the variants run
    interleaved (one runner call for all of them)."""
    case = f"CPU {bench.threads} threads, 1 x 256x256, no TTA"
    reps = 1 if bench.quick else 3

    def measure() -> list[Row]:
        torch.set_num_threads(bench.threads)
        base = build_model("official", arch=bench.arch)
        torch.manual_seed(3)
        x = torch.rand(1, 3, 256, 256)
        ref_device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.no_grad():
            ref = variant_model(base, ref_device, fast=False).double()(x.double().to(ref_device)).cpu()
        models = {"plain": variant_model(base, "cpu", fast=False).eval(),
                  "fast": variant_model(base, "cpu", fast=True).eval(),
                  "fast, NCHW": variant_model(base, "cpu", fast=True, channels_last=False).eval()}
        variants = {f"{name} fp32": (model, None) for name, model in models.items()}
        variants.update({"plain bf16": (models["plain"], BF16), "fast bf16": (models["fast"], BF16)})
        outputs: dict[str, torch.Tensor] = {}

        def runner(name: str, model: torch.nn.Module, amp: torch.dtype | None) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode(), autocast("cpu", amp):
                    outputs[name] = model(x)
            return run

        medians = interleaved({name: runner(name, *v) for name, v in variants.items()}, reps=reps)
        rows = []
        for name, seconds in medians.items():
            notes = f"median of {reps}, interleaved; x{medians['plain fp32'] / seconds:.2f} vs plain fp32"
            if "bf16" in name:
                notes += f", x{medians['plain bf16'] / seconds:.2f} vs plain bf16"
            rows.append(Row(case, name, seconds * 1e3, 1 / seconds, None, rel_err(outputs[name], ref), notes))
        return rows

    bench.run(case, "all variants, interleaved", measure)


def case_cpu_train(bench: Bench) -> None:
    """A training update (trainer.Update: forward, backward, clipping, AdamW) of the small preset, batch 2, 64x64,
    on the CPU, plain and fast interleaved."""
    case = f"CPU {bench.threads} threads, train step small b2 64x64"
    reps = 3 if bench.quick else 7

    def measure() -> list[Row]:
        torch.set_num_threads(bench.threads)
        torch.manual_seed(4)
        base = build_model("small", arch=bench.arch)
        x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
        with torch.no_grad():
            ref = copy.deepcopy(base).double()(x.double())
        steps = {name: TrainerStep(variant_model(base, "cpu", fast=fast), [{"lq": x, "gt": y}], amp=None, loss="l1")
                 for name, fast in (("plain fp32", False), ("fast fp32", True))}
        medians = interleaved(steps, reps=reps)
        return [Row(case, name, seconds * 1e3, 2 / seconds, None, rel_err(steps[name].first_output, ref),
                    f"x{medians['plain fp32'] / seconds:.2f} vs plain") for name, seconds in medians.items()]

    bench.run(case, "all variants, interleaved", measure)


@dataclass(frozen=True)
class Case:
    """A case of the table: ``run(bench)``, whether it needs CUDA (or --smoke), and its share of the budget in
    seconds of a 450-second run."""
    run: Callable[[Bench], None]
    gpu: bool
    share: float


CASES: dict[str, Case] = {
    "ceilings": Case(case_ceilings, True, 10),
    "gpu-train-b8": Case(case_train_b8, True, 55),
    "gpu-train-recipe": Case(case_train_recipe, True, 55),
    "gpu-infer-tta": Case(case_infer_tta, True, 65),
    "gpu-accuracy": Case(case_accuracy, True, 20),
    "gpu-compiled-train": Case(case_compiled_train, True, 60),
    "gpu-graph": Case(case_graph, True, 30),
    "gpu-compiled-infer": Case(case_compiled_infer, True, 30),
    "gpu-profile": Case(case_profile, True, 30),
    "gpu-psnr": Case(case_psnr, True, 120),
    "floors": Case(case_floors, False, 20),
    "cpu-infer": Case(case_cpu_infer, False, 60),
    "cpu-train": Case(case_cpu_train, False, 30),
}
# The ceilings first (every row says what fraction of them it uses), then the targets (training step and memory,
# the recipe, inference, accuracy), then the compiled variants.
GPU_DEFAULT = ["ceilings", "gpu-train-b8", "gpu-train-recipe", "gpu-infer-tta", "gpu-accuracy", "gpu-compiled-train",
               "gpu-graph", "gpu-compiled-infer", "gpu-profile", "floors", "gpu-psnr", "cpu-infer"]
COMPILED = ["gpu-compiled-train", "gpu-graph", "gpu-compiled-infer"]
CPU_DEFAULT = ["cpu-infer", "cpu-train", "floors"]


def scaled_shares(shares: dict[str, float], budget_s: float) -> dict[str, float]:
    """The shares scaled to add up to the budget (unchanged without a budget)."""
    total = sum(shares.values())
    if not math.isfinite(budget_s) or total <= 0:
        return dict(shares)
    return {name: share * budget_s / total for name, share in shares.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run every GPU case (needs CUDA), then the CPU case")
    parser.add_argument("--cases", help=f"comma-separated, run in the order given: {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="fewer variants, steps and repeats")
    parser.add_argument("--out", type=Path, help="write the table to this file (rewritten after every row), every "
                        "row to <stem>_rows.jsonl beside it as it is measured")
    parser.add_argument("--threads", type=utils.positive_int, default=2,
                        help="CPU threads for the CPU cases (default 2)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true",
                      help="run the GPU cases' code on the CPU with the tiny preset and small images (a check of "
                           "this script, not a measurement; CUDA-only variants are skipped)")
    size.add_argument("--tiny", action="store_true",
                      help="the tiny preset and small images on CUDA: a quick check of the CUDA-only variants")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run, shared by the cases; a case starts no variant after its "
                             f"share (default: {DEFAULT_GPU_BUDGET_S:.0f} with --gpu, none without)")
    parser.add_argument("--rest", type=Path, metavar="ROWS",
                        help="the rows file of an earlier run (or its folder): its finished variants are kept, "
                             "not run again")
    add_arch_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> str:
    """Command-line entry point; returns the table."""
    utils.setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    names = args.cases.split(",") if args.cases else GPU_DEFAULT if args.gpu else CPU_DEFAULT
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    needs_cuda = [n for n in names if CASES[n].gpu]
    if (needs_cuda and not args.smoke or args.tiny) and not torch.cuda.is_available():
        parser.error(f"{', '.join(needs_cuda) or '--tiny'} need(s) CUDA, which this machine lacks; run the CPU "
                     f"cases ({', '.join(CPU_DEFAULT)}), or --smoke to check the GPU cases' code")
    if args.budget is not None and not args.budget >= 0:
        parser.error("--budget must be a number of seconds, at least 0")
    return utils.run_cli(parser.prog, lambda: run(args, names))


def run(args: argparse.Namespace, names: list[str]) -> str:
    budget = args.budget if args.budget is not None else DEFAULT_GPU_BUDGET_S if args.gpu else math.inf
    bench = Bench(args.out, budget, args.quick, args.threads, tiny=args.smoke or args.tiny,
                  arch=args.arch or "promptir",
                  device="cpu" if args.smoke else "cuda", plan=names,
                  shares=scaled_shares({n: CASES[n].share for n in names}, budget),
                  rest=load_rows(args.rest) if args.rest else ())
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # a smoke run checks code, often on a machine shared with other jobs
    if torch.cuda.is_available():
        log.info("%s, torch %s", torch.cuda.get_device_name(), torch.__version__)
    # The GPU rows' settings (a smoke run sets them too, on the CPU, as a check of the code), restored at the end.
    with gpu_settings() if torch.cuda.is_available() or args.smoke else contextlib.nullcontext():
        try:
            for name in names:
                bench.begin(name)
                CASES[name].run(bench)
        finally:
            torch.set_num_threads(threads)
    bench.save()
    text = bench.table()
    print(text)
    log.info("done in %.0f s", time.perf_counter() - bench.start)
    return text


if __name__ == "__main__":
    main()
