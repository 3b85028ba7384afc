"""Every script's --help runs and describes the options a user needs: each script run as a user runs it
(``python SCRIPT --help``, as ``__main__``), all in this one interpreter."""
import runpy
import sys

import pytest

from conftest import ROOT

SCRIPTS = {
    "trainer.py": ["--data_dir", "--batch_size", "--accum_steps", "--warmup_epochs", "--fp16", "--bf16", "--resume",
                   "--loss", "--save_dir", "--preset", "--plain", "--compile", "--precision", "--progressive",
                   "--ema", "--ema_no_warmup", "--keep_last"],
    "first_stage_ft.py": ["--checkpoint", "--data_dir", "--lr"],
    "second_stage_ft.py": ["--checkpoint", "--trainable"],
    "inference.py": ["--checkpoint", "--input_folder", "--output_npz", "--tta", "--gt_folder", "--tile", "--bf16",
                     "--plain", "--no_ema", "--precision", "--ensemble_memory"],
    "vis.py": ["--pred_npz", "--input_folder", "--gt_folder", "--out_dir", "--names", "--num", "--seed"],
    "utils.py": ["run_dir"],
    "synthetic.py": ["--out", "--clean_dir", "--size"],
    "demo.py": ["--out", "--epochs"],
    "benchmarks/bench_loader.py": [],
    "benchmarks/bench_speed.py": ["--gpu", "--cases", "--out"],
    "benchmarks/gpu_check.py": ["--out", "--smoke", "--rest", "--budget"],
    "avg_checkpoints.py": ["--run", "--last", "--out", "--no_ema"],
    "benchmarks/bench_recipe.py": ["--seeds", "--out", "--smoke"],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_runs_and_names_the_options(script, capsys, monkeypatch):
    """`python SCRIPT --help` exits 0 and mentions each of its main options."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    out, err = capsys.readouterr()
    assert stop.value.code in (0, None), err
    for option in SCRIPTS[script]:
        assert option in out, f"{script} --help does not mention {option}"
