"""bench_speed.py and gpu_check.sh: the one runner of the benchmark's variants (budget shares, CUDA-only skips,
failures as rows, every row written the moment it exists, --rest), the GPU cases' code in smoke mode on the CPU,
and the whole prepared GPU check end to end in smoke mode."""
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from benchmarks import bench_speed, gpu_check
from benchmarks.bench_speed import FAILED, OK, PENDING, PLAIN_FP32, RUNNING, SKIPPED, Row, latest, load_rows
from conftest import ROOT


def table_rows(text):
    """The table's rows as lists of cells (the case first, the target column last)."""
    return [line.split(" | ") for line in text.splitlines()[2:]]


def test_bench_speed_smoke_table(tmp_path):
    """bench_speed.py's code runs in this process in smoke mode and returns the table it writes: the two ceilings
    are measured (timed twice, a rate each), the profile rows name the largest operators and the profiler's table
    is written beside the output."""
    out = tmp_path / "bench.md"
    text = bench_speed.main(["--smoke", "--quick", "--cases", "ceilings,gpu-profile", "--out", str(out)])
    assert out.read_text().strip() == text
    rows = table_rows(text)
    ceilings = latest(load_rows(tmp_path / "bench_rows.jsonl"))
    for name in (bench_speed.CEILING_MATMUL, bench_speed.CEILING_COPY):
        row = ceilings[("ceilings", name)]
        assert row.status == OK and row.rate > 0 and row.spread is not None and "timed twice" in row.notes
    profiled = [r for r in rows if r[0].lstrip("| ").startswith("profile")]
    assert [r[1] for r in profiled] == [bench_speed.PLAIN_FP32]  # a smoke run profiles one variant
    assert all(float(r[2]) > 0 and "largest (ms): aten::" in r[6] for r in profiled)
    assert "aten::" in (tmp_path / "bench_profile_plain_fp32.txt").read_text()


def test_a_variant_that_raises_becomes_a_failed_row_and_the_next_ones_run(monkeypatch):
    """In a real case, a variant whose code raises becomes a 'failed' row naming the error; the variant before it
    was measured, the one after it runs, and the next case is reached."""
    real, calls = bench_speed.enable_fast_path, []

    def broken_second_call(model, **kwargs):
        calls.append(model)
        if len(calls) == 2:
            raise RuntimeError("injected failure | for the test")
        return real(model, **kwargs)

    monkeypatch.setattr(bench_speed, "enable_fast_path", broken_second_call)
    text = bench_speed.main(["--smoke", "--quick", "--cases", "gpu-accuracy,gpu-compiled-train"])
    rows = {(r[0].lstrip("| "), r[1]): r for r in table_rows(text)}
    first, failed, after = (rows[("accuracy b2 16x16", name)] for name, _, _ in bench_speed.ACCURACY[:3])
    assert "failed: RuntimeError: injected failure / for the test" in failed[6] and failed[5] == "-"
    assert float(first[5]) <= 1e-5 and float(after[5]) <= 1e-2
    assert "skipped: needs CUDA" in rows[("train b8 16x16", "fast bf16 compiled")][6]


def test_bench_speed_trained_psnr_case():
    """The trained-PSNR case runs trainer.py once per path and precision and reports the fast path's best validation
    PSNR against the plain one's."""
    text = bench_speed.main(["--smoke", "--quick", "--cases", "gpu-psnr"])
    rows = {(r[0].lstrip("| "), r[1]): r for r in table_rows(text)}
    psnr = {name: float(re.search(r"best val PSNR ([\d.]+) dB", row[6]).group(1))
            for (case, name), row in rows.items() if case.startswith("trained PSNR")}
    assert set(psnr) == {"plain fp32", "fast fp32", "plain bf16", "fast bf16"}
    assert all(10 < v < 60 for v in psnr.values())
    assert abs(psnr["fast fp32"] - psnr["plain fp32"]) <= 0.1 and abs(psnr["fast bf16"] - psnr["plain bf16"]) <= 0.1
    assert "dB vs plain fp32 (bound 0.1)" in rows[("trained PSNR, tiny preset, 2 epochs", "fast fp32")][6]


def test_runner_keeps_each_case_to_its_share_and_reports_every_outcome(tmp_path):
    """The one runner: a case whose variant overran its share starts no more variants, yet the next case gets its
    own share; a case that finishes early leaves its time to the next; a variant that needs CUDA is skipped on the
    CPU; an exception or an exit becomes a 'failed' row and the next variant runs; every row is in the rows file
    before the next variant starts."""
    now = [0.0]

    def takes(seconds, **fields):
        def measure():
            now[0] += seconds
            return {"ms": 1.0, **fields}
        return measure

    def boom():
        raise RuntimeError("boom | and more")

    bench = bench_speed.Bench(tmp_path / "t.md", 12.0, device="cpu", shares={"a": 4, "b": 4, "c": 4},
                              plan=["a", "b", "c"], clock=lambda: now[0])
    bench.begin("a")  # may start variants until 4 s
    bench.run("A", "first", takes(3))
    bench.run("A", "overruns", takes(3))  # starts at 3 s, ends at 6 s
    bench.run("A", "late", lambda: pytest.fail("started after its case's share"))
    bench.begin("b")  # at 6 s: still its own 4 s, to 10 s, though case a overran
    bench.run("B", "on CUDA", lambda: pytest.fail("started on the CPU"), needs_cuda=True)
    written = []
    bench.run("B", "reads the rows file", lambda: written.extend(load_rows(tmp_path / "t_rows.jsonl")) or {})
    bench.run("B", "raises", boom)
    bench.run("B", "exits", lambda: sys.exit(3))
    bench.run("B", "after the failures", takes(1))
    bench.begin("c")  # at 7 s: the rest of the budget, to 12 s (b left 3 s unused)
    bench.run("C", "uses b's leftover", takes(4.5))  # ends at 11.5 s
    bench.run("C", "still within", takes(1))  # starts at 11.5 s < 12 s
    bench.run("C", "past the end", lambda: pytest.fail("started after the budget"))

    rows = latest(load_rows(tmp_path / "t_rows.jsonl"))
    status = {variant: row.status for (_, variant), row in rows.items()}
    assert status == {"first": OK, "overruns": OK, "late": PENDING, "on CUDA": SKIPPED, "reads the rows file": OK,
                      "raises": FAILED, "exits": FAILED, "after the failures": OK, "uses b's leftover": OK,
                      "still within": OK, "past the end": PENDING}
    assert rows[("A", "late")].notes.startswith("not run: this case's share of the 12 s budget was spent")
    assert rows[("B", "on CUDA")].notes == "skipped: needs CUDA"
    assert rows[("B", "raises")].notes == "failed: RuntimeError: boom / and more"
    assert rows[("B", "exits")].notes == "failed: exited with code 3"
    seen = latest(written)
    assert seen[("A", "overruns")].status == OK and seen[("B", "on CUDA")].status == SKIPPED
    assert seen[("B", "reads the rows file")].status == RUNNING  # marked before it ran: a crash would name it
    text = (tmp_path / "t.md").read_text()
    assert "| A | late |" in text and "pending: not run" in text and "| C | still within |" in text


def test_a_broken_cuda_context_stops_the_variants_of_this_process_only(tmp_path):
    """After a CUDA error that leaves the context unusable, no further variant of this process starts (each says
    why, pending for --rest); a step that runs in a process of its own still runs."""
    bench = bench_speed.Bench(tmp_path / "t.md", device="cpu")

    def illegal_access():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    bench.run("A", "out of memory", out_of_memory)
    bench.run("A", "after it", lambda: {"ms": 1.0})
    bench.run("A", "faults", illegal_access)
    bench.run("A", "in this process", lambda: pytest.fail("started on a broken CUDA context"))
    bench.run("B", "in its own process", lambda: {"ms": 2.0}, own_process=True)
    rows = latest(load_rows(tmp_path / "t_rows.jsonl"))
    assert [row.status for row in rows.values()] == [FAILED, OK, FAILED, PENDING, OK]
    assert rows[("A", "in this process")].notes.startswith("not run: CUDA failed in A / faults (RuntimeError)")


def test_rest_keeps_finished_rows_and_runs_the_others(tmp_path):
    """--rest ROWS: a variant an earlier run finished is kept as it was (not measured again), one it left pending
    or running is run now, and the new rows file holds both."""
    earlier = tmp_path / "earlier_rows.jsonl"
    case = "accuracy b2 16x16"
    kept = Row(case, "fast bf16", error=0.5, notes="from the earlier run", case_id="gpu-accuracy")
    earlier.write_text("".join(json.dumps(asdict(r)) + "\n" for r in [
        Row(case, "fast fp32, TF32 off", status=RUNNING), kept, Row(case, "fast fp16", status=PENDING)])
        + '{"case": "cut short by a killed wri')
    text = bench_speed.main(["--smoke", "--cases", "gpu-accuracy", "--rest", str(earlier),
                             "--out", str(tmp_path / "now.md")])
    rows = latest(load_rows(tmp_path / "now_rows.jsonl"))
    assert rows[(case, "fast bf16")] == kept
    assert rows[(case, "fast fp32, TF32 off")].status == OK and rows[(case, "fast fp32, TF32 off")].error <= 1e-5
    assert rows[(case, "fast fp16")].status == OK and rows[(case, "fast fp16")].error <= 1e-2
    assert {variant for _, variant in rows} == {name for name, _, _ in bench_speed.ACCURACY}
    # the kept row is judged like any other: 0.5 is outside the bf16 bound
    assert ("| accuracy b2 16x16 | fast bf16 | - | - | - | 5.0e-01 | from the earlier run | within bound: not met |"
            in text)
    assert re.search(r"\| target \| accuracy .*\| not met \|", text)


def test_rows_a_child_process_left_running_are_settled():
    """A variant still 'running' when the compiled cases' process ended is marked: stopped at the budget (pending,
    so that --rest runs it again) or failed with the way the process ended; finished rows stay as they are."""
    rows = [Row("c", "done", status=RUNNING), Row("c", "done", ms=1.0), Row("c", "cut", status=RUNNING)]
    stopped = latest(gpu_check.settle(rows, None, "check_compiled.log"))
    assert stopped[("c", "done")].status == OK and stopped[("c", "cut")].status == PENDING
    crashed = latest(gpu_check.settle(rows, -11, "check_compiled.log"))
    assert crashed[("c", "cut")].status == FAILED
    assert "killed by SIGSEGV; see check_compiled.log" in crashed[("c", "cut")].notes


def test_time_twice_counts_the_peak_from_after_the_warm_up(monkeypatch):
    """The peak memory count starts after the warm-up updates (cuDNN's autotuning workspaces and compilation stay
    out of it) and before the two timings; the second timing is left out when the case has no room for it. The
    batch-8 case has eager (uncompiled) recompute rows, the rows that can meet the 8 GiB target without compiling."""
    calls = []
    monkeypatch.setattr(bench_speed, "reset_peak", lambda device: calls.append("reset"))
    timings, spread = bench_speed.time_twice(lambda: calls.append("step"), warmup=2, reps=3, device="cpu")
    assert calls == ["step"] * 2 + ["reset"] + ["step"] * 6 and len(timings) == 2 and spread is not None
    calls.clear()
    timings, spread = bench_speed.time_twice(lambda: calls.append("step"), warmup=1, reps=2, device="cpu",
                                             room_s=lambda: 0.0)
    assert calls == ["step", "reset", "step", "step"] and len(timings) == 1 and spread is None
    eager = [v for v in bench_speed.TRAIN_B8 if v.recompute and not v.compile]
    assert {v.amp for v in eager} == {torch.bfloat16, None} and all(v.fast for v in eager)


def test_a_ratio_within_the_timing_spread_is_called_noise():
    """A speed-up whose distance from 1 is within the larger of the two rows' timing spreads reads as noise; one
    outside it, or between rows timed once, reads as a plain ratio."""
    rows = {("c", "base"): Row("c", "base", ms=100.0),
            ("c", "close"): Row("c", "close", ms=97.0, spread=0.04, baselines=["base"]),
            ("c", "far"): Row("c", "far", ms=50.0, spread=0.04, baselines=["base"]),
            ("c", "once"): Row("c", "once", ms=99.0, baselines=["base"])}
    assert bench_speed.ratio_note(rows[("c", "close")], rows, "base") == \
        "x1.03 vs base (within the timing spread 4%: noise)"
    assert bench_speed.ratio_note(rows[("c", "far")], rows, "base") == "x2.00 vs base"
    assert bench_speed.ratio_note(rows[("c", "once")], rows, "base") == "x1.01 vs base"


def test_accuracy_runs_without_autotuning_and_main_restores_the_settings(monkeypatch):
    """The accuracy rows run with TF32 off and cuDNN's heuristic choice among deterministic algorithms (no
    autotuning), and say so; the timed rows around them keep trainer.py's settings (TF32, autotuning). bench_speed
    .main, called in this process, leaves the settings as it found them, set the way trainer.py sets them
    (torch.set_float32_matmul_precision), and the precision can still be read: no mix of PyTorch's two APIs."""
    cudnn = torch.backends.cudnn
    monkeypatch.setattr(cudnn, "benchmark", False)  # monkeypatch restores them for the tests after this one
    monkeypatch.setattr(cudnn, "deterministic", False)
    monkeypatch.setattr(cudnn, "allow_tf32", False)
    before = torch.get_float32_matmul_precision()
    seen = []
    real = bench_speed.rel_err

    def recording(out, ref):
        seen.append((torch.get_float32_matmul_precision(), cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic))
        return real(out, ref)

    monkeypatch.setattr(bench_speed, "rel_err", recording)
    torch.set_float32_matmul_precision("medium")
    try:
        monkeypatch.setattr(bench_speed, "TRAIN_B8", [v for v in bench_speed.TRAIN_B8 if v.name == PLAIN_FP32])
        text = bench_speed.main(["--smoke", "--quick", "--cases", "gpu-accuracy,gpu-train-b8"])
        after = (torch.get_float32_matmul_precision(), cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic)
    finally:
        torch.set_float32_matmul_precision(before)
    assert after == ("medium", False, False, False)
    accuracy, timed = seen[:len(bench_speed.ACCURACY)], seen[len(bench_speed.ACCURACY):]
    assert set(accuracy) == {("highest", False, False, True)}
    assert timed and set(timed) == {("high", True, True, False)}
    assert "the CPU's kernels (no cuDNN)" in text
    with bench_speed.gpu_settings(tf32=False, autotune=False, deterministic=True):
        assert bench_speed.settings_text() == ("float32 matmul precision highest, cuDNN TF32 off, autotuning off, "
                                               "deterministic algorithms")


def test_stopping_a_step_ends_processes_in_sessions_of_their_own(tmp_path):
    """A step stopped at its share ends its whole tree, also a process that started a session of its own (as
    torchrun's workers do), which a signal to the step's process group alone would miss."""
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen(['sleep', '120'], start_new_session=True)\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(120)\n")
    log = tmp_path / "log.txt"
    code, seconds, text = gpu_check.run_logged([sys.executable, "-S", "-c", script], log, timeout=4)
    pid = int(text.split()[0])
    assert code is None and "[stopped after 4 s" in text
    assert not gpu_check._alive(pid)
    assert not gpu_check.descendants(os.getpid()) & {pid}


EXPECTED_FILES = {"check.md", "check_rows.jsonl", "check_environment.txt", "check_cuda_tests.log",
                  "check_torchrun.log", "check_compiled.log", "check_console.log"}


def gpu_check_smoke(out, *extra):
    """`bash benchmarks/gpu_check.sh --smoke` with this test's interpreter (PYTHON), its results in ``out``."""
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1000)


@pytest.fixture(scope="module")
def smoke_check(tmp_path_factory):
    """One smoke run of the GPU check for this module's tests: (its output folder, its console)."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    proc = gpu_check_smoke(out, "--budget", "900")  # a check of the code: room for a machine busy with other jobs
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_gpu_check_smoke_run_writes_every_file_and_row(smoke_check):
    """`bash benchmarks/gpu_check.sh --smoke` runs every step of the GPU check on the CPU, under the interpreter it
    is given ($PYTHON), and writes at most 8 files with plain names; every expected row is there, measured where
    the CPU can run it (ceilings first, torchrun with gloo) and 'skipped: needs CUDA' where it cannot; timed rows
    say how often they were timed and what fraction of the measured ceilings they use; the CUDA tests put the trainer's
    first and leave those that compile to the compiled step; the resume keeps --num_workers 0; the targets head
    the table."""
    out, console = smoke_check
    files = {p.name for p in out.iterdir()}
    assert files == EXPECTED_FILES and all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    rows = latest(load_rows(out / "check_rows.jsonl"))

    def variants(case, status=OK):
        return {v for (c, v), row in rows.items() if c == case and row.status == status}

    assert {"card", "driver", "CUDA", "cuDNN", "PyTorch", "Python"} <= variants("environment")
    assert sys.executable in rows[("environment", "Python")].notes
    assert list(rows)[len(variants("environment"))][0] == "ceilings"  # measured first, right after the environment
    assert variants("ceilings") == {bench_speed.CEILING_MATMUL, bench_speed.CEILING_COPY}
    assert variants("train b8 16x16") == {v.name for v in bench_speed.TRAIN_B8}
    assert variants("train b2 16x16 accum 4") == {v.name for v in bench_speed.TRAIN_RECIPE}
    assert variants("inference.py 4 x 16x16, TTA 8") == {name for name, _, _ in bench_speed.INFER_VARIANTS}
    assert variants("accuracy b2 16x16") == {name for name, _, _ in bench_speed.ACCURACY}
    timed = [row for (c, _), row in rows.items() if c.startswith(("train", "inference")) and row.status == OK]
    assert all("timed once (a smoke run times once)" in row.notes and "of measured bf16 matrix rate" in row.notes
               for row in timed)
    assert all(row.error <= (1e-5 if "fp32" in v else 1e-2) for (c, v), row in rows.items()
               if c.startswith(("acc", "inference")) and row.status == OK)  # inference.py's too, end to end
    assert variants("torchrun, 1 process (gloo)") == {"train 2 epochs", "resume to 3 epochs",
                                                      "inference.py on the run's best.pth"}
    assert variants("separate process") == {"compiled blocks, CUDA graph, compiled inference"}
    cuda_only = [row for row in rows.values() if row.status == SKIPPED]
    cuda_tests, compile_tests = (gpu_check.pytest_variant(s) for s in (gpu_check.CUDA_TESTS, gpu_check.COMPILE_TESTS))
    assert {row.variant for row in cuda_only} >= (
        {v.name for v in bench_speed.COMPILED_TRAIN_B8 + bench_speed.GRAPH_TRAIN_B8}
        | {name for name, _, _ in bench_speed.COMPILED_INFER_VARIANTS} | {cuda_tests, compile_tests})
    assert all(row.notes.startswith("skipped: needs CUDA") for row in cuda_only)
    assert ", first tests/test_trainer.py::" in rows[("CUDA-only tests", cuda_tests)].notes
    assert list(rows)[-1] == ("CUDA-only tests", compile_tests)  # the compiled step's, last
    assert not [row for row in rows.values() if row.status in (FAILED, PENDING, RUNNING)]

    text = (out / "check.md").read_text()
    targets = [r for r in table_rows(text) if r[0] == "| target"]
    assert len(targets) == len(bench_speed.TARGETS) == len(table_rows(text)) - len(rows)
    assert [r[-1] for r in targets[:4]] == ["unmeasured (smoke run) |"] * 4 and targets[4][-1] == "met |"
    assert "gloo (smoke run)" in text and "NCCL" in (out / "check_environment.txt").read_text()
    launches = [line for line in (out / "check_torchrun.log").read_text().splitlines() if line.startswith("$ ")]
    assert len([line for line in launches if "torch.distributed.run" in line]) == 2
    assert all("--num_workers 0" in line for line in launches if "torch.distributed.run" in line)
    assert "packages: torch" in console and f"(python: {sys.executable};" in console


def test_gpu_check_rest_keeps_every_finished_row(smoke_check, tmp_path):
    """A second call with --rest ROWS keeps every finished row of the first and runs nothing of it again."""
    out, _ = smoke_check
    again = tmp_path / "again"
    proc = gpu_check_smoke(again, "--rest", str(out / "check_rows.jsonl"), "--budget", "200")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = latest(load_rows(out / "check_rows.jsonl"))
    second = latest(load_rows(again / "check_rows.jsonl"))
    for key, row in rows.items():
        if key[0] not in ("environment", "separate process"):
            assert second[key] == row, key
    assert not (again / "check_torchrun.log").exists()  # nothing of that step ran again
    assert "stopped after 230 s at the latest" in proc.stdout  # gpu_check.sh's limit follows --budget


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_on_cuda_leaves_out_the_warm_up():
    """On CUDA, memory that only the warm-up took (a 1 GiB block, freed, as an autotuning workspace is) is not in
    the peak the timed steps report."""
    first = [True]

    def step():
        if first[0]:
            first[0] = False
            torch.empty(2**30, dtype=torch.uint8, device="cuda").fill_(1)
        torch.ones(1024, device="cuda").sum()

    bench_speed.free_memory("cuda")
    bench_speed.time_twice(step, warmup=1, reps=2, device="cuda")
    assert bench_speed.peak_memory("cuda") - torch.cuda.memory_allocated() < 2**29


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_compiled_variant_on_cuda(tmp_path):
    """On CUDA, bench_speed's compiled training variant (tiny preset, small images) is measured, not failed, and
    stays within the bf16 bound of float64."""
    bench_speed.main(["--tiny", "--quick", "--cases", "gpu-compiled-train", "--out", str(tmp_path / "b.md")])
    row = latest(load_rows(tmp_path / "b_rows.jsonl"))[("train b8 16x16", "fast bf16 compiled")]
    assert row.status == OK, row.notes
    assert row.ms > 0 and row.error <= 1e-2
