"""The README's main command, `python demo.py`, end to end on the CPU: synthetic data, training, both fine-tuning
stages, 8-view TTA prediction, curves and pictures, and a restored PSNR above the degraded PSNR."""
import json
import subprocess
import sys

import numpy as np

from conftest import ROOT


def test_demo_runs_end_to_end_and_restores(tmp_path):
    """demo.py finishes, writes every artefact, and the restored test PSNR beats the degraded one for each type."""
    out = tmp_path / "demo_output"
    proc = subprocess.run([sys.executable, "demo.py", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "demo.json").read_text())
    for kind in ("rain", "snow", "overall"):
        assert result["restored"][kind] > result["degraded"][kind] + 0.5, result
    with np.load(out / "pred.npz") as pred:
        names = sorted(pred.files, key=lambda n: int(n.split(".")[0]))
        assert names == [f"{i}.png" for i in range(16)]
        assert all(pred[n].dtype == np.uint8 and pred[n].shape == (3, 64, 64) for n in names)
    for stage in ("train", "ft_first", "ft_second"):
        for name in ("args.json", "log.jsonl", "last.pth", "best.pth", "curves_loss.png", "curves_psnr.png"):
            assert (out / stage / name).is_file(), f"{stage}/{name} missing"
    assert list((out / "vis").glob("grid_*.png"))
    assert "restored" in proc.stdout and "degraded" in proc.stdout
