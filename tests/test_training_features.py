"""Training features of trainer.py: the EMA's warm-up, progressive patch training (--progressive) and weight
snapshots for averaging (--keep_last), each with exact resume."""
import argparse
import multiprocessing
import signal

import pytest
import torch

import avg_checkpoints
import inference
import trainer
import utils
from conftest import assert_same_state, make_homework_set, parse, tiny, weights
from run import read_log
from test_distributed import finish, start_two_ranks

# 10 training pairs of 24x24: phase 1 has 2 batches of 5 8-px crops (1 update with --accum_steps 2), phase 2 5
# batches of 2 16-px crops (3 updates), phase 3 10 whole images one at a time (5 updates): 1 + 3 + 3 + 5 = 12.
PROGRESSIVE = ("--epochs", 4, "--progressive", "8:5:1", "16:2:2", "whole:1:1")
EPOCH_UPDATES = [1, 3, 3, 5]


def stop_after_update(t, n):
    """Make the Trainer ``t`` stop once its update ``n`` (1-based) is done, as a SIGTERM arriving during that update
    does (last.pth is written at that step)."""
    original = t._take_step

    def take_step(group, stop):
        if t.state.step == n - 1:
            stop.signum = signal.SIGTERM
        return original(group, stop)

    t._take_step = take_step
    return t


def untimed_log(run):
    return [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in read_log(run)]


def assert_same_run(a, b):
    """The last.pth of the run folders ``a`` and ``b`` hold the same weights, EMA, optimizer state and step, and
    their logs agree but for the timings."""
    sa, sb = utils.load_checkpoint(a / "last.pth"), utils.load_checkpoint(b / "last.pth")
    assert sa["step"] == sb["step"]
    assert_same_state(sa["model"], sb["model"])
    assert_same_state(sa["ema"], sb["ema"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert untimed_log(a) == untimed_log(b)


# ---------------------------------------------------------------------------------------------------------- EMA
def test_the_ema_warms_up_from_the_weights_themselves(data, tmp_path):
    """With --ema 0.999 the first update's decay is 0: after it the EMA equals the weights exactly. With
    --ema_no_warmup it is 0.999 of the random start; and later in a run the warmed-up EMA is no longer the weights."""
    warm = stop_after_update(trainer.Trainer(tiny(data, tmp_path / "warm", "--ema", 0.999)), 1)
    initial = {k: v.clone() for k, v in warm.model.state_dict().items()}
    assert warm.fit().step == 1
    saved = utils.load_checkpoint(tmp_path / "warm" / "last.pth")
    assert_same_state(saved["ema"], saved["model"])
    assert not torch.equal(saved["model"]["output.weight"], initial["output.weight"])

    constant = stop_after_update(trainer.Trainer(tiny(data, tmp_path / "constant", "--ema", 0.999,
                                                      "--ema_no_warmup")), 1)
    constant.fit()
    saved = utils.load_checkpoint(tmp_path / "constant" / "last.pth")
    expected = 0.999 * initial["output.weight"] + 0.001 * saved["model"]["output.weight"]
    assert torch.allclose(saved["ema"]["output.weight"], expected, atol=1e-7)

    trainer.train(tiny(data, tmp_path / "long", "--ema", 0.999))
    saved = utils.load_checkpoint(tmp_path / "long" / "last.pth")
    assert saved["step"] == 6 and not torch.equal(saved["ema"]["output.weight"], saved["model"]["output.weight"])


def test_the_warmed_up_ema_resumes_bit_exactly_inside_an_epoch(data, tmp_path):
    """A run stopped after update 4 (inside epoch 2 of 3 updates each) and resumed ends with exactly the weights,
    EMA, optimizer state and log of the run done straight: the decay follows the update count, which resumes."""
    extra = ("--ema", 0.999, "--epochs", 2)
    trainer.train(tiny(data, tmp_path / "straight", *extra))
    stopped = stop_after_update(trainer.Trainer(tiny(data, tmp_path / "resumed", *extra)), 4).fit()
    assert (stopped.epoch, stopped.step, stopped.signal) == (1, 4, signal.SIGTERM)
    assert trainer.train(tiny(data, None, *extra, "--resume", tmp_path / "resumed")).step == 6
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


# -------------------------------------------------------------------------------------------------- progressive
def test_progressive_options_are_checked_before_any_work(data, tmp_path, capsys):
    """Malformed phases are refused (exit 2) saying the form, checked once where the options are checked (the same
    rule for phases read back from a checkpoint's options); phases that do not sum to --epochs, crops larger than
    the images and micro-batches larger than the data are refused naming the phase; nothing is written."""
    for bad, message in (("16:2", "a phase is PATCH:BATCH:EPOCHS"), ("big:2:1", "a phase is PATCH:BATCH:EPOCHS"),
                         ("4:2:1", "at least 8 pixels"), ("16:0:1", "at least 1"),
                         ("16:2:x", "a phase is PATCH:BATCH:EPOCHS")):
        with pytest.raises(SystemExit) as exit_info:
            trainer.main([str(a) for a in ("--data_dir", data, "--save_dir", tmp_path / "run", "--epochs", 2,
                                           "--warmup_epochs", 0, "--progressive", "whole:2:1", bad)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"--progressive {bad}: " in err and message in err, err
    run = tmp_path / "run"
    with pytest.raises(trainer.ConfigError, match=r"last 1 \+ 2 = 3 epochs, but --epochs is 4: make the phases"):
        trainer.check_args(tiny(data, run, "--epochs", 4, "--progressive", "8:2:1", "whole:2:2"))
    with pytest.raises(trainer.ConfigError, match="a phase is PATCH:BATCH:EPOCHS"):
        trainer.training_phases(argparse.Namespace(progressive=["8:2"], epochs=1))  # as a checkpoint's options
    for phase, message in (("32:2:1", r"\(32 px crops, micro-batch 2\).*smaller than --patch_size 32"),
                           ("whole:11:1", r"\(whole images, micro-batch 11\).*fewer than --batch_size 11")):
        with pytest.raises(trainer.DataError, match=r"(?s)--progressive phase 2 " + message):
            trainer.Trainer(tiny(data, run, "--epochs", 2, "--progressive", "8:2:1", phase))
    with pytest.raises(trainer.ConfigError, match="--keep_last is a number of snapshots"):
        trainer.check_args(tiny(data, run, "--keep_last", -1))
    assert not run.exists()


def test_progressive_phases_train_their_sizes_on_a_schedule_of_the_true_update_count(data, tmp_path, capsys):
    """Each phase trains on its own crops and micro-batches (the batches' shapes); the epochs' updates are 1, 3, 3
    and 5; the warm-up covers the true updates of the first 2 epochs (4) and the cosine the run's 12, so the lr of
    every update is lr_at of its step with those sizes and the run ends exactly at the floor MIN_LR. Each log
    record gives the epoch's patch and micro-batch, and every phase change is said with its effective batch."""
    utils.setup_logging()  # the console set-up of the command line (trainer.main)
    t = trainer.Trainer(tiny(data, tmp_path / "r", *PROGRESSIVE, "--warmup_epochs", 2))
    assert t.plan.epoch_updates == EPOCH_UPDATES
    assert t.schedule == {"peak_lr": 1e-3, "warmup_steps": 4, "total_steps": 12, "min_lr": trainer.MIN_LR}
    shapes, lrs, original = [], [], t._take_step

    def take_step(group, stop):
        shapes.append(tuple(group[0]["lq"].shape))
        result = original(group, stop)
        lrs.append(t.optimizer.param_groups[0]["lr"])
        return result

    t._take_step = take_step
    result = t.fit()
    assert result.step == 12
    assert shapes == [(5, 3, 8, 8)] + [(2, 3, 16, 16)] * 6 + [(1, 3, 24, 24)] * 5
    assert lrs == [trainer.lr_at(s, **t.schedule) for s in range(12)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == 1e-3 and all(a > b > trainer.MIN_LR for a, b in zip(lrs[4:], lrs[5:]))  # down to the end
    log = read_log(tmp_path / "r")
    assert [r["step"] for r in log] == [1, 4, 7, 12]
    assert [(r["patch_size"], r["batch_size"]) for r in log] == [(8, 5), (16, 2), (16, 2), (None, 1)]
    assert log[-1]["lr"] == pytest.approx(trainer.MIN_LR, rel=1e-12)
    out = capsys.readouterr()
    text = out.out + out.err
    assert ("progressive training in 3 phases (8 px crops x 5 for 1 epoch(s), 16 px crops x 2 for 2 epoch(s), "
            "whole images x 1 for 1 epoch(s)): 12 updates in all") in text
    for line in ("phase 1/3, epochs 1-1: 8 px crops; effective batch: 5 images x 2 accumulation steps x "
                 "1 process(es) = 10 per update; 1 updates per epoch",
                 "phase 2/3, epochs 2-3: 16 px crops; effective batch: 2 images x 2 accumulation steps x "
                 "1 process(es) = 4 per update; 3 updates per epoch",
                 "phase 3/3, epochs 4-4: whole images; effective batch: 1 images x 2 accumulation steps x "
                 "1 process(es) = 2 per update; 5 updates per epoch"):
        assert text.count(line) == 1, line
    assert not (tmp_path / "r" / "snapshots").exists()  # --keep_last 0 by default


def test_progressive_training_resumes_exactly_inside_a_later_phase_and_at_phase_boundaries(data, tmp_path):
    """Stopped at the boundary of phases 1 and 2 then inside phase 2, or at the boundary of phases 2 and 3 then
    inside phase 3 (whole images), each resume ends with exactly the weights, EMA, optimizer state and log of the
    run done straight; the saved steps map to the epochs of the schedule's own update counts."""
    extra = (*PROGRESSIVE, "--ema", 0.99)
    trainer.train(tiny(data, tmp_path / "straight", *extra))
    for name, boundary, inside, epoch_inside in (("early", 1, 5, 2), ("late", 3, 9, 3)):
        run = tmp_path / name
        first = trainer.Trainer(tiny(data, run, *extra)).fit(until_epoch=boundary)
        assert (first.epoch, first.step) == (boundary, sum(EPOCH_UPDATES[:boundary]))
        second = stop_after_update(trainer.Trainer(tiny(data, None, *extra, "--resume", run)), inside).fit()
        assert (second.epoch, second.step, second.signal) == (epoch_inside, inside, signal.SIGTERM)
        resumed = trainer.Trainer(tiny(data, None, *extra, "--resume", run))
        assert resumed._updates_done_in_epoch() == inside - sum(EPOCH_UPDATES[:epoch_inside])
        assert resumed.train_loader.batch_size == [5, 2, 2, 1][epoch_inside]
        assert resumed.fit().step == 12
        assert_same_run(tmp_path / "straight", run)


def test_a_resume_inside_an_epoch_that_the_new_schedule_cannot_hold_is_refused(data, tmp_path):
    """A run stopped after 2 of the 5 updates of its last phase, resumed with a last phase of 1 update per epoch
    (micro-batches of 5 whole images), is refused before any work, naming the step and the epoch's updates."""
    run = tmp_path / "r"
    stop_after_update(trainer.Trainer(tiny(data, run, *PROGRESSIVE)), 9).fit()
    with pytest.raises(trainer.ConfigError, match=r"stopped at update 9 of epoch 4, which has 1 updates here.*"
                                                  r"--progressive"):
        trainer.Trainer(tiny(data, None, "--epochs", 4, "--progressive", "8:5:1", "16:2:2", "whole:5:1",
                             "--resume", run))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_loader_workers_end_with_their_phase_and_with_the_run(data, tmp_path):
    """A phase's loader workers end when the run moves to the next phase (not at some later garbage collection), and
    every loader's workers end when fit() returns."""
    t = trainer.Trainer(tiny(data, tmp_path / "r", "--num_workers", 1, "--progressive", "16:2:1", "whole:2:1"))
    alive, release = [], t.plan.release

    def recording(index):
        release(index)
        alive.append(len(multiprocessing.active_children()))

    t.plan.release = recording
    t.fit()
    assert alive == [1]  # the validation loader's worker; the first phase's is gone, the second's not started yet
    assert not multiprocessing.active_children()


def test_progressive_phases_shard_the_data_over_two_processes(tmp_path):
    """In 2 CPU processes as torchrun starts them, every phase's loader gives each process its half of the 10 training
    pairs: phase 2 (whole images, 1 per micro-batch, 2 accumulation steps) has 3 updates per epoch, not the 5 of
    one process seeing all pairs, and the run ends at step 1 + 3."""
    data = make_homework_set(tmp_path / "data", per_kind=6, size=16)
    output = finish(start_two_ranks("--data_dir", data, "--save_dir", tmp_path / "run", "--preset", "tiny", "--device",
                                    "cpu", "--num_workers", 0, "--accum_steps", 2, "--epochs", 2, "--warmup_epochs", 1,
                                    "--val_per_type", 1, "--progressive", "8:2:1", "whole:1:1", "--no_curves"))
    assert ("phase 2/2, epochs 2-2: whole images; effective batch: 1 images x 2 accumulation steps x 2 process(es) "
            "= 4 per update; 3 updates per epoch") in output
    assert utils.load_checkpoint(tmp_path / "run" / "last.pth")["step"] == 4
    assert [(r["patch_size"], r["batch_size"]) for r in read_log(tmp_path / "run")] == [(8, 2), (None, 1)]


# ---------------------------------------------------------------------------------------------------- snapshots
def test_keep_last_leaves_the_newest_snapshots_that_load_and_average(data, tmp_path):
    """--keep_last 2 over 4 epochs leaves exactly the snapshots of epochs 3 and 4 (weights and EMA only, the last
    one those of last.pth), deletes a stale snapshot of a later epoch but no other file; inference.load_model loads
    them (their EMA weights) and avg_checkpoints averages them."""
    run = tmp_path / "r"
    extra = ("--ema", 0.9, "--keep_last", 2)
    trainer.Trainer(tiny(data, run, "--epochs", 4, *extra)).fit(until_epoch=2)  # a folder of snapshots is a run's
    utils.save_checkpoint(run / "snapshots" / "epoch_9.pth", {"model": {}})
    (run / "snapshots" / "notes.txt").write_text("mine")
    trainer.train(tiny(data, None, "--epochs", 4, *extra, "--resume", run))
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["epoch_0003.pth", "epoch_0004.pth", "notes.txt"]
    snapshots = avg_checkpoints.run_snapshots(run)
    states = [utils.load_checkpoint(p) for p in snapshots]
    assert [s["epoch"] for s in states] == [3, 4]
    assert all(set(s) == {"format_version", "model", "ema", "model_config", "epoch"} for s in states)
    last = utils.load_checkpoint(run / "last.pth")
    assert_same_state(states[1]["model"], last["model"])
    assert_same_state(states[1]["ema"], last["ema"])
    assert not torch.equal(states[0]["ema"]["output.weight"], states[1]["ema"]["output.weight"])
    for path, state in zip(snapshots, states):
        assert_same_state(inference.load_model(path).state_dict(), state["ema"])
    averaged = avg_checkpoints.average_checkpoints(snapshots)
    for key, value in averaged["model"].items():
        if value.is_floating_point():
            mean = (states[0]["ema"][key].double() + states[1]["ema"][key].double()) / 2
            assert torch.allclose(value.double(), mean, atol=1e-7), key
    assert averaged["model_config"] == {"arch": "promptir", "preset": "tiny"}
    assert [(r["patch_size"], r["batch_size"]) for r in read_log(run)] == [(16, 2)] * 4


def test_snapshots_without_an_ema_hold_the_plain_weights(data, tmp_path):
    """Without --ema a snapshot's "ema" is None and the plain weights are what load_model gives."""
    trainer.train(tiny(data, tmp_path / "r", "--epochs", 2, "--keep_last", 1))
    (snapshot,) = avg_checkpoints.run_snapshots(tmp_path / "r")
    state = utils.load_checkpoint(snapshot)
    assert snapshot.name == "epoch_0002.pth" and state["ema"] is None
    assert_same_state(inference.load_model(snapshot).state_dict(), weights(tmp_path / "r" / "last.pth"))
