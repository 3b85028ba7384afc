"""The EMA of the weights with warm-up (ema.py)."""
import math

import pytest
import torch
from torch import nn

from ema import ModelEma, ema_decay


def test_warm_up_decay_follows_the_timm_rule_and_is_capped():
    """1 - (1 + t) ** -2/3 for update t + 1, never above the decay asked for; constant without warm-up."""
    assert ema_decay(1, 0.999) == 0.0
    assert ema_decay(2, 0.999) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema_decay(1001, 0.999) == pytest.approx(1 - 1001 ** (-2 / 3))
    assert ema_decay(10**7, 0.999) == 0.999
    assert ema_decay(5, 0.999, warmup=False) == 0.999
    decays = [ema_decay(t, 0.9999) for t in range(1, 5000)]
    assert all(a <= b for a, b in zip(decays, decays[1:]))


def test_short_run_average_holds_almost_nothing_of_the_initial_weights():
    """After 1,200 updates the initial weights' share is prod(decays): 0.999**1200 (30 %) without warm-up, under
    1e-3 with it, so the EMA of a short run is not a blur of its random start."""
    share = lambda warmup: math.prod(ema_decay(t, 0.999, warmup=warmup) for t in range(1, 1201))  # noqa: E731
    assert share(False) == pytest.approx(0.999**1200) and share(False) > 0.3
    assert share(True) < 1e-3


def test_update_is_the_lerp_with_the_decay_of_that_update():
    """One update moves every float weight by (1 - decay) towards the model; the model is deep-copied, frozen."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.99)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, update=3)
    d = ema_decay(3, 0.99)
    assert torch.allclose(ema.module.weight, d * start + (1 - d) * model.weight)
    assert not ema.module.weight.requires_grad and not ema.module.training
    ema.update(model, update=1)  # decay 0 at the first update: the average is the model
    assert torch.equal(ema.module.weight, model.weight)
    with pytest.raises(ValueError, match="between 0 and 1"):
        ModelEma(model, decay=1.0)
