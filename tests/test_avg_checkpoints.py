"""Weight averaging of checkpoints (avg_checkpoints.py)."""
import pytest
import torch

import avg_checkpoints
import inference
from model import build_model
from utils import ConfigError, load_checkpoint, save_checkpoint


def trained_like(path, preset="tiny", seed=0, *, ema=False):
    """A checkpoint as trainer.py writes it (model, model_config, optionally ema), with random weights."""
    torch.manual_seed(seed)
    model = build_model(preset)
    state = {"model": model.state_dict(), "model_config": {"preset": preset}, "epoch": 1}
    if ema:
        torch.manual_seed(seed + 100)
        state["ema"] = build_model(preset).state_dict()
    save_checkpoint(path, state)
    return state


def test_average_is_the_mean_of_the_weights_the_scripts_would_load(tmp_path):
    """Every weight is the mean of the files' weights (EMA copies where held, plain with use_ema=False), and the
    result loads in inference.py's model loader as a plain weights file of the same preset."""
    states = [trained_like(tmp_path / f"{i}.pth", seed=i, ema=i == 1) for i in range(3)]
    paths = [tmp_path / f"{i}.pth" for i in range(3)]
    averaged = avg_checkpoints.average_checkpoints(paths)
    used = [states[0]["model"], states[1]["ema"], states[2]["model"]]
    for key, value in averaged["model"].items():
        expected = sum(u[key].double() for u in used) / 3
        assert value.dtype == used[0][key].dtype
        assert torch.allclose(value.double(), expected, atol=1e-7), key
    plain = avg_checkpoints.average_checkpoints(paths, use_ema=False)["model"]
    key = next(iter(plain))
    assert torch.allclose(plain[key].double(), sum(s["model"][key].double() for s in states) / 3, atol=1e-7)
    assert averaged["model_config"] == {"arch": "promptir", "preset": "tiny"}
    out = tmp_path / "avg.pth"
    save_checkpoint(out, averaged)
    model = inference.load_model(out, device="cpu", plain=True)
    assert all(torch.equal(a, averaged["model"][k]) for k, a in model.state_dict().items())


def test_checkpoints_of_other_sizes_are_refused_by_name(tmp_path):
    """A tiny and a small checkpoint cannot be averaged: a ConfigError naming the file and both sizes."""
    trained_like(tmp_path / "a.pth", "tiny")
    trained_like(tmp_path / "b.pth", "small")
    with pytest.raises(ConfigError, match=r"b\.pth is a model of another size.*small.*tiny"):
        avg_checkpoints.average_checkpoints([tmp_path / "a.pth", tmp_path / "b.pth"])
    with pytest.raises(ConfigError, match="at least two"):
        avg_checkpoints.average_checkpoints([tmp_path / "a.pth"])


def test_cli_averages_a_runs_newest_snapshots_and_never_overwrites(tmp_path, capsys):
    """--run RUN --last 2 takes snapshots/epoch_N.pth in epoch order (epoch_10 after epoch_9); --out that exists is
    refused without --overwrite, one line and exit 2."""
    run = tmp_path / "run"
    for epoch, seed in ((8, 0), (9, 1), (10, 2)):
        trained_like(run / "snapshots" / f"epoch_{epoch}.pth", seed=seed)
    assert [p.name for p in avg_checkpoints.run_snapshots(run)] == ["epoch_8.pth", "epoch_9.pth", "epoch_10.pth"]
    out = tmp_path / "avg.pth"
    avg_checkpoints.main(["--run", str(run), "--last", "2", "--out", str(out)])
    saved = load_checkpoint(out)
    assert saved["averaged_from"] == [str(run / "snapshots" / "epoch_9.pth"), str(run / "snapshots" / "epoch_10.pth")]
    direct = avg_checkpoints.average_checkpoints([run / "snapshots" / f"epoch_{epoch}.pth" for epoch in (9, 10)])
    assert all(torch.equal(saved["model"][k], v) for k, v in direct["model"].items())
    with pytest.raises(SystemExit) as exit_info:
        avg_checkpoints.main(["--run", str(run), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "exists" in err and "--overwrite" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        avg_checkpoints.main(["--run", str(tmp_path / "empty"), "--out", str(tmp_path / "x.pth")])
    assert "holds no snapshots" in capsys.readouterr().err
