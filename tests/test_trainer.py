"""trainer.py and the fine-tuning scripts: command line, exact accumulation and resume, stopping on a signal,
skipping non-finite steps, fine-tuning stages, and that training on real rain learns."""
import math
import multiprocessing
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import first_stage_ft
import second_stage_ft
import scoring
import trainer
import utils
from conftest import assert_same_state, parse, tiny, weights
from conftest import make_homework_set  # noqa: F401  (test_speed_path imports it from here until it switches)
from dataloader import find_pairs, read_image, stratified_split
from GFL_Loss import CharbonnierLoss
from model import SECOND_STAGE, STAGE2_MODULES
from run import StopRequest, read_log

README_COMMANDS = [
    "python trainer.py --data_dir datasets --batch_size 2 --accum_steps 4 --epochs 250 --lr 2e-4 --fp16 --warmup 10  "
    "--loss gfl --save_dir gfl_ckpt --num_workers 4",
    "python first_stage_ft.py --data_dir datasets --batch_size 2 --accum_steps 4 --epochs 100 --lr 1.5e-4 --fp16 "
    "--warmup 5  --loss gfl --save_dir gfl_ft_first --num_workers 4 --checkpoint best.pth",
    "python second_stage_ft.py --data_dir datasets --batch_size 2 --accum_steps 4 --epochs 100 --lr 1.5e-4 --fp16 "
    "--warmup 5  --loss gfl --save_dir gfl_ft_second --num_workers 4 --checkpoint best.pth",
]
PARSERS = {"trainer.py": trainer.build_parser, "first_stage_ft.py": first_stage_ft.build_parser,
           "second_stage_ft.py": second_stage_ft.build_parser}


# --------------------------------------------------------------------------------------------- command line
@pytest.mark.parametrize("command", README_COMMANDS, ids=["trainer", "first_stage", "second_stage"])
def test_the_original_readme_commands_parse_as_written(command):
    """The original README's commands parse unchanged (--warmup spells --warmup_epochs) with their values."""
    words = shlex.split(command)
    args = PARSERS[words[1]]().parse_args(words[2:])
    assert (args.batch_size, args.accum_steps, args.num_workers, args.fp16, args.loss) == (2, 4, 4, True, "gfl")
    assert args.data_dir == "datasets" and not args.bf16
    if words[1] == "trainer.py":
        assert (args.epochs, args.lr, args.warmup_epochs, args.save_dir) == (250, 2e-4, 10, "gfl_ckpt")
        assert args.augment == "strong" and args.trainable is None
    else:
        assert (args.epochs, args.lr, args.warmup_epochs, args.checkpoint) == (100, 1.5e-4, 5, "best.pth")
        assert args.augment == "views"
    if words[1] == "second_stage_ft.py":
        assert args.trainable == [SECOND_STAGE]


def test_defaults_are_the_original_recipe():
    """Without options every script uses the original's defaults (and ours: seed 42, clip 1.0, 320 per type)."""
    base = trainer.build_parser().parse_args(["--data_dir", "d"])
    assert (base.lr, base.epochs, base.warmup_epochs, base.loss, base.batch_size, base.accum_steps) == \
        (2e-4, 250, 10, "gfl", 2, 4)
    assert (base.seed, base.grad_clip, base.val_per_type, base.ema, base.fp16, base.bf16) == \
        (42, 1.0, 320, None, False, False)
    ft = first_stage_ft.build_parser().parse_args(["--data_dir", "d", "--checkpoint", "c"])
    assert (ft.lr, ft.epochs, ft.warmup_epochs, ft.loss, ft.augment, ft.trainable) == \
        (1.5e-4, 100, 5, "gfl", "views", None)


def test_contradicting_or_missing_options_fail_before_any_work(data, tmp_path, trained):
    """Each bad combination raises a UserError (exit 2: ConfigError, or CheckpointError for a checkpoint path)
    saying what to do, and nothing is written."""
    run = tmp_path / "run"
    cases = [
        (("--fp16", "--bf16"), "pick one"),
        (("--resume", tmp_path / "nope.pth"), "does not exist"),
        (("--warmup", 5, "--epochs", 5), "must be smaller than --epochs"),
        (("--accum_steps", 0), "--accum_steps must be at least 1"),
        (("--fp16",), "needs a CUDA device"),
        (("--ema", 1.5), "decay between 0 and 1"),
        (("--aug_rates", 0.5, 0.5, 0.5), "sum to at most 1"),
        (("--save_dir", trained), "already holds a run"),
    ]
    for extra, message in cases:
        with pytest.raises(utils.UserError, match=message):
            trainer.check_args(tiny(data, run, *extra))
    with pytest.raises(utils.UserError, match="--data_dir .* is not a folder"):
        trainer.check_args(tiny(tmp_path / "missing", run))
    with pytest.raises(utils.UserError, match="pass --checkpoint"):
        trainer.check_args(tiny(data, run, script=first_stage_ft))
    with pytest.raises(utils.UserError, match="--checkpoint .* does not exist"):
        trainer.check_args(tiny(data, run, "--checkpoint", tmp_path / "x.pth", script=second_stage_ft))
    with pytest.raises(utils.UserError, match="preset 'tiny', not --preset small"):
        trainer.Trainer(tiny(data, run, "--resume", trained, "--preset", "small"))
    with pytest.raises(utils.UserError, match="already completed 2 of --epochs 2"):
        trainer.Trainer(tiny(data, tmp_path / "run2", "--resume", trained))
    with pytest.raises(utils.UserError, match="unknown module name"):
        trainer.Trainer(tiny(data, run, "--checkpoint", trained / "last.pth", "--trainable", "nope",
                             script=second_stage_ft))
    assert not run.exists()


def test_main_reports_errors_without_a_traceback(data, tmp_path, capsys):
    """On the command line a bad option ends with exit status 2 and a one-line error on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(["--data_dir", str(data), "--fp16", "--bf16", "--save_dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert "error: --fp16 and --bf16 exclude each other" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ loop
def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    """lr_at: (s+1)/warmup during warm-up, 1 at its end, half-way down the cosine at mid-decay, min at the end."""
    f = lambda s: trainer.lr_at(s, peak_lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.01)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.505) and f(14) == pytest.approx(0.01)
    assert f(100) == pytest.approx(0.01)


def test_accumulation_equals_one_big_batch_even_for_an_uneven_group(data, tmp_path):
    """The gradient an update hands the optimizer (accumulated, clipped) from micro-batches of 2 and 1 images equals
    the one from the 3 images in one batch (relative 1e-4, absolute 1e-7)."""
    t = trainer.Trainer(tiny(data, tmp_path / "r", "--augment", "views", "--loss", "charbonnier"))
    first, second = iter(t.train_loader), iter(t.train_loader)
    batch, extra = next(first), next(second)
    lq, gt = torch.cat([batch["lq"], extra["lq"][:1]]), torch.cat([batch["gt"], extra["gt"][:1]])
    handed = []
    t.optimizer.step = lambda: handed.append([p.grad.clone() for p in t.update.params])  # weights stay as they are
    t.update([{"lq": lq[:2], "gt": gt[:2]}, {"lq": lq[2:], "gt": gt[2:]}], epoch=0)
    t.update([{"lq": lq, "gt": gt}], epoch=0)
    split, whole = handed
    assert sum(bool(g.abs().max() > 0) for g in whole) > 0.9 * len(whole)
    for a, b in zip(split, whole):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_two_epochs_then_resume_equals_four_straight(data, tmp_path):
    """4 epochs in one go and 2 + resume 2 (strong augmentation, EMA, GFL, random crops) give bit-identical weights,
    EMA, optimizer state and log (torch.equal)."""
    extra = ("--epochs", 4, "--warmup_epochs", 1, "--ema", 0.9)
    straight = trainer.train(tiny(data, tmp_path / "a", *extra))
    half = trainer.Trainer(tiny(data, tmp_path / "b", *extra)).fit(until_epoch=2)
    assert (half.epoch, half.step) == (2, straight.step // 2)
    resumed = trainer.train(tiny(data, None, *extra, "--resume", tmp_path / "b"))
    assert resumed.run_dir == tmp_path / "b" and (resumed.epoch, resumed.step) == (4, straight.step)
    a, b = utils.load_checkpoint(tmp_path / "a" / "last.pth"), utils.load_checkpoint(tmp_path / "b" / "last.pth")
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["ema"], b["ema"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["step"] == b["step"] == straight.step
    untimed = lambda run: [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")}  # noqa: E731
                           for r in read_log(run)]
    assert untimed(tmp_path / "a") == untimed(tmp_path / "b")
    assert straight.step == 4 * math.ceil(5 / 2)  # 5 batches per epoch, the last update from one batch
    assert read_log(tmp_path / "a")[-1]["lr"] == pytest.approx(trainer.MIN_LR)


def test_resume_takes_the_options_recorded_in_the_checkpoint(tmp_path, trained):
    """parse_args with --resume: the checkpoint's options become the defaults (loss, ema, epochs, lr, batch_size,
    trainable, ...), options typed now override them (a larger --epochs), and per-invocation ones (save_dir,
    device, num_workers, ...) are not carried over."""
    saved = {"loss": "charbonnier", "ema": 0.9, "epochs": 3, "warmup_epochs": 1, "lr": 1e-3, "batch_size": 8,
             "accum_steps": 1, "bf16": True, "patch_size": 16, "augment": "views", "trainable": ["refinement"],
             "save_dir": "elsewhere", "device": "cuda:3", "num_workers": 9, "compile": True, "data_dir": "old",
             "resume": "old/last.pth", "fine_tune": True, "not_an_option": 1}
    utils.save_checkpoint(tmp_path / "last.pth", {**utils.load_checkpoint(trained / "last.pth"), "args": saved})
    args = trainer.parse_args(trainer.build_parser(), ["--data_dir", "d", "--resume", str(tmp_path), "--epochs", "5"])
    assert (args.loss, args.ema, args.epochs, args.warmup_epochs, args.lr, args.batch_size, args.accum_steps) == \
        ("charbonnier", 0.9, 5, 1, 1e-3, 8, 1)
    assert (args.bf16, args.patch_size, args.augment, args.trainable) == (True, 16, "views", ["refinement"])
    assert (args.save_dir, args.device, args.num_workers, args.compile, args.data_dir) == (None, None, 4, False, "d")
    assert args.resume == str(tmp_path / "last.pth") and not args.fine_tune and not hasattr(args, "not_an_option")
    fresh = trainer.parse_args(trainer.build_parser(), ["--data_dir", "d"])
    assert (fresh.loss, fresh.ema, fresh.epochs) == ("gfl", None, 250)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers, as by default
def test_the_readme_resume_command_continues_the_run_as_it_was_started(data, tmp_path, monkeypatch):
    """A charbonnier + EMA run of 3 epochs stopped after 2 and resumed through trainer.main with only --data_dir
    and --resume (the README's command) uses CharbonnierLoss and EMA again and ends with the weights and EMA of
    the same run done straight (torch.equal); the resumed checkpoint is read once, and the data loader's worker
    processes end with the run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the resumed run picks its default device
    extra = ("--loss", "charbonnier", "--ema", 0.9, "--epochs", 3)
    trainer.train(tiny(data, tmp_path / "a", *extra))
    trainer.Trainer(tiny(data, tmp_path / "b", *extra)).fit(until_epoch=2)
    made = []

    class Recording(trainer.Trainer):
        def __init__(self, args, processes=None, **kwargs):
            super().__init__(args, processes, **kwargs)
            made.append(self)

    reads, load = [], utils.load_checkpoint
    monkeypatch.setattr(utils, "load_checkpoint", lambda path, **kw: reads.append(Path(path)) or load(path, **kw))
    monkeypatch.setattr(trainer, "Trainer", Recording)
    trainer.main(["--data_dir", str(data), "--resume", str(tmp_path / "b")])
    assert not multiprocessing.active_children()  # its 4 loader workers ended with the run, not at a later collection
    assert reads == [tmp_path / "b" / "last.pth"]
    (resumed,) = made
    assert isinstance(resumed.loss_fn, CharbonnierLoss) and resumed.ema is not None and resumed.ema.decay == 0.9
    assert (resumed.state.epoch, resumed.args.epochs) == (3, 3)
    a, b = utils.load_checkpoint(tmp_path / "a" / "last.pth"), utils.load_checkpoint(tmp_path / "b" / "last.pth")
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["ema"], b["ema"])


def test_checkpoints_keep_one_random_state_per_process(data, tmp_path):
    """The checkpoint's "rng" is a list indexed by rank that loads with weights_only=True; restoring rank 1's entry
    reproduces rank 1's random draws, not rank 0's, and a rank the checkpoint holds no state for keeps its seed."""
    t = trainer.Trainer(tiny(data, tmp_path / "r"))
    t._save({"last.pth"})
    checkpoint = torch.load(tmp_path / "r" / "last.pth", weights_only=True)
    assert isinstance(checkpoint["rng"], list) and len(checkpoint["rng"]) == 1
    utils.seed_everything(1)
    rank0 = utils.get_rng_state()
    utils.seed_everything(2)
    rank1 = utils.get_rng_state()
    expected = torch.rand(4)
    utils.seed_everything(1)
    t.state.load_state_dict({**checkpoint, "rng": [rank0, rank1]}, rank=1)
    assert torch.equal(torch.rand(4), expected)
    utils.seed_everything(3)
    expected = torch.rand(4)
    utils.seed_everything(3)
    t.state.load_state_dict({**checkpoint, "rng": [rank0]}, rank=1)
    assert torch.equal(torch.rand(4), expected)


def test_only_a_failed_batch_fetch_counts_as_a_stop(data, tmp_path, monkeypatch):
    """With a stop signal pending, an error inside an update is raised (not turned into a stop that saves
    last.pth), while a data loader that fails between updates (killed workers) stops the run and saves the
    step it reached."""
    t = trainer.Trainer(tiny(data, tmp_path / "r", "--epochs", 2))

    def failing_update(group, stop):
        stop.signum = signal.SIGTERM
        raise RuntimeError("broken update")

    monkeypatch.setattr(t, "_take_step", failing_update)
    with pytest.raises(RuntimeError, match="broken update"):
        t.fit()
    assert not (tmp_path / "r" / "last.pth").exists()

    t = trainer.Trainer(tiny(data, tmp_path / "s", "--epochs", 2))
    original, groups, pending = t._take_step, trainer._micro_batch_groups, []

    def update_then_signal(group, stop):
        result = original(group, stop)
        pending.append(stop)
        return result

    def batches(loader, size):
        for i, group in enumerate(groups(loader, size)):
            if i == 1:
                pending[0].signum = signal.SIGTERM
                raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated")
            yield group

    monkeypatch.setattr(t, "_take_step", update_then_signal)
    monkeypatch.setattr(trainer, "_micro_batch_groups", batches)
    result = t.fit()
    assert (result.signal, result.step) == (signal.SIGTERM, 1)
    assert utils.load_checkpoint(tmp_path / "s" / "last.pth")["step"] == 1


def test_a_forwarded_repeat_of_the_signal_still_saves_but_a_later_second_one_quits(monkeypatch):
    """A second signal within StopRequest.REPEAT_S of the first (torchrun forwarding the one the process group got)
    is the same stop request; one that comes later (a user pressing Ctrl-C again) quits at once; on leaving, the
    handlers found are back. The test installs Python's own SIGINT handler first, so it proves the same whatever
    handler the suite was started with (an ignored SIGINT stays ignored: test_run.py)."""
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    found = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT
            now[0] += 0.05
            os.kill(os.getpid(), signal.SIGINT)  # the forwarded copy: no exception
            assert stop.signum == signal.SIGINT
            now[0] += 2.0
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler found is restored
    finally:
        signal.signal(signal.SIGINT, found)


def _sigterm_args(data, run):
    return ["--data_dir", data, "--save_dir", run, "--preset", "tiny", "--device", "cpu", "--num_workers", 0,
            "--batch_size", 1, "--accum_steps", 1, "--epochs", 1, "--warmup_epochs", 0, "--patch_size", 16,
            "--val_per_type", 0, "--augment", "strong", "--no_curves"]


def test_sigterm_mid_epoch_saves_a_resumable_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    """A real SIGTERM to this process during the third update of a 12-update epoch (trainer.main, as the command
    line runs it): the run finishes the update in flight, writes last.pth at update 4 and exits 143; resuming then
    ends with exactly the weights of an uninterrupted run. SIGTERM's default handler is installed first, so the test
    proves the same whatever handler the suite was started with."""
    run = tmp_path / "run"
    original = trainer.Trainer._take_step

    def update_then_signal(self, group, stop):
        result = original(self, group, stop)
        if self.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    found = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(trainer.Trainer, "_take_step", update_then_signal)
            with pytest.raises(SystemExit) as exit_info:
                trainer.main([str(a) for a in _sigterm_args(data, run)])
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler found is back
    finally:
        signal.signal(signal.SIGTERM, found)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert "SIGTERM: stopping after this optimizer update" in capsys.readouterr().err
    saved = utils.load_checkpoint(run / "last.pth")
    assert (saved["epoch"], saved["step"]) == (0, 4)
    resumed = trainer.train(parse(*_sigterm_args(data, run), "--resume", run))
    straight = trainer.train(parse(*_sigterm_args(data, tmp_path / "straight")))
    assert resumed.step == straight.step == 12
    assert_same_state(weights(run / "last.pth"), weights(tmp_path / "straight" / "last.pth"))
    # the epoch's log record covers the whole epoch, the updates before the stop included
    (a,), (b,) = read_log(run), read_log(tmp_path / "straight")
    assert (a["train_loss"], a["skipped_steps"]) == (b["train_loss"], b["skipped_steps"])
    assert a["time_s"] > 0 and a["images_per_s"] > 0


class _NaNOn:
    """A Charbonnier loss that returns NaN on the given (0-based) calls."""

    def __init__(self, calls):
        self.calls, self.count, self.inner = calls, -1, CharbonnierLoss()

    def __call__(self, pred, target, epoch=None):
        self.count += 1
        loss = self.inner(pred, target, epoch)
        return loss * float("nan") if self.count in self.calls or "all" in self.calls else loss


def test_non_finite_steps_are_skipped_and_a_run_of_them_stops_training(data, tmp_path, monkeypatch):
    """A NaN loss skips that update (logged as skipped_steps, weights stay finite); max_bad_steps NaN updates in a
    row stop the run with TrainingError, leaving the last good last.pth untouched."""
    monkeypatch.setattr(trainer, "build_loss", lambda name, num_epochs=None: _NaNOn({1}))
    result = trainer.train(tiny(data, tmp_path / "skip"))
    log = read_log(tmp_path / "skip")
    assert [r["skipped_steps"] for r in log] == [1, 0] and result.step == 6
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "skip" / "last.pth").values())

    monkeypatch.setattr(trainer, "build_loss", lambda name, num_epochs=None: _NaNOn({"all"}))
    with pytest.raises(trainer.TrainingError, match="3 updates in a row"):
        trainer.train(tiny(data, tmp_path / "nan", "--max_bad_steps", 3))
    assert not (tmp_path / "nan" / "last.pth").exists()


def test_a_run_of_non_finite_steps_counts_across_epochs_and_resumes(data, tmp_path, monkeypatch):
    """The bad-step run is not reset by a new epoch (3 updates per epoch here) nor by a resume: the last update of
    epoch 1 and the first of epoch 2 make 2 in a row, with or without a resume between them."""
    nan_on = {}
    monkeypatch.setattr(trainer, "build_loss", lambda name, num_epochs=None: _NaNOn(nan_on["calls"]))
    nan_on["calls"] = {4, 5, 6, 7}  # two loss calls per update: updates 3 and 4
    with pytest.raises(trainer.TrainingError, match="2 updates in a row .*epoch 2, update 4"):
        trainer.train(tiny(data, tmp_path / "a", "--max_bad_steps", 2))

    nan_on["calls"] = {4, 5}
    trainer.Trainer(tiny(data, tmp_path / "b", "--max_bad_steps", 2)).fit(until_epoch=1)
    assert utils.load_checkpoint(tmp_path / "b" / "last.pth")["bad_run"] == 1
    nan_on["calls"] = {0, 1}  # the resumed process's first update
    with pytest.raises(trainer.TrainingError, match="2 updates in a row .*epoch 2, update 4"):
        trainer.train(tiny(data, None, "--max_bad_steps", 2, "--resume", tmp_path / "b"))


def test_resume_with_a_new_learning_rate_and_weight_decay_uses_them(data, tmp_path):
    """--lr and --weight_decay typed again on --resume reach the optimizer and the schedule (and the log); without
    them the saved values hold (the exact-resume tests)."""
    trainer.train(tiny(data, tmp_path / "r", "--lr", 2e-4, "--epochs", 2))
    argv = ["--data_dir", data, "--resume", tmp_path / "r", "--num_workers", 0, "--epochs", 4, "--lr", 1e-3,
            "--weight_decay", 0.5]
    resumed = trainer.Trainer(trainer.parse_args(trainer.build_parser(), [str(a) for a in argv]))
    decay, no_decay = resumed.optimizer.param_groups
    assert (resumed.schedule["peak_lr"], decay["weight_decay"], no_decay["weight_decay"]) == (1e-3, 0.5, 0.0)
    step, total = resumed.state.step, 4 * resumed.updates_per_epoch
    expected = trainer.lr_at(step, peak_lr=1e-3, warmup_steps=resumed.updates_per_epoch, total_steps=total,
                             min_lr=trainer.MIN_LR)
    assert decay["lr"] == no_decay["lr"] == pytest.approx(expected)
    resumed.fit()
    log = read_log(tmp_path / "r")
    assert log[-1]["lr"] == pytest.approx(trainer.MIN_LR)  # the new cosine ends at the floor
    assert log[2]["lr"] > 2e-4  # epoch 3 runs on the new, larger peak


def test_resume_from_weights_alone_says_to_fine_tune_instead(data, tmp_path):
    """A checkpoint that holds only weights (a plain state dict, a BasicSR file) cannot be resumed: the error says
    so when the command line is read, before any work, and names the fine-tuning command."""
    from model import build_model

    net = build_model("tiny")
    for name, content in (("plain.pth", net.state_dict()), ("basicsr.pth", {"params": net.state_dict()})):
        utils.save_checkpoint(tmp_path / name, content)
        with pytest.raises(trainer.ConfigError, match=f"holds weights, not a training run.*first_stage_ft.py "
                                                      f"--checkpoint .*{name}"):
            trainer.parse_args(trainer.build_parser(), ["--data_dir", str(data), "--resume", str(tmp_path / name)])


def test_a_format_1_training_state_is_refused_saying_its_weights_still_load(data, tmp_path, trained, capsys):
    """A last.pth of format 1 (a "scheduler" entry, no epoch layout) is not resumed: exit 2 before any work, with a
    message that says its weights still load for fine-tuning and prediction; and they do (first_stage_ft.py starts
    from it)."""
    old = utils.load_checkpoint(trained / "last.pth")
    old.update(format_version=1, scheduler={"last_epoch": old["step"]})
    del old["epoch_layout"]
    utils.save_checkpoint(tmp_path / "old" / "last.pth", old)
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(["--data_dir", str(data), "--resume", str(tmp_path / "old"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "format 1, which this trainer.py no longer resumes; its weights still " \
        "load for fine-tuning and prediction" in err
    assert f"first_stage_ft.py --checkpoint {tmp_path / 'old' / 'last.pth'}" in err
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["last.pth"]
    result = trainer.train(tiny(data, tmp_path / "ft", "--checkpoint", tmp_path / "old" / "last.pth", "--epochs", 1,
                                "--warmup_epochs", 0, script=first_stage_ft))
    assert result.epoch == 1


def test_a_checkpoint_of_a_newer_format_is_refused(data, tmp_path, trained):
    """A training state whose format_version is above FORMAT_VERSION is refused with a message naming both."""
    newer = utils.load_checkpoint(trained / "last.pth")
    newer.update(format_version=trainer.FORMAT_VERSION + 1, epoch=0, step=0)
    utils.save_checkpoint(tmp_path / "newer.pth", newer)
    with pytest.raises(utils.CheckpointError, match=f"format {trainer.FORMAT_VERSION + 1}; this trainer.py reads "
                                                    f"formats up to {trainer.FORMAT_VERSION}"):
        trainer.Trainer(tiny(data, tmp_path / "run", "--resume", tmp_path / "newer.pth"))


def test_an_optimizer_state_from_another_device_takes_this_devices_implementation():
    """An AdamW state saved on the CPU (fused None in its groups) loaded into the optimizer built for CUDA keeps
    that optimizer's fused implementation (optimizer.load_state_dict alone would bring the CPU's choice back); the
    moments and step counts are the saved ones, and it steps."""
    params = [torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(3))]
    saved_on_cpu = trainer.build_optimizer(params, lr=1e-3, weight_decay=0.1, device="cpu")
    sum((p ** 2).sum() for p in params).backward()
    saved_on_cpu.step()
    saved = saved_on_cpu.state_dict()
    assert not any(group["fused"] for group in saved["param_groups"])
    built_for_cuda = trainer.build_optimizer(params, lr=1e-3, weight_decay=0.1, device="cuda")
    assert all(group["fused"] for group in built_for_cuda.param_groups)
    trainer.load_optimizer_state(built_for_cuda, saved)
    assert all(group["fused"] for group in built_for_cuda.param_groups)
    state = built_for_cuda.state[params[0]]
    assert float(state["step"]) == 1 and torch.equal(state["exp_avg"], saved_on_cpu.state[params[0]]["exp_avg"])
    built_for_cuda.step()
    assert float(state["step"]) == 2


def test_accumulation_longer_than_an_epoch_is_reported_as_it_runs(data, tmp_path, capsys):
    """--accum_steps above the batches of an epoch: each update takes the epoch's 5 batches, and the printed
    effective batch says 10 images, not 2 x 16."""
    utils.setup_logging()  # the console set-up of the command line (trainer.main)
    trainer.train(tiny(data, tmp_path / "r", "--accum_steps", 16, "--epochs", 2))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "--accum_steps 16 is more than the 5 batches of an epoch" in text
    assert "2 images x 5 accumulation steps x 1 process(es) = 10 per update; 1 updates per epoch" in text


def test_without_validation_best_follows_last(data, tmp_path):
    """--val_per_type 0: no validation (val fields null in the log) and best.pth is written with last.pth; without
    --no_curves the run draws its curves at the end."""
    args = tiny(data, tmp_path / "r", "--val_per_type", 0, "--epochs", 1, "--warmup_epochs", 0)
    args.no_curves = False  # the default: a run draws its curves at the end
    trainer.train(args)
    assert_same_state(weights(tmp_path / "r" / "best.pth"), weights(tmp_path / "r" / "last.pth"))
    record = read_log(tmp_path / "r")[0]
    assert record["val_psnr"] is None and record["train_loss"] > 0
    assert (tmp_path / "r" / "args.json").is_file() and (tmp_path / "r" / "curves_loss.png").is_file()


def test_bf16_autocast_trains_on_the_cpu(data, tmp_path):
    """--bf16 runs under CPU autocast: float32 weights stay finite, the loss is finite, no loss scaler is saved."""
    trainer.train(tiny(data, tmp_path / "r", "--bf16", "--epochs", 1, "--warmup_epochs", 0))
    saved = utils.load_checkpoint(tmp_path / "r" / "last.pth")
    assert saved["scaler"] is None and saved["args"]["bf16"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in saved["model"].values())
    assert math.isfinite(read_log(tmp_path / "r")[0]["train_loss"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["--fp16", "--bf16"])
def test_mixed_precision_on_cuda_trains_and_resumes(data, tmp_path, precision):
    """On CUDA: fused AdamW, fp16 with a GradScaler whose state is saved (bf16 without one), and a resume that
    restores it."""
    extra = ("--device", "cuda", precision, "--epochs", 2, "--ema", 0.9)
    t = trainer.Trainer(tiny(data, tmp_path / "r", *extra))
    assert all(group["fused"] for group in t.optimizer.param_groups)
    t.fit(until_epoch=1)
    saved = utils.load_checkpoint(tmp_path / "r" / "last.pth")
    assert (saved["scaler"] is not None) == (precision == "--fp16")
    result = trainer.train(tiny(data, None, *extra, "--resume", tmp_path / "r"))
    assert result.epoch == 2
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "r" / "last.pth").values())


# ------------------------------------------------------------------------------------------------ fine-tuning
def test_first_stage_starts_from_the_checkpoint_with_a_fresh_schedule(data, tmp_path, trained):
    """Stage 1 takes the model config and weights of --checkpoint (no --preset given; a run folder stands for its
    best.pth), trains every parameter with a new optimizer (its step count starts at 0) and no strong augmentation."""
    start = weights(trained / "best.pth")
    t = trainer.Trainer(parse("--data_dir", data, "--save_dir", tmp_path / "ft1", "--checkpoint", trained,
                              "--device", "cpu", "--num_workers", 0, "--epochs", 1, "--warmup", 0, "--patch_size", 16,
                              "--val_per_type", 0, "--no_curves", script=first_stage_ft))
    assert t.args.checkpoint == str(trained / "best.pth")
    assert t.model_config == {"arch": "promptir", "preset": "tiny"} and not t.policy.strong and t.state.step == 0
    assert_same_state(t.model.state_dict(), start)
    assert sum(p.numel() for g in t.optimizer.param_groups for p in g["params"]) == \
        sum(p.numel() for p in t.model.parameters())
    result = t.fit()
    assert result.step == 2 and utils.load_checkpoint(tmp_path / "ft1" / "last.pth")["model_config"]["preset"] == "tiny"


def test_second_stage_trains_only_its_modules_and_runs_again_from_its_own_output(data, tmp_path, trained, capsys):
    """Stage 2 changes only STAGE2_MODULES (the optimizer holds only their parameters), prints the trainable table,
    and a second stage-2 run from its own best.pth works ("FT again")."""
    utils.setup_logging()  # the console set-up of the command line (trainer.main)
    start = weights(trained / "best.pth")
    second = lambda src, dst: tiny(data, dst, "--checkpoint", src, "--epochs", 1,  # noqa: E731
                                   "--warmup_epochs", 0, script=second_stage_ft)
    t = trainer.Trainer(second(trained / "best.pth", tmp_path / "ft2"))
    trainable = {id(p) for p in t.model.parameters() if p.requires_grad}
    assert {id(p) for g in t.optimizer.param_groups for p in g["params"]} == trainable
    t.fit()
    assert "reduce_noise_level1" in capsys.readouterr().err
    after = weights(tmp_path / "ft2" / "last.pth")
    for name, value in after.items():
        moved = not torch.equal(value, start[name])
        assert moved == (name.split(".")[0] in STAGE2_MODULES), name
    again = trainer.train(second(tmp_path / "ft2" / "best.pth", tmp_path / "ft2_again"))
    assert again.epoch == 1
    final = weights(tmp_path / "ft2_again" / "last.pth")
    assert any(not torch.equal(final[k], after[k]) for k in after if k.startswith("refinement"))
    assert all(torch.equal(final[k], after[k]) for k in after if k.startswith("encoder_level1"))


# ---------------------------------------------------------------------------------------------- it learns
def test_training_on_real_rain_beats_the_degraded_input(shared, tmp_path):
    """The tiny model trained for 24 updates on Rain100H (batches of 8 random 32 px crops) restores 3 held-out
    images to a PSNR (the grader's way) at least 2 dB above that of the rainy inputs."""
    root = shared("data", "rain100h")
    args = parse("--data_dir", root, "--save_dir", tmp_path / "r", "--preset", "tiny", "--device", "cpu",
                 "--num_workers", 0, "--batch_size", 8, "--accum_steps", 1, "--epochs", 2, "--warmup_epochs", 0,
                 "--patch_size", 32, "--val_per_type", 3, "--lr", 2e-3, "--loss", "charbonnier", "--augment", "views",
                 "--no_curves")
    result = trainer.train(args)
    _, val_pairs = stratified_split(find_pairs(root), val_per_type=3, seed=42)
    inputs = [scoring.psnr(read_image(p.degraded), read_image(p.clean)) for p in val_pairs]
    record = read_log(tmp_path / "r")[-1]
    assert result.step == 2 * (97 // 8)
    assert record["val_psnr"] > sum(inputs) / len(inputs) + 2.0, (record["val_psnr"], inputs)


def test_augmentation_rates_and_strengths_reach_the_policy(data, tmp_path):
    """--aug_rates and --aug_alphas set the strong-augmentation policy; the defaults are the homework's 12.5 % rates
    and the paper's strengths."""
    default = trainer.Trainer(tiny(data, tmp_path / "a"))
    assert default.policy.rates == {"cutblur": 0.125, "mixup": 0.125, "blend": 0.125}
    assert default.policy.alphas == {"cutblur": 0.7, "mixup": 1.2, "blend": 0.6}
    custom = trainer.Trainer(tiny(data, tmp_path / "b", "--aug_rates", 0.6, 0, 0.2, "--aug_alphas", 0.5, 1.0, 0.8))
    assert custom.policy.rates == {"cutblur": 0.6, "mixup": 0.0, "blend": 0.2}
    assert custom.policy.alphas == {"cutblur": 0.5, "mixup": 1.0, "blend": 0.8}
