"""PromptIR (Potlapalli et al., NeurIPS 2023): a Restormer encoder-decoder with prompt blocks in the decoder; and
building either network this project trains (``ARCHS``: PromptIR, or AdaIR from ``adair.py``) by name.

``PromptIR()`` is the official network as released (``PromptIR(decoder=True)``): the same module names, tensor shapes
and forward function, checked number for number against ``../shared/fixtures/promptir_parity``. The six modules the
official forward never calls (``DEAD_MODULES``) are left out; weights that still carry them load anyway.

This file holds the official formulation only. ``fast_path.enable_fast_path(model)`` runs the same function with
less memory traffic (and optionally compiled, or recomputing activations in backward) on the same parameters.

Besides the network this file owns the presets for tests and the demo, the one weight loader for every checkpoint
layout we meet, the rules for which weights and which network and size a checkpoint gives (``checkpoint_weights``,
``model_config``, ``model_from_checkpoint``), the ``--arch`` option, and freezing modules by name for fine-tuning.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from utils import CheckpointError, ConfigError, listing, load_checkpoint

log = logging.getLogger(__name__)

# Official modules that its forward never calls (215,296 parameters): dropped from checkpoints without a word (and
# AdaIR's, adair.DEAD_MODULES, likewise).
DEAD_MODULES = ("chnl_reduce1", "chnl_reduce2", "chnl_reduce3",
                "reduce_noise_channel_1", "reduce_noise_channel_2", "reduce_noise_channel_3")
# The modules the second fine-tuning stage trains; everything else stays frozen.
STAGE2_MODULES = ("refinement", "output", "decoder_level1", "noise_level1", "reduce_noise_level1", "up2_1")
# A --trainable name that stands for the network's own second-stage modules (PromptIR's STAGE2_MODULES, AdaIR's
# adair.STAGE2_MODULES), so one default serves both networks.
SECOND_STAGE = "second_stage"

# The networks by --arch name; the first is the default.
ARCHS = ("promptir", "adair")

PAD_MULTIPLE = 8  # three 2x downsamplings
# Reflection cannot add as many pixels as the side has: sides of 1 to 4 pixels would need 7 to 4 more, 5 needs 3.
MIN_SIZE = 5

PRESETS: dict[str, dict[str, Any]] = {
    "official": {},
    "small": {"dim": 24, "num_blocks": (2, 3, 3, 4), "num_refinement_blocks": 2, "prompt_dims": (32, 64, 160)},
    "tiny": {"dim": 8, "num_blocks": (1, 1, 1, 1), "num_refinement_blocks": 1, "heads": (1, 1, 1, 1),
             "prompt_dims": (8, 16, 16), "prompt_sizes": (16, 8, 4)},
}


class LayerNorm(nn.Module):
    """Layer normalisation over the channels of a (B, C, H, W) map, with weight and bias (Restormer's "WithBias").

    Args:
        dim: number of channels.
        eps: added to the variance.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.body = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.body(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")


class Attention(nn.Module):
    """Multi-Dconv head transposed attention (MDTA, Restormer): attention between channels, not pixels.

    Queries, keys and values come from a 1x1 then a depthwise 3x3 convolution. Per head, queries and keys are
    L2-normalised over the pixels, and the (C/heads x C/heads) attention map is scaled by a learned temperature.

    Args:
        dim: number of channels.
        num_heads: number of heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: {num_heads} heads do not divide {dim} channels; choose heads that do")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=False)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=False)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = (rearrange(t, "b (head c) h w -> b head c (h w)", head=self.num_heads)
                   for t in self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project_out(rearrange(attn @ v, "b head c (h w) -> b (head c) h w", h=h, w=w))


class FeedForward(nn.Module):
    """Gated-Dconv feed-forward network (GDFN, Restormer): GELU(gate) * value, both from a depthwise 3x3 convolution.

    Args:
        dim: number of channels.
        ffn_expansion_factor: hidden channels are ``int(dim * ffn_expansion_factor)``.
    """

    def __init__(self, dim: int, ffn_expansion_factor: float):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class TransformerBlock(nn.Module):
    """Restormer block: ``x + Attention(LayerNorm(x))``, then ``x + FeedForward(LayerNorm(x))``.

    Args:
        dim: number of channels.
        num_heads: attention heads.
        ffn_expansion_factor: hidden width of the feed-forward network relative to ``dim``.
    """

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_expansion_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """Embeds the image into features with one 3x3 convolution (overlapping patches).

    Args:
        in_channels: image channels.
        embed_dim: feature channels.
    """

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halves height and width and doubles the channels: 3x3 convolution to ``n_feat // 2``, then PixelUnshuffle(2).

    Args:
        n_feat: input channels; must be even.
    """

    def __init__(self, n_feat: int):
        super().__init__()
        if n_feat % 2:
            raise ValueError(f"Downsample needs an even number of channels, got {n_feat}; use an even width (dim)")
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Doubles height and width and halves the channels: 3x3 convolution to ``n_feat * 2``, then PixelShuffle(2).

    Args:
        n_feat: input channels.
    """

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PromptGenBlock(nn.Module):
    """Prompt generation block: a degradation-aware prompt computed from the features.

    Global average pooling and a linear layer give one softmax weight per learned prompt; the weighted sum of the
    prompts is resized bilinearly to the feature size and passed through a 3x3 convolution.

    Args:
        prompt_dim: channels of each prompt (and of the output).
        prompt_len: number of learned prompts.
        prompt_size: height and width of the learned prompts.
        lin_dim: channels of the features the weights are computed from.
    """

    def __init__(self, prompt_dim: int, prompt_len: int, prompt_size: int, lin_dim: int):
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.linear_layer(x.mean(dim=(-2, -1))).softmax(dim=1)
        prompt = torch.einsum("bl,lchw->bchw", weights, self.prompt_param[0])
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv3x3(prompt)


def reflect_pad(x: torch.Tensor, network: str) -> torch.Tensor:
    """A batch (B, C, H, W) reflect-padded at the bottom and right to a multiple of ``PAD_MULTIPLE``.

    Raises:
        ValueError: not a batch of images, or a side under ``MIN_SIZE`` (the message names ``network``).
    """
    if x.ndim != 4:
        raise ValueError(f"{network} expects (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
    if pad_h >= h or pad_w >= w:
        raise ValueError(f"{network} needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels (they are reflect-padded "
                         f"to a multiple of {PAD_MULTIPLE}), got {h}x{w}")
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x


def _stage(dim: int, num_heads: int, ffn_expansion_factor: float, depth: int) -> nn.Sequential:
    return nn.Sequential(*(TransformerBlock(dim, num_heads, ffn_expansion_factor) for _ in range(depth)))


class PromptIR(nn.Module):
    """PromptIR: all-in-one image restoration with prompts (the official ``PromptIR(decoder=True)``).

    A four-level Restormer encoder-decoder. After the latent level and after decoder levels 3 and 2 a prompt block
    computes a prompt from the features; prompt and features are concatenated, passed through one transformer block
    (``noise_level3/2/1``, with ``heads[2]`` heads) and reduced by a 1x1 convolution. The output is
    ``output(features) + input``, not clamped. Any height and width of at least ``MIN_SIZE`` work: the input is
    reflect-padded to a multiple of 8 and the result cropped back.

    The defaults are the official sizes (35,376,967 parameters). Widths the official code writes as numbers that only
    hold for ``dim=48`` are derived here: a prompt block's linear layer reads the feature channels of its level, and
    a ``noise_level`` block is as wide as those channels plus the prompt channels.

    Args:
        channels: image channels (input and output).
        dim: feature channels of the first level; level ``i`` has ``dim * 2**i``. Must be even.
        num_blocks: transformer blocks per level, finest first (encoder levels 1-3 and the latent level; the decoder
            levels 3, 2, 1 repeat the counts of levels 3, 2, 1).
        num_refinement_blocks: transformer blocks after the decoder.
        heads: attention heads per level, finest first.
        ffn_expansion_factor: hidden width of the feed-forward networks relative to their input.
        prompt_dims: channels of the prompts of ``prompt1`` (used at level 2), ``prompt2`` (level 3) and ``prompt3``
            (latent level).
        prompt_len: number of learned prompts per prompt block.
        prompt_sizes: height and width of the learned prompts of ``prompt1``, ``prompt2``, ``prompt3``.
    """

    arch = "promptir"
    STAGE2_MODULES = STAGE2_MODULES
    FROZEN_MODULES: tuple[str, ...] = ()  # modules that never train (see AdaIR's)

    def __init__(self, *, channels: int = 3, dim: int = 48, num_blocks: Sequence[int] = (4, 6, 6, 8),
                 num_refinement_blocks: int = 4, heads: Sequence[int] = (1, 2, 4, 8),
                 ffn_expansion_factor: float = 2.66, prompt_dims: Sequence[int] = (64, 128, 320), prompt_len: int = 5,
                 prompt_sizes: Sequence[int] = (64, 32, 16)):
        super().__init__()
        for name, value, length in (("num_blocks", num_blocks, 4), ("heads", heads, 4),
                                    ("prompt_dims", prompt_dims, 3), ("prompt_sizes", prompt_sizes, 3)):
            if len(value) != length:
                raise ValueError(f"PromptIR: {name} needs {length} values, got {tuple(value)}")
        widths = [dim * 2**level for level in range(4)]  # 48, 96, 192, 384 in the official network
        ffn = ffn_expansion_factor

        # Registered in the official order, so state_dict keys come out in the order of the released checkpoint.
        self.patch_embed = OverlapPatchEmbed(channels, dim)
        self.prompt1 = PromptGenBlock(prompt_dims[0], prompt_len, prompt_sizes[0], lin_dim=widths[1])
        self.prompt2 = PromptGenBlock(prompt_dims[1], prompt_len, prompt_sizes[1], lin_dim=widths[2])
        self.prompt3 = PromptGenBlock(prompt_dims[2], prompt_len, prompt_sizes[2], lin_dim=widths[3])

        self.encoder_level1 = _stage(widths[0], heads[0], ffn, num_blocks[0])
        self.down1_2 = Downsample(widths[0])
        self.encoder_level2 = _stage(widths[1], heads[1], ffn, num_blocks[1])
        self.down2_3 = Downsample(widths[1])
        self.encoder_level3 = _stage(widths[2], heads[2], ffn, num_blocks[2])
        self.down3_4 = Downsample(widths[2])
        self.latent = _stage(widths[3], heads[3], ffn, num_blocks[3])

        # Level 3: the prompted latent is reduced to widths[2], upsampled to widths[1] and joined with encoder level 3.
        self.up4_3 = Upsample(widths[2])
        self.reduce_chan_level3 = nn.Conv2d(widths[1] + widths[2], widths[2], kernel_size=1, bias=False)
        self.noise_level3 = TransformerBlock(widths[3] + prompt_dims[2], heads[2], ffn)
        self.reduce_noise_level3 = nn.Conv2d(widths[3] + prompt_dims[2], widths[2], kernel_size=1, bias=False)
        self.decoder_level3 = _stage(widths[2], heads[2], ffn, num_blocks[2])

        self.up3_2 = Upsample(widths[2])
        self.reduce_chan_level2 = nn.Conv2d(widths[1] * 2, widths[1], kernel_size=1, bias=False)
        self.noise_level2 = TransformerBlock(widths[2] + prompt_dims[1], heads[2], ffn)
        self.reduce_noise_level2 = nn.Conv2d(widths[2] + prompt_dims[1], widths[2], kernel_size=1, bias=False)
        self.decoder_level2 = _stage(widths[1], heads[1], ffn, num_blocks[1])

        # Level 1 keeps the concatenated width widths[1] (no channel reduction), as in Restormer.
        self.up2_1 = Upsample(widths[1])
        self.noise_level1 = TransformerBlock(widths[1] + prompt_dims[0], heads[2], ffn)
        self.reduce_noise_level1 = nn.Conv2d(widths[1] + prompt_dims[0], widths[1], kernel_size=1, bias=False)
        self.decoder_level1 = _stage(widths[1], heads[0], ffn, num_blocks[0])

        self.refinement = _stage(widths[1], heads[0], ffn, num_refinement_blocks)
        self.output = nn.Conv2d(widths[1], channels, kernel_size=3, padding=1, bias=False)

    @staticmethod
    def _prompted(x: torch.Tensor, prompt: PromptGenBlock, noise_level: TransformerBlock,
                  reduce: nn.Conv2d) -> torch.Tensor:
        return reduce(noise_level(torch.cat([x, prompt(x)], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore a batch (B, C, H, W) or one image (C, H, W); the result has the input's shape."""
        if x.ndim == 3:
            return self(x.unsqueeze(0)).squeeze(0)
        h, w = x.shape[-2:]
        inp = reflect_pad(x, "PromptIR")

        enc1 = self.encoder_level1(self.patch_embed(inp))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))
        latent = self._prompted(latent, self.prompt3, self.noise_level3, self.reduce_noise_level3)

        dec3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], dim=1)))
        dec3 = self._prompted(dec3, self.prompt2, self.noise_level2, self.reduce_noise_level2)
        dec2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], dim=1)))
        dec2 = self._prompted(dec2, self.prompt1, self.noise_level1, self.reduce_noise_level1)
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], dim=1))

        out = self.output(self.refinement(dec1)) + inp
        return out[..., :h, :w]


def _network(arch: str) -> tuple[type[nn.Module], dict[str, dict[str, Any]]]:
    """The class and presets of the ``arch`` network."""
    if arch == "adair":
        import adair  # here, not at the top: adair.py builds on this file's blocks
        return adair.AdaIR, adair.PRESETS
    if arch != "promptir":
        raise ValueError(f"unknown network {arch!r}; choose one of {', '.join(ARCHS)}")
    return PromptIR, PRESETS


def build_model(preset: str = "official", *, arch: str = "promptir", **overrides: Any) -> nn.Module:
    """A network (``ARCHS``: PromptIR by default, or AdaIR) of a named size, with any constructor argument overridden.

    Args:
        preset: a key of ``PRESETS`` (AdaIR's presets have the same names and size classes: ``adair.PRESETS``).
        arch: which network, a name of ``ARCHS``.
        overrides: keyword arguments of the network's constructor that replace the preset's.

    Raises:
        ValueError: an unknown network or preset (the message lists the known ones).
    """
    network, presets = _network(arch)
    if preset not in presets:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(presets)}")
    return network(**{**presets[preset], **overrides})


def add_arch_argument(parser: Any) -> None:
    """Add ``--arch`` (default None: PromptIR for a new model, else the checkpoint's) to an argparse parser or group;
    ``model_config`` and ``model_from_checkpoint`` take its value."""
    parser.add_argument("--arch", choices=ARCHS, default=None,
                        help="network: promptir or adair (default promptir; with a checkpoint its own is used, and an "
                             "--arch given must match it)")


# ------------------------------------------------------------------------------------------------------- weights
# Where the weights sit in a checkpoint, tried in this order: EMA copies first (BasicSR's params_ema, our trainer's
# ema when it kept one), then plain weights (BasicSR's params, our trainer's model); the official release is a
# Lightning checkpoint with "state_dict". Wrappers may nest.
WRAPPER_KEYS = ("params_ema", "ema", "params", "model", "state_dict", "net")
# Added to key names by the official Lightning module, DistributedDataParallel and torch.compile; possibly stacked.
KEY_PREFIXES = ("net.", "module.", "_orig_mod.")
# (EMA copy, plain weights) as our trainer and BasicSR store them side by side.
EMA_LAYOUTS = (("ema", "model"), ("params_ema", "params"))


# "module." for each dead module of either network (adair.DEAD_MODULES written out: this file cannot import adair.py
# at the top). The networks share no top-level name that could make one's dead module the other's live one.
_DEAD_PREFIXES = tuple(f"{name}." for name in DEAD_MODULES + tuple(f"fre{i}.{m}" for i in (1, 2, 3)
                                                                    for m in ("conv", "score_gen")))


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _holds_weights(obj: Any) -> bool:
    return isinstance(obj, nn.Module) or (isinstance(obj, Mapping) and len(obj) > 0)


def _strip_prefixes(key: str) -> str:
    while key.startswith(KEY_PREFIXES):
        key = key[len(next(p for p in KEY_PREFIXES if key.startswith(p))):]
    return key


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The network weights inside a loaded checkpoint, named as in our models.

    Accepts a plain state dict, a module, or a dict that holds one under a key of ``WRAPPER_KEYS`` (first match wins,
    wrappers may nest). Strips ``KEY_PREFIXES`` from the start of each key, as often as they are stacked, and drops
    the official networks' dead modules (``DEAD_MODULES``, ``adair.DEAD_MODULES``). An EMA copy wins over the plain
    weights (``params_ema``, our trainer's ``ema``: the weights it validated and chose ``best.pth`` by);
    ``checkpoint_weights(use_ema=False)`` takes the plain ones.

    Args:
        obj: a loaded checkpoint, state dict or module.

    Raises:
        CheckpointError: no weights found, or two keys that become the same name.
    """
    while not _is_state_dict(obj):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
            continue
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"expected a state dict or a dict holding one, found a {type(obj).__name__}")
        key = next((k for k in WRAPPER_KEYS if _holds_weights(obj.get(k))), None)
        if key is None:
            raise CheckpointError(f"found no weights: expected a state dict (names to tensors) or a dict holding one "
                                  f"under one of {', '.join(WRAPPER_KEYS)}; its keys are {listing(list(obj))}")
        obj = obj[key]
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = _strip_prefixes(key)
        if name in state:
            raise CheckpointError(f"two weights are both named {name!r} once prefixes are stripped")
        if not name.startswith(_DEAD_PREFIXES):
            state[name] = value
    return state


def check_weight_values(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse weights that hold no values (PyTorch's meta device) or values that are not finite, naming ``where``:
    every script loads weights through here, and nothing may continue from such weights (the trainer never saves
    them).

    Raises:
        CheckpointError: naming the checkpoint and the first such weights.
    """
    meta = [k for k, v in state.items() if v.device.type == "meta"]
    if meta:
        raise CheckpointError(f"{where} holds weights without values ({len(meta)} on PyTorch's meta device, e.g. "
                              f"{meta[0]}): it was saved from a model that was never filled; save the weights of a "
                              "real model")
    bad = [k for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{where} holds weights that are not finite (NaN or infinite in {len(bad)} tensor(s): "
                              f"{listing(bad, limit=3)}): it cannot restore or train anything; use another "
                              "checkpoint (a trainer.py run never saves such weights)")


def _preset_hint(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """The preset whose width fits ``state`` (told by its patch embedding) when it differs from ``model``'s, else
    an empty string."""
    weight = state.get("patch_embed.proj.weight")
    own = model.state_dict().get("patch_embed.proj.weight")
    if weight is None or own is None or weight.ndim != 4 or weight.shape[0] == own.shape[0]:
        return ""
    network, presets = _network(getattr(model, "arch", ARCHS[0]))
    default = inspect.signature(network).parameters["dim"].default
    return next((name for name, preset in presets.items() if preset.get("dim", default) == weight.shape[0]), "")


def _fit(model: nn.Module, state: Mapping[str, torch.Tensor], *, where: str, strict: bool) -> nn.Module:
    """Load the extracted ``state`` into ``model``, or fail listing every key that does not fit."""
    check_weight_values(state, where)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    listed = [("shape mismatches", mismatched)] + ([("missing", missing), ("unexpected", unexpected)] if strict else [])
    problems = [f"  {title} ({len(keys)}):\n" + listing(keys, sep="\n", prefix="    ")
                for title, keys in listed if keys]
    if problems:
        preset = _preset_hint(model, state) if mismatched else ""
        first = (f" pass --preset {preset} (its patch embedding is {state['patch_embed.proj.weight'].shape[0]} "
                 f"channels wide, as the preset {preset}'s)" if preset else "")
        hint = ("Was it saved from a model of other sizes? Build the model with the same preset." if mismatched
                or missing else "It holds weights this model does not have: was it saved by another version or "
                "from another network?")
        raise CheckpointError(f"{where} does not fit this model:{first}\n" + "\n".join(problems) + "\n" + hint)
    if missing or unexpected:
        log.warning("%s: skipped %d missing and %d unexpected keys (strict=False): %s", where, len(missing),
                    len(unexpected), listing(missing + unexpected))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model


def load_weights(model: nn.Module, source: str | os.PathLike | Any, *, trusted: bool = False,
                 strict: bool = True, name: str | None = None) -> nn.Module:
    """Load weights of any layout ``extract_state_dict`` knows into ``model`` and return it.

    Args:
        model: the network to fill.
        source: a checkpoint path (read with ``torch.load(weights_only=True)`` through ``utils.load_checkpoint``)
            or an already-loaded checkpoint, state dict or module.
        trusted: allow full unpickling for a file you trust (needed for files that store Python objects).
        strict: every key must match. With ``strict=False`` missing and unexpected keys are logged and skipped;
            shape mismatches are errors either way.
        name: what the weights are called in messages when ``source`` is already loaded (a path names itself).

    Raises:
        CheckpointError: the file cannot be read, holds no weights, or does not fit the model; the message lists
            the missing, unexpected and mismatched keys.
    """
    where = str(source) if isinstance(source, (str, os.PathLike)) else name or "the given weights"
    obj = load_checkpoint(source, trusted=trusted) if isinstance(source, (str, os.PathLike)) else source
    try:
        state = extract_state_dict(obj)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None
    return _fit(model, state, where=where, strict=strict)


# ------------------------------------------------------------------------------------------------------- checkpoints
# The rules every script follows for a checkpoint already read (utils.load_checkpoint): which of its weights are used,
# and which model they are loaded into. trainer.py (fine-tuning, resuming) and inference.py both call these.
def checkpoint_weights(checkpoint: Any, *, use_ema: bool = True,
                       source: str = "the given weights") -> dict[str, torch.Tensor]:
    """The weights to load from an already-loaded checkpoint, named as in our model (``extract_state_dict``).

    Our trainer's dicts hold ``"model"`` and, when it kept one, an EMA copy under ``"ema"``; BasicSR's hold
    ``"params"`` and possibly ``"params_ema"``. The EMA copy wins (the weights the trainer validated and chose
    ``best.pth`` by) unless ``use_ema=False``. Any other layout goes to ``extract_state_dict``. Logs once (info)
    which weights were used when the checkpoint holds an EMA copy.

    Args:
        checkpoint: a loaded checkpoint, state dict or module.
        use_ema: take the EMA copy where there is one; False takes the plain weights beside it.
        source: what the checkpoint is called in messages (its path, say).

    Raises:
        CheckpointError: no weights found (the message starts with ``source``).
    """
    if isinstance(checkpoint, Mapping):
        only_ema = [k for k, plain in EMA_LAYOUTS if _holds_weights(checkpoint.get(k))
                    and not _holds_weights(checkpoint.get(plain))]
        if not use_ema and only_ema:
            raise ConfigError(f"{source} holds EMA weights only (under {only_ema[0]!r}), no plain weights: drop "
                              "--no_ema")
        for ema_key, plain_key in EMA_LAYOUTS:
            if _holds_weights(checkpoint.get(ema_key)) and _holds_weights(checkpoint.get(plain_key)):
                log.info("%s holds EMA weights: using %s", source,
                         "them (--no_ema for the plain ones)" if use_ema else "its plain weights instead (--no_ema)")
                checkpoint = checkpoint[ema_key if use_ema else plain_key]
                break
    try:
        return extract_state_dict(checkpoint)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None


def weights_arch(checkpoint: Any) -> str | None:
    """Which network (a name of ``ARCHS``) the weights of ``checkpoint`` are for, by their names; None when they
    hold no weights or none that tell (the loader says what is wrong when they are loaded)."""
    try:
        names = checkpoint_weights(checkpoint)
    except CheckpointError:
        return None
    tops = {name.split(".", 1)[0] for name in names}
    return "adair" if "fre1" in tops else "promptir" if "prompt1" in tops else None


def model_config(checkpoint: Any, preset: str | None = None, *, arch: str | None = None,
                 source: str) -> dict[str, Any]:
    """The ``build_model`` keyword arguments for the weights of ``checkpoint``: the network (``"arch"``) and size.

    A checkpoint's own ``"model_config"`` (written by trainer.py; one without ``"arch"`` is PromptIR's) wins; an
    ``arch`` or ``preset`` asked for explicitly must agree with it. A checkpoint without one (a bare state dict, an
    official release, a foreign layout) is built as ``preset``, by default the official size, and as the network its
    weights' names show (``weights_arch``; official AdaIR checkpoints load without ``--arch``), else as ``arch``, by
    default PromptIR. No checkpoint (None: a new model) gives ``arch`` and ``preset`` or their defaults.

    Args:
        checkpoint: a loaded checkpoint (or state dict, or module), or None.
        preset: the ``--preset`` given, or None where none was.
        arch: the ``--arch`` given, or None where none was.
        source: what the checkpoint is called in messages (its path, say).

    Raises:
        ConfigError: ``arch`` or ``preset`` conflicts with the checkpoint's own.
        CheckpointError: the checkpoint's own description cannot be built (``check_checkpoint_description``).
    """
    saved = checkpoint.get("model_config") if isinstance(checkpoint, Mapping) else None
    if saved is None or (isinstance(saved, Mapping) and not saved):
        found = weights_arch(checkpoint) if checkpoint is not None else None
        if arch and found and arch != found:
            raise ConfigError(f"{source} holds {found} weights, not --arch {arch}: drop --arch (the weights' "
                              "network is used) or give another checkpoint")
        return {"arch": found or arch or ARCHS[0], "preset": preset or "official"}
    check_checkpoint_description(saved, source)
    saved = {"arch": ARCHS[0], **saved}
    for option, given in (("arch", arch), ("preset", preset)):
        if given and given != saved.get(option, "official"):
            raise ConfigError(f"{source} holds a model of {option} {saved.get(option, 'official')!r}, not --{option} "
                              f"{given}: drop --{option} (the checkpoint's is used) or start a new run")
    return saved


def check_checkpoint_description(config: Any, source: str) -> None:
    """Refuse a checkpoint's ``model_config`` that this code cannot build: not a dict, an unknown network or preset,
    an option the network does not have (as a newer version might write) or a value of the wrong kind. A
    checkpoint's description of itself is input like any other, checked where it is read.

    Raises:
        CheckpointError: one message naming ``source`` and what is wrong.
    """
    where = f"{source}: its model_config"
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{where} is a {type(config).__name__}, not a dict of model options: the file was not "
                              "written by this toolkit, or is damaged; use another checkpoint")
    arch = config.get("arch", ARCHS[0])
    if not isinstance(arch, str) or arch not in ARCHS:
        raise CheckpointError(f"{where} names the network {arch!r}, which this version does not know (it knows "
                              f"{', '.join(ARCHS)}): it was written by another version; use that version")
    network, presets = _network(arch)
    params = inspect.signature(network).parameters
    unknown = sorted(str(k) for k in config if k not in ("arch", "preset") and k not in params)
    if unknown:
        raise CheckpointError(f"{where} holds option(s) this version does not know ({listing(unknown)}): it was "
                              f"written by another version; use that version, or a checkpoint of this one")
    preset = config.get("preset", "official")
    if not isinstance(preset, str) or preset not in presets:
        raise CheckpointError(f"{where} names the preset {preset!r}, which this version does not know (it knows "
                              f"{', '.join(presets)}): it was written by another version; use that version")
    for key, value in config.items():
        if key not in ("arch", "preset") and not _fits_default(value, params[key].default):
            raise CheckpointError(f"{where} gives {key} = {value!r}, where a value like {params[key].default!r} "
                                  "belongs: the file is damaged or of another program; use another checkpoint")


def _fits_default(value: Any, default: Any) -> bool:
    """Whether ``value`` is of the kind of ``default`` (a positive whole number, a positive finite number, or as
    many positive whole numbers)."""
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list)) and len(value) == len(default) and all(whole(v) for v in value)
    if isinstance(default, float):
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and value > 0)
    return whole(value)


def model_from_checkpoint(checkpoint: Any, *, preset: str | None = None, arch: str | None = None,
                          use_ema: bool = True, source: str | None = None) -> nn.Module:
    """A network of the checkpoint's kind and size (``model_config``) holding its weights (``checkpoint_weights``).

    Reading the file stays ``utils.load_checkpoint``'s job: pass what it returned. The model is on the CPU, in
    training mode, on the official formulation (``fast_path.enable_fast_path`` for the fast one).

    Args:
        checkpoint: a loaded checkpoint, state dict or module.
        preset: the ``--preset`` given, or None; used where the checkpoint has no ``"model_config"``.
        arch: the ``--arch`` given, or None; likewise.
        use_ema: take the checkpoint's EMA copy where there is one.
        source: what the checkpoint is called in messages (its path, say); None for "the given weights".

    Raises:
        ConfigError: ``arch`` or ``preset`` conflicts with the checkpoint's own.
        CheckpointError: no weights found, or they do not fit the model (every such key is listed).
    """
    source = source or "the given weights"
    config = model_config(checkpoint, preset, arch=arch, source=source)
    try:
        model = build_model(**config)
    except ValueError as err:  # sizes that do not go together (heads that do not divide a width, an odd width)
        raise CheckpointError(f"{source}: its model_config {config} cannot be built ({err})") from None
    return _fit(model, checkpoint_weights(checkpoint, use_ema=use_ema, source=source), where=source, strict=True)


# ------------------------------------------------------------------------------------------------------- freezing
def freeze_except(model: nn.Module, names: Sequence[str]) -> None:
    """Train only the named top-level modules of ``model`` (for example ``STAGE2_MODULES``); freeze the rest.

    The name ``SECOND_STAGE`` stands for the network's own second-stage modules (its ``STAGE2_MODULES``), which are
    logged. Modules the network never trains (its ``FROZEN_MODULES``) stay frozen.
    """
    names = [names] if isinstance(names, str) else list(names)
    if SECOND_STAGE in names:
        stage2 = getattr(model, "STAGE2_MODULES", STAGE2_MODULES)
        names = list(dict.fromkeys(stage2 + tuple(n for n in names if n != SECOND_STAGE)))
        log.info("%s: the second stage trains %s", type(model).__name__, ", ".join(stage2))
    valid = [name for name, _ in model.named_children()]
    unknown = sorted(set(names) - set(valid))
    if not names:
        raise ValueError(f"no module named to train (everything would be frozen); valid top-level modules: "
                         f"{', '.join(valid)}")
    if unknown:
        raise ValueError(f"unknown module name(s) {', '.join(unknown)}; valid top-level modules: {', '.join(valid)}")
    model.requires_grad_(False)
    for name, child in model.named_children():
        if name in names:
            child.requires_grad_(True)
    for name in getattr(model, "FROZEN_MODULES", ()):
        model.get_submodule(name).requires_grad_(False)


def trainable_summary(model: nn.Module) -> str:
    """A table of trainable and total parameters per top-level module of ``model``, with a total line."""
    rows = []
    for name, child in model.named_children():
        params = list(child.parameters())
        rows.append((name, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'module':<{width}}  {'trainable':>12}  {'total':>12}"]
    lines += [f"{name:<{width}}  {trainable:>12,}  {total:>12,}" for name, trainable, total in rows]
    lines.insert(-1, "-" * len(lines[0]))
    return "\n".join(lines)
