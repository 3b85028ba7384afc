"""Training with several processes (torchrun, gloo on the CPU) stays in step with one process of the same global
batch, and saves each process's random state."""
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import trainer
import utils
from conftest import ROOT, make_homework_set
from run import read_log
from model import build_model

# trainer.main under torchrun, on every rank, that announces its third optimizer update (on rank 0) and holds it
# until a signal reaches the process. Format it with root=the repository folder.
SIGNAL_WRAPPER = """
import sys, time
sys.path.insert(0, {root!r})
import trainer
original = trainer.Trainer._take_step
def update(self, group, stop):
    result = original(self, group, stop)
    if self.state.step == 2:
        if self.is_primary:
            print("UPDATE 3", flush=True)
        deadline = time.monotonic() + 60
        while stop.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)
    return result
trainer.Trainer._take_step = update
trainer.main(sys.argv[1:])
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_ranks(*argv):
    """``trainer.py argv`` in the two processes torchrun would start, with the environment it gives them (RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) but without its launcher process (one Python start-up less);
    the torchrun launcher itself is tested with a signal below."""
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, "trainer.py", *map(str, argv)], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                  "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": port})
            for rank in (0, 1)]


def finish(processes, timeout=300):
    """Wait for ``processes``; their output, after asserting that each exited 0."""
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out
    return "".join(outputs)


def test_two_processes_match_one_process_of_the_same_global_batch(tmp_path):
    """2 CPU processes as torchrun starts them (1 image x 2 accumulation steps each, no_sync on the first) ends with the
    weights of one process training on 2 images x 2 steps, within 1e-6, and validates to the same PSNR."""
    data = make_homework_set(tmp_path / "data", per_kind=6, size=16, symmetric=True)
    common = [str(a) for a in ("--data_dir", data, "--preset", "tiny", "--device", "cpu", "--num_workers", 0,
                               "--epochs", 2, "--warmup_epochs", 1, "--val_per_type", 1, "--augment", "views",
                               "--lr", 1e-3, "--no_curves")]
    # 10 training pairs: updates of 4, 4 and 2 images in both runs (the last group is short).
    one = trainer.train(trainer.build_parser().parse_args(
        [*common, "--batch_size", "2", "--accum_steps", "2", "--save_dir", str(tmp_path / "one")]))
    output = finish(start_two_ranks(*common, "--batch_size", "1", "--accum_steps", "2", "--save_dir", tmp_path / "two"))
    assert "= 4 per update" in output and "2 process(es)" in output
    assert "Grad strides do not match" not in output
    a = utils.load_checkpoint(tmp_path / "one" / "last.pth")
    b = utils.load_checkpoint(tmp_path / "two" / "last.pth")
    assert one.step == a["step"] == b["step"] == 6
    assert len(b["rng"]) == 2 and not torch.equal(b["rng"][0]["torch"], b["rng"][1]["torch"])  # one per rank
    diffs = [float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"]]
    assert max(diffs) < 1e-6, max(diffs)
    utils.seed_everything(42)  # the initial weights of both runs, to show that training moved them far
    initial = build_model("tiny").state_dict()
    assert max(float((a["model"][k] - initial[k]).abs().max()) for k in initial) > 1e-3
    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["val_psnr"] for r in log_two] == pytest.approx([r["val_psnr"] for r in log_one], abs=1e-4)


def _torchrun(script, *argv, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *map(str, argv)]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def test_two_processes_stopped_by_a_signal_resume_to_the_uninterrupted_weights(tmp_path):
    """SIGTERM to torchrun's whole process group (as a scheduler or Ctrl-C sends it; torchrun then forwards another
    to each worker) in the middle of an epoch: both processes finish the update in flight, last.pth holds it with
    both ranks' random states, and resuming in two processes ends with exactly the weights of an uninterrupted run."""
    data = make_homework_set(tmp_path / "data", per_kind=6, size=16)
    common = ["--data_dir", data, "--preset", "tiny", "--device", "cpu", "--num_workers", 0, "--batch_size", 1,
              "--accum_steps", 1, "--epochs", 1, "--warmup_epochs", 0, "--val_per_type", 1, "--patch_size", 12,
              "--augment", "strong", "--lr", 1e-3, "--no_curves"]  # 5 updates per process in the epoch
    wrapper = tmp_path / "holding_trainer.py"
    wrapper.write_text(SIGNAL_WRAPPER.format(root=str(ROOT)))
    run = tmp_path / "run"
    proc = _torchrun(wrapper, *common, "--save_dir", run, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "UPDATE 3" in line:
                os.killpg(proc.pid, signal.SIGTERM)
                break
        output = "".join(seen) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "SIGTERM: stopping after this optimizer update" in output, output
    saved = utils.load_checkpoint(run / "last.pth")
    assert (saved["epoch"], saved["step"]) == (0, 4), output  # the held 3rd update, then the 4th sees the stop
    assert len(saved["rng"]) == 2

    resumed = start_two_ranks("--data_dir", data, "--resume", run)
    straight = start_two_ranks(*common, "--save_dir", tmp_path / "straight")
    finish(resumed + straight)
    a = utils.load_checkpoint(run / "last.pth")
    b = utils.load_checkpoint(tmp_path / "straight" / "last.pth")
    assert a["step"] == b["step"] == 5
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # the interrupted epoch's record sums both processes' updates from before the stop and after the resume
    losses = [[r["train_loss"] for r in read_log(folder)] for folder in (run, tmp_path / "straight")]
    assert losses[0] == losses[1] and len(losses[0]) == 1
