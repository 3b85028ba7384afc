"""Test-time Local Converter (TLC; Chu et al., ECCV 2022) for PromptIR: global statistics over local windows.

A network trained on crops computes its global statistics over a crop in training and over the whole image in
prediction. ``enable_tlc(model, window=W)`` makes both kinds of PromptIR's global statistics local at prediction time,
over windows of ``W`` image pixels (``window_for_crop``: 1.5 x the training crop, TLC's default), scaled to each
feature map's resolution (``W / 2`` at the second level, and so on):

- the transposed attention (``model.Attention``): q, k and v are computed on the whole map (their convolutions are
  local anyway); the normalisation over pixels, the channel attention and ``attn @ v`` run per window, on windows
  that tile the map with the least overlap (TLC's ``grids``), and overlapping outputs are averaged;
- the prompt block's global average pool (``model.PromptGenBlock``): each pixel's prompt weights come from the mean
  of the window centred on it (clamped at the borders, as TLC's local average pool), so the prompt mixes its
  learned components pixel by pixel.

Where a window covers the whole feature map, the module runs its own forward: the result is exactly the global one.
The weights are untouched; ``disable_tlc`` puts the modules back.

A prototype, measured by ``bench_recipe.py --views tlc tlc_tta`` and not part of the product: on the held-out split
(tiny preset trained on 48x48 crops, 192x192 test images, two seeds) it gained +0.05 dB without TTA and +0.085 dB
with 8x TTA on average (README, "What each recipe buys"), under the 0.1 dB it had to earn to become
``inference.py --tlc``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from model import Attention, PromptGenBlock

WINDOW_PER_CROP = 1.5  # TLC's default: windows 1.5 x the training crop


def window_for_crop(crop: int) -> int:
    """TLC's window (image pixels) for a network trained on ``crop`` x ``crop`` crops."""
    return int(round(WINDOW_PER_CROP * crop))


def training_crop(checkpoint: Any) -> int | None:
    """The side of the crops a checkpoint of trainer.py was trained on (its last --progressive phase's, else its
    --patch_size); None for whole images or a checkpoint that does not record its options."""
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict):
        return None
    if saved.get("progressive"):
        patch = str(saved["progressive"][-1]).split(":")[0]
        return int(patch) if patch.isdigit() else None
    patch = saved.get("patch_size")
    return int(patch) if isinstance(patch, int) and patch > 0 else None


class _Context:
    """The size of the image the model is restoring, which every local module reads to scale its window."""

    def __init__(self, window: int):
        self.window = window
        self.image: tuple[int, int] | None = None

    def window_at(self, height: int, width: int) -> tuple[int, int]:
        """The window (rows, columns) on a feature map of ``height`` x ``width``: the image window divided by the
        map's downscaling (a power of two), at most the map."""
        if self.image is None:
            return height, width
        scale = 2 ** round(math.log2(max(self.image[0] / height, 1)))
        side = max(1, math.ceil(self.window / scale))
        return min(side, height), min(side, width)


def _starts(size: int, window: int) -> list[int]:
    """Starts of the fewest windows of ``window`` covering ``size``, spread evenly (TLC's grids)."""
    if window >= size:
        return [0]
    count = math.ceil(size / window)
    return sorted({round(i * (size - window) / (count - 1)) for i in range(count)})


class LocalAttention:
    """Mixed into an ``Attention`` class (official or fast): normalisation, channel attention and ``attn @ v`` over
    local windows; where the window covers the map, the class's own forward (exactly the global result)."""

    tlc: _Context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        wh, ww = self.tlc.window_at(h, w)
        if wh >= h and ww >= w:
            return super().forward(x)  # its own formulation (official or fast): exactly the global result
        qkv = self.qkv_dwconv(self.qkv(x))
        out = torch.zeros(b, c, h, w, dtype=qkv.dtype, device=x.device)
        count = torch.zeros(1, 1, h, w, dtype=qkv.dtype, device=x.device)
        for top in _starts(h, wh):
            for left in _starts(w, ww):
                part = qkv[..., top:top + wh, left:left + ww]
                q, k, v = (rearrange(t, "b (head c) h w -> b head c (h w)", head=self.num_heads)
                           for t in part.chunk(3, dim=1))
                q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
                attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
                out[..., top:top + wh, left:left + ww] += rearrange(attn @ v, "b head c (h w) -> b (head c) h w",
                                                                    h=wh, w=ww)
                count[..., top:top + wh, left:left + ww] += 1
        return self.project_out(out / count)

    def forward_bands(self, x: torch.Tensor, norm: nn.Module, rows: int) -> torch.Tensor:
        """The fast path's CPU entry (``FastTransformerBlock.forward_bands``): ``x + self(norm(x))``, whole, or the
        fast path's own bands where the window covers the map."""
        wh, ww = self.tlc.window_at(*x.shape[-2:])
        if wh >= x.shape[-2] and ww >= x.shape[-1] and hasattr(super(), "forward_bands"):
            return super().forward_bands(x, norm, rows)
        return x + self(norm(x))


def local_mean(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """The mean of the ``window`` centred on each pixel of (B, C, H, W), windows clamped inside the map (border
    pixels take their nearest whole window's mean, as TLC's local average pool), from summed-area tables in
    float64."""
    h, w = x.shape[-2:]
    wh, ww = window
    table = F.pad(x.double().cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    sums = table[..., wh:, ww:] - table[..., :-wh, ww:] - table[..., wh:, :-ww] + table[..., :-wh, :-ww]
    means = (sums / (wh * ww)).to(x.dtype)  # (H - wh + 1, W - ww + 1) window positions
    ph, pw = h - means.shape[-2], w - means.shape[-1]
    return F.pad(means, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")


class LocalPromptGenBlock:
    """Mixed into a ``PromptGenBlock`` class: the prompt weights come from a local average around each pixel."""

    tlc: _Context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        window = self.tlc.window_at(h, w)
        if window[0] >= h and window[1] >= w:
            return super().forward(x)
        means = local_mean(x, window)
        weights = self.linear_layer(means.movedim(1, -1)).softmax(dim=-1).movedim(-1, 1)  # (B, L, H, W)
        prompts = F.interpolate(self.prompt_param[0], size=(h, w), mode="bilinear", align_corners=False)
        prompt = torch.einsum("blhw,lchw->bchw", weights, prompts.to(weights.dtype))
        return self.conv3x3(prompt.contiguous(memory_format=_layout(x)))


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


MIXINS = {Attention: LocalAttention, PromptGenBlock: LocalPromptGenBlock}
_LOCAL_CLASSES: dict[type, type] = {}  # a module's class -> its local subclass, made once


def _local_class(cls: type) -> type:
    """The local subclass of ``cls`` (an ``Attention`` or ``PromptGenBlock`` class, official or fast)."""
    if cls not in _LOCAL_CLASSES:
        mixin = next(m for base, m in MIXINS.items() if issubclass(cls, base))
        _LOCAL_CLASSES[cls] = type(f"Local{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return _LOCAL_CLASSES[cls]


def enable_tlc(model: nn.Module, *, window: int) -> nn.Module:
    """Compute ``model``'s global statistics over local windows of ``window`` image pixels at prediction time;
    returns the model (changed in place: its attention and prompt modules change class, their parameters do not).

    Works on the official formulation and on the fast path (the changed modules leave it; the rest stays on it).

    Args:
        model: a PromptIR (or a module holding one).
        window: window side in image pixels (``window_for_crop(crop)``); windows covering a feature map change
            nothing there.
    """
    if window < 1:
        raise ValueError(f"tlc.enable_tlc: the window must be at least 1 pixel, got {window}")
    disable_tlc(model)
    context = _Context(window)
    found = False
    for module in model.modules():
        if isinstance(module, tuple(MIXINS)):
            module._tlc_class = type(module)
            module.__class__ = _local_class(type(module))
            module.tlc = context
            found = True
    if not found:
        raise ValueError("tlc.enable_tlc: the model has no PromptIR attention or prompt block to make local")

    model._tlc_hook = model.register_forward_pre_hook(_RecordImage(context))
    return model


class _RecordImage:
    """Forward pre-hook of the model: notes the size of the image it restores. An object, not a closure, so that
    ``copy.deepcopy`` of the model gives the copy's modules and its hook one new shared context."""

    def __init__(self, context: _Context):
        self.context = context

    def __call__(self, _module: nn.Module, inputs: tuple) -> None:
        self.context.image = tuple(inputs[0].shape[-2:])


def disable_tlc(model: nn.Module) -> nn.Module:
    """Undo ``enable_tlc`` (a model without it is returned as it is)."""
    for module in model.modules():
        if "_tlc_class" in module.__dict__:
            module.__class__ = module.__dict__.pop("_tlc_class")
            module.__dict__.pop("tlc", None)
    hook = model.__dict__.pop("_tlc_hook", None)
    if hook is not None:
        hook.remove()
    return model
