"""Shared test set-up: repository root on the path, the optional ../shared folder, one thread."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The suite's models are tiny or run once: threads gain little, and on CPUs shared with other jobs two threads
# run many times slower (float64 depthwise convolutions above all).
torch.set_num_threads(1)


def shared_path(*parts):
    """Path inside ../shared, or skip the calling test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared (fixtures and research data) ships only with the developers' checkout")
    return path


@pytest.fixture
def shared():
    return shared_path
