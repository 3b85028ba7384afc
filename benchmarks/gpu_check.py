"""The one prepared GPU check: on a CUDA machine, in 7 minutes, the figures that matter most first, each written to
the output folder the moment it is measured. ``gpu_check.sh`` runs it; see there for the calls (a first one, and a
second with ``--rest`` for what the first left).

In order (``PLAN``, each step with its share of ``--budget``; a step starts nothing new once its share, and
whatever the steps before it left, is spent):

1. the environment: card, driver, CUDA, cuDNN, NCCL, PyTorch, Triton, Python, and the packages the toolkit needs;
2. the two ceilings, a large bf16 matrix product and a device-to-device copy (bench_speed ``ceilings``): every
   timed row then says what fraction of them it uses;
3. the training step at batch 8 of 128x128, plain and fast, fp32 (TF32) and bf16, and fast with the full-resolution
   stages recomputed (bench_speed ``gpu-train-b8``);
4. the original recipe's step, batch 2 of 256x256 with 4 accumulated micro-batches, fp16 with a GradScaler, plain
   and fast, then bf16 (``gpu-train-recipe``);
5. inference.py end to end on 100 images of 256x256 with 8-view TTA, plain and fast, fp32 and bf16
   (``gpu-infer-tta``);
6. accuracy against float64 at 256x256 for fp32, bf16 and fp16, cuDNN without autotuning (``gpu-accuracy``);
7. the CUDA-only tests of the trainer and the kernels (``CUDA_TESTS``: the trainer's first), and trainer.py under a
   one-process torchrun (NCCL): training, resume, then inference on a tiny random set;
8. last, the compiled step: in a process of its own, so that a device fault there costs none of the figures above,
   compiled blocks, the CUDA-graphed step and compiled inference (``gpu-compiled-train``, ``gpu-graph``,
   ``gpu-compiled-infer``); then the tests that compile (``COMPILE_TESTS``).

Every timed row is timed twice (a difference within the spread of the two is noise), with cuDNN autotuning, TF32
for float32 and trainer.py's optimizer (fused AdamW), its peak memory counted from after the warm-up. With
``--smoke`` the same steps run on the CPU with the tiny preset and small images (torchrun with gloo; rows that need
CUDA say so), in about a minute: a check of this script, not a measurement.

Files in ``--out`` (7): check.md (the table, targets first, rewritten after every row), check_rows.jsonl (every row
as it is measured; what ``--rest`` reads), check_environment.txt, check_cuda_tests.log, check_torchrun.log,
check_compiled.log (the separate process's console) and check_console.log (written by gpu_check.sh).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

START = time.perf_counter()  # the budget counts from the process's start, imports included
ROOT = Path(__file__).resolve().parents[1]  # the project root: the scripts checked here live there
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (module, package, what needs it, whether nothing runs without it)
PACKAGES = [("torch", "torch", "everything", True),
            ("numpy", "numpy", "everything", True),
            ("PIL", "pillow", "reading and writing images", True),
            ("tqdm", "tqdm", "trainer.py's and inference.py's progress bars", True),
            ("einops", "einops", "model.py (imported at its top)", True),
            ("matplotlib", "matplotlib", "the curves trainer.py draws at the end of a run (the torchrun step)", False),
            ("pytest", "pytest", "the CUDA-only tests", False)]
# (step, share in seconds of a 420-second budget)
PLAN = [("environment", 5), ("ceilings", 10), ("gpu-train-b8", 65), ("gpu-train-recipe", 50), ("gpu-infer-tta", 60),
        ("gpu-accuracy", 15), ("cuda-tests", 75), ("torchrun", 30), ("compiled", 110)]
# A first call of 420 s (gpu_check.sh stops it at 450) leaves room in a quarter hour of GPU time for a second call
# with --rest (see gpu_check.sh), even on a machine started anew.
DEFAULT_BUDGET_S = 420.0
KILL_GRACE_S = 15.0  # how long past the budget a child process may run before it is stopped
# The tests that need CUDA, in two selections: those of the trainer and the kernels (the trainer's first:
# cuda_tests_first.py), then, in the compiled step, those that compile.
CUDA_TESTS = ["tests"], "cuda and not compile"
COMPILE_TESTS = ["tests"], "compile"
COMPILE_TESTS_SHARE = 40.0  # of the compiled step's share, left to COMPILE_TESTS


def check_packages() -> tuple[list[str], list[str]]:
    """Lines saying which of ``PACKAGES`` are there (with versions), and the required ones that are missing."""
    lines, fatal = [], []
    for module, package, needed_by, required in PACKAGES:
        if importlib.util.find_spec(module) is None:
            lines.append(f"MISSING {package}: needed by {needed_by}" + ("" if required else " (those rows fail)"))
            if required:
                fatal.append(package)
            continue
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "version unknown"
        lines.append(f"{package} {version}")
    return lines, fatal


def _command_output(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> tuple[dict[str, str], str]:
    """The environment rows (name: value) and the longer text for check_environment.txt."""
    import torch

    info: dict[str, str] = {}
    smi = _command_output(["nvidia-smi"]) if device == "cuda" else None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["card"] = (f"{props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}, "
                        f"{props.multi_processor_count} multiprocessors, {torch.cuda.device_count()} visible")
        driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if driver is None and Path("/proc/driver/nvidia/version").is_file():
            driver = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        info["driver"] = driver or "unknown (no nvidia-smi)"
        api = getattr(torch._C, "_cuda_getDriverVersion", lambda: 0)()
        info["CUDA"] = f"{torch.version.cuda} (PyTorch's runtime)" + (
            f"; the driver supports CUDA {api // 1000}.{api % 1000 // 10}" if api else "")
        info["cuDNN"] = str(torch.backends.cudnn.version())
        nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
        info["NCCL"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl or "not available")
    else:
        info["card"] = "none: a smoke run on the CPU"
        info["driver"] = info["CUDA"] = info["cuDNN"] = info["NCCL"] = "-"
    info["PyTorch"] = torch.__version__
    try:
        info["Triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        info["Triton"] = "not installed (torch.compile cannot build GPU kernels)"
    info["Python"] = f"{platform.python_version()} ({sys.executable})"
    info["CPU"] = f"{os.cpu_count()} cores, {platform.machine()}, {platform.platform()}"
    text = "\n".join(f"{k}: {v}" for k, v in info.items())
    text += "\n\npackages:\n" + "\n".join(check_packages()[0])
    if smi:
        text += "\n\nnvidia-smi:\n" + smi
    text += "\n\ntorch.__config__.show():\n" + torch.__config__.show()
    return info, text + "\n"


# ------------------------------------------------------------------------------------------------ sub-processes
_children: set[subprocess.Popen] = set()  # the child processes running now, each the leader of its process group


def descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (children, theirs, ...), read from /proc: torchrun starts its workers in
    sessions of their own, which a signal to the process group of ``pid`` does not reach."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
        except (OSError, IndexError):
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal_all(proc: subprocess.Popen, sig: int, known: set[int]) -> set[int]:
    """Send ``sig`` to ``proc``'s process group and to every process below it (those found now and ``known``,
    found before: a child whose parent ended is no longer below it). Returns the processes signalled."""
    known = known | descendants(proc.pid)
    for kill, target in [(os.killpg, proc.pid)] + [(os.kill, pid) for pid in sorted(known)]:
        try:
            kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return known


def _stop(proc: subprocess.Popen) -> None:
    """End ``proc``, its process group and every process below it (torchrun's workers, pytest's children):
    SIGTERM, then SIGKILL 10 s later to whatever is left."""
    known = _signal_all(proc, signal.SIGTERM, set())
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in known):
        time.sleep(0.2)
    _signal_all(proc, signal.SIGKILL, {pid for pid in known if _alive(pid)})
    proc.wait()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Terminated(BaseException):
    """The check was told to stop (a BaseException, so that no variant's failure handling takes it for a result)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_termination(signum, frame) -> None:
    """gpu_check.sh's time limit (SIGTERM from timeout) or Ctrl-C: kill the children at once, whose process groups
    the signal does not reach (a trainer would finish its update first), and stop."""
    for proc in list(_children):
        _signal_all(proc, signal.SIGKILL, set())
    raise Terminated(signum)


def run_logged(command: list[str], log: Path, *, timeout: float, env: dict | None = None,
               cwd: Path = ROOT) -> tuple[int | None, float, str]:
    """Run ``command`` in a process group of its own, its output appended to ``log`` as it comes; end the group
    after ``timeout`` seconds. Returns (exit code, or None when it was stopped; seconds; its output)."""
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(command)}\n")
        f.flush()
        begin = log.stat().st_size
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                process_group=0)
        _children.add(proc)
        try:
            code = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = None
            f.write(f"\n[stopped after {timeout:.0f} s: the step's share of the budget]\n")
        finally:
            _children.discard(proc)
        seconds = time.perf_counter() - start
    with open(log) as f:
        f.seek(begin)
        return code, seconds, f.read()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def pytest_variant(selection: tuple[list[str], str]) -> str:
    paths, expression = selection
    return f'pytest {" ".join(paths)} -k "{expression}"'


def case_pytest(bench, selection: tuple[list[str], str], log: Path) -> None:
    """A selection of the tests that skip without CUDA, in a process of its own, the trainer's first
    (``cuda_tests_first``); on a smoke run only collected (they would skip), which checks the command, the selection
    and the order."""
    from benchmarks.bench_speed import FAILED, OK, PENDING, SKIPPED

    paths, expression = selection
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "benchmarks.cuda_tests_first", *paths,
               "-k", expression]
    command += ["--collect-only", "-q"] if bench.smoke else ["-v", "-rs"]

    def measure() -> dict:
        code, seconds, text = run_logged(command, log, timeout=bench.remaining())
        summary = _last_line(text)
        if code is None:
            return {"status": PENDING, "notes": f"stopped at the budget after {seconds:.0f} s: "
                    f"{len(re.findall(r' PASSED', text))} passed, {len(re.findall(r' FAILED', text))} failed so far; "
                    "run it again with --rest"}
        if bench.smoke:
            selected = [line for line in text.splitlines() if "::" in line]
            first = f", first {selected[0]}" if selected else ""
            status, notes = (SKIPPED, f"skipped: needs CUDA (the selection collects {len(selected)} tests{first})") \
                if code == 0 else (FAILED, f"failed: pytest could not collect the tests (exit code {code}): {summary}")
            return {"status": status, "notes": notes}
        return {"status": OK if code == 0 else FAILED, "ms": seconds * 1e3,
                "notes": f"{summary} (exit code {code}; {log.name})"}

    bench.run("CUDA-only tests", pytest_variant(selection), measure, own_process=True)


def write_pairs(root: Path, *, per_kind: int, size: int) -> Path:
    """A tiny homework-layout set of random rain and snow pairs (degraded = clean + a brightening veil)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for side in ("degraded", "clean"):
        (root / "train" / side).mkdir(parents=True, exist_ok=True)
    for kind in ("rain", "snow"):
        for i in range(1, per_kind + 1):
            clean = rng.integers(0, 200, (size, size, 3))
            degraded = np.clip(clean + rng.integers(0, 56, (size, size, 1)), 0, 255)
            Image.fromarray(clean.astype(np.uint8)).save(root / "train" / "clean" / f"{kind}_clean-{i}.png")
            Image.fromarray(degraded.astype(np.uint8)).save(root / "train" / "degraded" / f"{kind}-{i}.png")
    return root


def guarded(fn):
    """``fn`` as a variant's measurement: a step stopped at the budget is pending (for --rest), a failed one failed."""
    import utils
    from benchmarks.bench_speed import FAILED, PENDING

    def measure() -> dict:
        try:
            return fn()
        except TimeoutError as err:
            return {"status": PENDING, "notes": f"{err}; run it again with --rest"}
        except (RuntimeError, OSError, utils.ToolkitError) as err:
            return {"status": FAILED, "notes": f"failed: {err}"}
    return measure


class TorchrunCheck:
    """The steps of ``case_torchrun`` on one tiny data set and run folder in ``tmp``."""

    def __init__(self, bench, log: Path, tmp: Path):
        self.bench, self.log, self.tmp = bench, log, tmp
        self.device = bench.device
        self.backend = "nccl" if self.device == "cuda" else "gloo"
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"} | ({"NCCL_DEBUG": "INFO"} if self.backend == "nccl" else {})
        self.torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                         "trainer.py"]
        self.data, self.run_dir = tmp / "data", tmp / "run"
        self.common = ["--data_dir", str(self.data), "--preset", "tiny", "--device", self.device, "--num_workers",
                       "0", "--batch_size", "2", "--accum_steps", "1", "--patch_size", "16", "--val_per_type", "1",
                       "--warmup_epochs", "1", "--lr", "1e-3", "--epochs", "2", "--save_dir", str(self.run_dir),
                       "--no_curves"]

    def step(self, command: list[str], what: str) -> tuple[str, float]:
        code, seconds, text = run_logged(command, self.log, timeout=self.bench.remaining(), env=self.env)
        if code is None:
            raise TimeoutError(f"{what} stopped at the budget after {seconds:.0f} s")
        if code != 0:
            raise RuntimeError(f"{what} exited with code {code}: {_last_line(text)}")
        return text, seconds

    def nccl_note(self, text: str) -> str:
        if self.backend != "nccl":
            return "gloo (smoke run)"
        return "NCCL initialised (NCCL INFO lines in check_torchrun.log)" if "NCCL INFO" in text else \
            "no NCCL INFO line in the output although NCCL_DEBUG=INFO was set"

    def trained(self) -> tuple[dict, str]:
        """The run's last.pth, trained first when an earlier call left none, and how the training went."""
        import utils

        if not (self.run_dir / "last.pth").is_file():
            if not self.data.is_dir():
                write_pairs(self.data, per_kind=3, size=24)
            text, seconds = self.step(self.torchrun + self.common, "training")
            return utils.load_checkpoint(self.run_dir / "last.pth"), f"{self.nccl_note(text)}; {seconds:.1f} s"
        return utils.load_checkpoint(self.run_dir / "last.pth"), ""

    def train(self) -> dict:
        state, notes = self.trained()
        if state["epoch"] != 2:
            raise RuntimeError(f"last.pth holds epoch {state['epoch']}, not 2")
        return {"notes": f"2 epochs, {state['step']} updates; {notes}"}

    def resume(self) -> dict:
        import run
        import utils

        first, before = self.trained()
        text, seconds = self.step(self.torchrun + ["--data_dir", str(self.data), "--resume", str(self.run_dir),
                                                   "--epochs", "3", "--num_workers", "0", "--no_curves"], "the resume")
        state = utils.load_checkpoint(self.run_dir / "last.pth")
        records = run.read_log(self.run_dir)
        if state["epoch"] != 3 or len(records) != 3 or state["step"] <= first["step"]:
            raise RuntimeError(f"after the resume last.pth holds epoch {state['epoch']} (step {state['step']}) "
                               f"and the log {len(records)} epochs; expected 3 and 3")
        return {"notes": f"epoch 2 -> 3, updates {first['step']} -> {state['step']}, 3 log records; "
                         f"{self.nccl_note(text)}; {seconds:.1f} s" + (f" (trained first: {before})" if before else "")}

    def infer(self) -> dict:
        import numpy as np

        import inference

        _, before = self.trained()
        npz = self.tmp / "pred.npz"
        argv = ["--checkpoint", str(self.run_dir), "--input_folder", str(self.data / "train" / "degraded"),
                "--gt_folder", str(self.data / "train" / "clean"), "--output_npz", str(npz), "--device", self.device,
                "--no_progress"]
        with open(self.log, "a") as f:
            f.write(f"\n$ inference.main({argv!r}) (in the check's process)\n")
        start = time.perf_counter()
        inference.main(argv)  # a failure exits (SystemExit), which the runner reports as a failed row
        seconds = time.perf_counter() - start
        if not npz.is_file():
            raise RuntimeError(f"inference.main returned but wrote no {npz.name}")
        with np.load(npz) as held:
            images = len(held.files)
        return {"notes": f"pred.npz of {images} images, scored; {seconds:.1f} s"
                         + (f" (trained first: {before})" if before else "")}


def case_torchrun(bench, log: Path) -> None:
    """trainer.py under a one-process torchrun (NCCL on CUDA, gloo on a smoke run) on a tiny random set: 2 epochs,
    a resume to 3 (two launches, each with ``--num_workers 0``: no loader process forked beside NCCL's threads; no
    curves), then inference.py on the run folder, called in this process (``inference.main``). A step whose run is
    missing (kept from an earlier call) trains first."""
    with tempfile.TemporaryDirectory() as tmp:
        check = TorchrunCheck(bench, log, Path(tmp))
        case = f"torchrun, 1 process ({check.backend})"
        bench.run(case, "train 2 epochs", guarded(check.train), own_process=True)
        bench.run(case, "resume to 3 epochs", guarded(check.resume), own_process=True)
        bench.run(case, "inference.py on the run's best.pth", guarded(check.infer))  # in this process


def settle(rows, code: int | None, log_name: str):
    """The rows a child process left, with those it was still running when it ended made final: stopped at the
    budget (run again by --rest), or ended by a fault (failed)."""
    from benchmarks.bench_speed import FAILED, PENDING, RUNNING, latest

    out = list(rows)
    for row in latest(rows).values():
        if row.status != RUNNING:
            continue
        if code is None:
            out.append(replace(row, status=PENDING, notes="stopped at the budget during this variant; run it again "
                                                          "with --rest"))
        else:
            out.append(replace(row, status=FAILED, notes=f"failed: the process ended during this variant "
                                                         f"({_exit_text(code)}; see {log_name})"))
    return out


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def case_compiled(bench, log: Path, *, quick: bool, reserve_s: float) -> None:
    """bench_speed's compiled cases in a child process that appends to the same rows file; a fault there (or the
    budget's end) ends that process alone. It leaves ``reserve_s`` of the budget to what follows it."""
    from benchmarks.bench_speed import COMPILED, FAILED, OK, PENDING, Row, load_rows

    budget = max(0.0, bench.start + bench.budget_s - bench.clock() - reserve_s)
    command = [sys.executable, "benchmarks/bench_speed.py", "--cases", ",".join(COMPILED), "--out", str(bench.out),
               "--rest", str(bench.rows_file), "--budget", f"{budget:.0f}"]
    command += (["--smoke"] if bench.smoke else []) + (["--quick"] if quick else [])
    code, seconds, text = run_logged(command, log, timeout=budget + KILL_GRACE_S)
    bench.absorb(settle(load_rows(bench.rows_file), code, log.name))
    if code is None:
        status, notes = PENDING, f"stopped {KILL_GRACE_S:.0f} s past the budget, after {seconds:.0f} s"
    else:
        status = OK if code == 0 else FAILED
        notes = f"{_exit_text(code)} after {seconds:.0f} s" + ("" if code == 0 else f": {_last_line(text)}")
    bench.add(Row("separate process", "compiled blocks, CUDA graph, compiled inference", ms=seconds * 1e3,
                  status=status, notes=notes))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; at most 7 files)")
    parser.add_argument("--smoke", action="store_true",
                        help="the same steps on the CPU, tiny preset and small images, in about a minute")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole check, from the start (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--rest", type=Path, metavar="ROWS",
                        help="check_rows.jsonl of an earlier call (or its folder): its finished rows are kept and "
                             "only the rest runs")
    parser.add_argument("--quick", action="store_true", help="fewer variants and steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_termination)
    lines, fatal = check_packages()
    print("packages: " + "; ".join(lines), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if fatal:
        (args.out / "check_environment.txt").write_text("packages:\n" + "\n".join(lines) + "\n")
        print(f"gpu_check: error: missing {', '.join(fatal)}; this check installs nothing (the machine may have no "
              "network): install them, or carry them as wheels", file=sys.stderr)
        return 3

    import torch

    from benchmarks import bench_speed
    import utils

    utils.setup_logging()
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: error: CUDA is not available here; run with --smoke to check the script on the CPU",
              file=sys.stderr)
        return 2
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        torch.set_num_threads(1)  # a smoke run checks code, often on a machine shared with other jobs
    try:
        return utils.run_cli("gpu_check.py", lambda: _check(args, device, bench_speed))
    except Terminated as stop:
        print(f"gpu_check: stopped by {stop}; every row measured so far is in {args.out}", file=sys.stderr)
        return 128 + stop.signum


def _check(args: argparse.Namespace, device: str, bench_speed) -> int:
    shares = bench_speed.scaled_shares(dict(PLAN), args.budget)
    bench = bench_speed.Bench(args.out / "check.md", args.budget, args.quick, tiny=args.smoke, device=device,
                              shares=shares, plan=[name for name, _ in PLAN], start=START,
                              rest=bench_speed.load_rows(args.rest) if args.rest else ())
    with bench_speed.gpu_settings():  # as trainer.py sets them: TF32, cuDNN autotuning
        for name, _ in PLAN:
            _step(args, device, bench, bench_speed, name)
    bench.save()
    print(bench.table())
    print(f"gpu_check: done in {time.perf_counter() - START:.0f} s; results in {args.out}", flush=True)
    return 0


def _step(args: argparse.Namespace, device: str, bench, bench_speed, name: str) -> None:
    bench.begin(name)
    if name == "environment":
        info, text = environment(device)
        (args.out / "check_environment.txt").write_text(text)
        for key, value in info.items():
            bench.add(bench_speed.Row("environment", key, notes=value))
    elif name == "cuda-tests":
        case_pytest(bench, CUDA_TESTS, args.out / "check_cuda_tests.log")
    elif name == "torchrun":
        case_torchrun(bench, args.out / "check_torchrun.log")
    elif name == "compiled":
        case_compiled(bench, args.out / "check_compiled.log", quick=args.quick,
                      reserve_s=COMPILE_TESTS_SHARE * args.budget / DEFAULT_BUDGET_S)
        case_pytest(bench, COMPILE_TESTS, args.out / "check_cuda_tests.log")
    else:
        bench_speed.CASES[name].run(bench)


if __name__ == "__main__":
    sys.exit(main())
