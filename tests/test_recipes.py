"""Tests for recipes.py and trainer.py's --recipe and --fft_weight: the bundles, typed options winning, the
fine-tuning scripts, what args.json records, the original's commands unchanged."""
import json
import shlex

import pytest

import first_stage_ft
import recipes
import second_stage_ft
import trainer
from GFL_Loss import L1Loss, WithFFT
from test_trainer import README_COMMANDS, make_homework_set

SCRIPTS = {"trainer.py": trainer, "first_stage_ft.py": first_stage_ft, "second_stage_ft.py": second_stage_ft}


def _parse(script, *argv):
    return trainer.parse_args(script.build_parser(), ["--data_dir", "d", *map(str, argv)])


@pytest.mark.parametrize("name", SCRIPTS)
def test_homework_recipe_is_the_default_and_changes_nothing(name):
    """--recipe homework is the default, and every option it sets is the script's own default: parsing with it,
    without it, and with argparse alone give the same options (apart from what the recipe records)."""
    script = SCRIPTS[name]
    plain = vars(script.build_parser().parse_args(["--data_dir", "d"]))
    for argv in ((), ("--recipe", "homework")):
        args = vars(_parse(script, *argv))
        assert args.pop("recipe") == "homework" and plain.pop("recipe", "homework") == "homework"
        assert set(args.pop("recipe_set")) == set(recipes.bundle("homework", args))
        assert args == plain


def test_official_recipe_sets_its_bundle_on_trainer():
    """--recipe official on trainer.py: 128 crops, batch 8 x 4, L1, views only, 4 x 250 epochs and 4 x 10 warm-up
    epochs, validation every 4 epochs, no frequency term; every one of them recorded in recipe_set."""
    args = _parse(trainer, "--recipe", "official")
    expected = {"batch_size": 8, "accum_steps": 4, "patch_size": 128, "loss": "l1", "augment": "views",
                "epochs": 1000, "warmup_epochs": 40, "val_interval": 4, "fft_weight": 0.0}
    assert {k: getattr(args, k) for k in expected} == expected and args.recipe_set == expected


def test_official_fft_recipe_is_official_plus_the_frequency_term():
    """--recipe official_fft sets the official bundle and --fft_weight 0.0375 (0.1 at 48-pixel crops, scaled to
    128), nothing else."""
    official, with_fft = _parse(trainer, "--recipe", "official"), _parse(trainer, "--recipe", "official_fft")
    assert with_fft.recipe_set == {**official.recipe_set, "fft_weight": 0.0375} and with_fft.fft_weight == 0.0375


@pytest.mark.parametrize("name", ["first_stage_ft.py", "second_stage_ft.py"])
def test_official_recipe_scales_the_fine_tuning_schedule(name):
    """On a fine-tuning script the official recipe scales the stage's own schedule (100 epochs, 5 warm-up) by 4 and
    keeps its learning rate and trainable modules."""
    script = SCRIPTS[name]
    args = _parse(script, "--recipe", "official", "--checkpoint", "c")
    default = _parse(script, "--checkpoint", "c")
    assert (args.epochs, args.warmup_epochs, args.patch_size, args.loss) == (400, 20, 128, "l1")
    assert (args.lr, args.trainable) == (default.lr, default.trainable)


def test_typed_options_win_over_the_recipe():
    """Options typed on the command line keep their values, under their alias (--warmup) and abbreviated
    (--patch), even when equal to the script's default (--batch_size 2); recipe_set lists only the others."""
    args = _parse(trainer, "--recipe", "official", "--warmup", "3", "--patch", "64", "--batch_size", "2",
                  "--loss", "gfl", "--fft_weight", "0.1")
    assert (args.warmup_epochs, args.patch_size, args.batch_size, args.loss, args.fft_weight) == (3, 64, 2, "gfl", 0.1)
    assert args.epochs == 1000 and args.augment == "views"
    assert set(args.recipe_set) == {"accum_steps", "augment", "epochs", "val_interval"}


@pytest.mark.parametrize("command", README_COMMANDS)
def test_original_commands_parse_as_before(command):
    """The original README's commands, typed as they are, give the same options as before --recipe existed."""
    script, *argv = shlex.split(command)[1:]
    module = SCRIPTS[script]
    args = vars(trainer.parse_args(module.build_parser(), argv))
    plain = vars(module.build_parser().parse_args(argv))
    for key in ("recipe", "recipe_set"):
        args.pop(key)
        plain.pop(key, None)
    assert args == plain


def test_unknown_recipe_and_bad_fft_weight_exit_2_before_any_work(tmp_path, capsys):
    """An unknown --recipe or a negative --fft_weight is a usage error (exit 2) that names the option; no run
    folder is made."""
    for argv in (["--recipe", "fast"], ["--fft_weight", "-0.1"]):
        with pytest.raises(SystemExit) as stop:
            trainer.main(["--data_dir", str(tmp_path), "--save_dir", str(tmp_path / "run"), *argv])
        assert stop.value.code == 2
        assert argv[0] in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_recipe_and_fft_weight_from_the_command_line_reach_the_run(tmp_path, monkeypatch):
    """trainer.main with --recipe official and --fft_weight 0.05 trains, and args.json records the recipe, what it
    set (the bundle less the typed options) and the frequency weight; the loss trained is L1 + 0.05 x FFT."""
    built = []
    trainer_init = trainer.Trainer.__init__

    def spy(self, *args, **kwargs):
        trainer_init(self, *args, **kwargs)
        built.append(self.loss_fn)

    monkeypatch.setattr(trainer.Trainer, "__init__", spy)
    data = make_homework_set(tmp_path / "data", per_kind=4, size=24)
    run = tmp_path / "run"
    trainer.main(["--data_dir", str(data), "--save_dir", str(run), "--recipe", "official", "--fft_weight", "0.05",
                  "--patch_size", "16", "--epochs", "1", "--warmup_epochs", "0", "--preset", "tiny", "--device", "cpu",
                  "--num_workers", "0", "--val_per_type", "1", "--batch_size", "2", "--accum_steps", "1"])
    saved = json.loads((run / "args.json").read_text())
    assert saved["recipe"] == "official" and saved["fft_weight"] == 0.05 and saved["loss"] == "l1"
    assert saved["recipe_set"] == {"loss": "l1", "augment": "views", "val_interval": 4}
    assert len(built) == 1 and isinstance(built[0], WithFFT) and isinstance(built[0].loss, L1Loss)
    assert built[0].weight == 0.05
