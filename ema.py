"""Exponential moving average (EMA) of a network's weights, with a warm-up that short runs can use.

A constant decay ``d`` keeps ``d**N`` of the random initial weights after ``N`` updates: 30 % after 1,200 updates at
0.999, so a short run validates a blur of its first steps. With the warm-up (timm's ``ModelEmaV3`` rule) the decay of
update ``t`` is ``1 - (1 + t / gamma) ** -power``, capped at ``d``: it starts at 0 (the average is the weights
themselves), reaches 0.99 after about 1,000 updates (power 2/3) and ``d`` later, so the average never lags far
behind a young model and becomes the long average a long run profits from.

The decay depends only on the number of updates, so a resumed run continues the same average bit for bit.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

WARMUP_POWER = 2 / 3  # timm's choice for runs of some thousands of updates (3/4 for very long ones)
WARMUP_GAMMA = 1.0


def ema_decay(update: int, decay: float, *, warmup: bool = True, power: float = WARMUP_POWER,
              gamma: float = WARMUP_GAMMA) -> float:
    """The decay applied at optimizer update ``update`` (1 for the first): ``decay`` itself without warm-up, else
    ``min(decay, 1 - (1 + (update - 1) / gamma) ** -power)``."""
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + max(update - 1, 0) / gamma) ** -power)


class ModelEma:
    """A frozen copy of a network (``self.module``, eval mode) holding the moving average of its weights and buffers.

    Args:
        model: the network to follow; it is deep-copied.
        decay: the largest decay (weight of the old average), e.g. 0.999.
        warmup: ramp the decay up from 0 as :func:`ema_decay` says (default); False keeps ``decay`` from the start.
    """

    def __init__(self, model: nn.Module, *, decay: float, warmup: bool = True):
        if not 0 < decay < 1:
            raise ValueError(f"the EMA decay is between 0 and 1 (e.g. 0.999), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, update: int) -> float:
        return ema_decay(update, self.decay, warmup=self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module, *, update: int) -> None:
        """Move the average towards ``model`` after optimizer update number ``update`` (1 for the first)."""
        ours, theirs = list(self.module.state_dict().values()), list(model.state_dict().values())
        floats = [(a, b) for a, b in zip(ours, theirs) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - self.decay_at(update))
        for a, b in zip(ours, theirs):
            if not a.is_floating_point():
                a.copy_(b)
