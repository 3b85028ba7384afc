"""AdaIR (Cui et al., "AdaIR: Adaptive All-in-One Image Restoration via Frequency Mining and Modulation", ICLR 2025).

PromptIR's Restormer encoder-decoder (``model.py``'s blocks) with an adaptive frequency learning block in the decoder
where PromptIR has its prompt blocks: ``fre1`` after the latent level, ``fre2`` after decoder level 3, ``fre3`` after
decoder level 2. Each block splits features of the degraded image (resized to the level) into low and high
frequencies with a box on the spectrum whose size the image itself chooses, lets each part attend to the decoder
features (frequency mining), makes the two parts modulate each other (frequency modulation) and merges the result
into the features.

``AdaIR()`` is the official ``AdaIR(decoder=True)``: the same module names, tensor shapes and forward function,
checked number for number against ``../shared/fixtures/adair_parity``. Written from the paper and that fixture's
notes, not from the official code. Decisions where the official network leaves a choice:

- the six modules its forward never calls (``DEAD_MODULES``: each block's ``conv`` and ``score_gen``) are left out;
  checkpoints that carry them load anyway (``model.extract_state_dict`` drops them);
- ``rate_conv``, which sizes the low-frequency box, only reaches the output through an integer cut, so it never gets a
  gradient: it is frozen here (``requires_grad=False``; the same training, and DistributedDataParallel needs no
  ``find_unused_parameters``);
- the unused ``noise_emb`` argument of the official forward is not taken.

The box is empty for every feature map under 256 pixels in a direction (the low-frequency part is then zero and
the high-frequency part the features' magnitude), so training on 128x128 crops never sees a non-empty one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from model import Downsample, OverlapPatchEmbed, Upsample, _stage, reflect_pad

# Official modules its forward never calls (9 tensors, 18,738 parameters): dropped from checkpoints without a word.
DEAD_MODULES = tuple(f"fre{i}.{name}" for i in (1, 2, 3) for name in ("conv", "score_gen"))
# The second fine-tuning stage's modules, PromptIR's choice carried over: the full-resolution decoder, refinement and
# output, the upsampling into them, and the frequency block feeding them (PromptIR: its last prompt block's
# transformer block and reduction).
STAGE2_MODULES = ("refinement", "output", "decoder_level1", "fre3", "up2_1")

# The box half-sizes are multiples of (side // BOX_UNIT): the official frequency split's constant.
BOX_UNIT = 128

PRESETS: dict[str, dict[str, Any]] = {
    "official": {},
    "small": {"dim": 24, "num_blocks": (2, 3, 3, 4), "num_refinement_blocks": 2},
    "tiny": {"dim": 8, "num_blocks": (1, 1, 1, 1), "num_refinement_blocks": 1, "heads": (1, 1, 1, 1)},
}


class CrossAttention(nn.Module):
    """Transposed (channel) attention of one map's queries to another map's keys and values.

    As Restormer's MDTA, but the queries come from ``x`` and the keys and values from ``y`` (1x1 then depthwise 3x3
    convolutions); per head, queries and keys are L2-normalised over the pixels and the attention map is scaled by a
    learned temperature.

    Args:
        dim: channels of both maps.
        num_heads: number of heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention: {num_heads} heads do not divide {dim} channels; choose heads that do")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        self.q_dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.kv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=False)
        self.kv_dwconv = nn.Conv2d(dim * 2, dim * 2, kernel_size=3, padding=1, groups=dim * 2, bias=False)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q = rearrange(self.q_dwconv(self.q(x)), "b (head c) h w -> b head c (h w)", head=self.num_heads)
        k, v = (rearrange(t, "b (head c) h w -> b head c (h w)", head=self.num_heads)
                for t in self.kv_dwconv(self.kv(y)).chunk(2, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project_out(rearrange(attn @ v, "b head c (h w) -> b (head c) h w", h=h, w=w))


class SpatialGate(nn.Module):
    """A per-pixel weight in (0, 1) from the channel maximum and mean of a map (7x7 convolution, sigmoid)."""

    def __init__(self):
        super().__init__()
        self.spatial = nn.Conv2d(2, 1, kernel_size=7, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return self.spatial(pooled).sigmoid()


class ChannelGate(nn.Module):
    """A per-channel weight in (0, 1): one bottleneck MLP (1x1 convolutions, ReLU) on the global average and on the
    global maximum of a map, summed, then a sigmoid.

    Args:
        dim: channels; the bottleneck has ``dim // 16``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(dim, dim // 16, kernel_size=1, bias=False), nn.ReLU(),
                                 nn.Conv2d(dim // 16, dim, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.mlp(x.mean(dim=(-2, -1), keepdim=True)) + self.mlp(x.amax(dim=(-2, -1), keepdim=True))).sigmoid()


class FrequencyRefine(nn.Module):
    """Frequency modulation: each part gates the other (the high frequencies choose where the low ones count, the
    low frequencies which channels of the high ones count), then the sum goes through a 1x1 convolution.

    Args:
        dim: channels.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.SpatialGate = SpatialGate()  # noqa: N815 (the official parameter names)
        self.ChannelGate = ChannelGate(dim)  # noqa: N815
        self.proj = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.proj(low * self.SpatialGate(high) + high * self.ChannelGate(low))


class FrequencyBlock(nn.Module):
    """Adaptive frequency learning block: mines the degraded image's low and high frequencies and merges them into
    the decoder features ``y`` of one level.

    The image, resized to the level (bilinear), gives features ``conv1(image)``. Their spectrum is split by a
    centred box of half-sizes ``int((h // 128) * r_h)`` and ``int((w // 128) * r_w)`` frequencies, where ``r`` is the
    sigmoid of ``rate_conv`` on the globally pooled features (per image): inside is the low-frequency part, outside
    the high-frequency part, each taken back to pixels as a magnitude. Each part attends to ``y``
    (``channel_cross_l`` for the high part, ``channel_cross_h`` for the low part, as the official network names
    them), the two modulate each other (``frequency_refine``), ``y`` attends to the result (``channel_cross_agg``),
    and the output is ``para1 * that + para2 * y`` (an identity at initialisation).

    ``rate_conv`` is frozen: the integer cut stops every gradient to it (see the module docstring).

    Args:
        dim: channels of the level's features; at least 16.
        num_heads: heads of the three cross attentions.
        in_channels: image channels.
    """

    def __init__(self, dim: int, num_heads: int, in_channels: int = 3):
        super().__init__()
        if dim < 16:
            raise ValueError(f"FrequencyBlock needs at least 16 channels (its channel gate has dim // 16), got {dim}; "
                             "use dim >= 8")
        self.para1 = nn.Parameter(torch.zeros(dim, 1, 1))
        self.para2 = nn.Parameter(torch.ones(dim, 1, 1))
        self.conv1 = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=False)
        self.channel_cross_l = CrossAttention(dim, num_heads)
        self.channel_cross_h = CrossAttention(dim, num_heads)
        self.channel_cross_agg = CrossAttention(dim, num_heads)
        self.frequency_refine = FrequencyRefine(dim)
        self.rate_conv = nn.Sequential(nn.Conv2d(dim, dim // 8, kernel_size=1, bias=False), nn.GELU(),
                                       nn.Conv2d(dim // 8, 2, kernel_size=1, bias=False))
        self.rate_conv.requires_grad_(False)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(high, low): the magnitudes of ``x``'s frequencies outside and inside its box."""
        h, w = x.shape[-2:]
        if h < BOX_UNIT or w < BOX_UNIT:  # (side // BOX_UNIT) is 0: the box is empty, all of the spectrum is high
            return x.abs(), torch.zeros_like(x)
        rate = self.rate_conv(x.mean(dim=(-2, -1), keepdim=True)).sigmoid()  # (B, 2, 1, 1)
        half_h = ((h // BOX_UNIT) * rate[:, 0, 0, 0]).int()[:, None]  # truncated toward zero: no gradient
        half_w = ((w // BOX_UNIT) * rate[:, 1, 0, 0]).int()[:, None]
        # Signed frequencies (0, 1, ..., -1): the box holds -half <= f < half, one more negative frequency than
        # positive, as a slice of the centred spectrum has it.
        freq_h = torch.fft.fftfreq(h, 1 / h, device=x.device)
        freq_w = torch.fft.fftfreq(w, 1 / w, device=x.device)
        rows = (freq_h >= -half_h) & (freq_h < half_h)  # (B, h)
        cols = (freq_w >= -half_w) & (freq_w < half_w)
        box = (rows[:, :, None] & cols[:, None, :])[:, None]  # (B, 1, h, w)
        spectrum = torch.fft.fft2(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
        low = spectrum * box
        high = torch.fft.ifft2(spectrum - low).abs().to(x.dtype)
        return high, torch.fft.ifft2(low).abs().to(x.dtype)

    def forward(self, image: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        image = F.interpolate(image, size=y.shape[-2:], mode="bilinear", align_corners=False)
        high, low = self.split(self.conv1(image))
        high = self.channel_cross_l(high, y)
        low = self.channel_cross_h(low, y)
        return self.channel_cross_agg(y, self.frequency_refine(low, high)) * self.para1 + y * self.para2


class AdaIR(nn.Module):
    """AdaIR: all-in-one image restoration by frequency mining and modulation (the official ``AdaIR(decoder=True)``).

    A four-level Restormer encoder-decoder; frequency blocks (``FrequencyBlock``, ``heads[2]`` heads) refine the
    latent level and decoder levels 3 and 2 with the input image. The output is ``output(features) + input``, not
    clamped. Any height and width of at least ``model.MIN_SIZE`` work: the input is reflect-padded to a multiple of 8
    and the result cropped back.

    The defaults are the official sizes (28,766,086 parameters, 24,360 of them frozen in ``rate_conv``).

    Args:
        channels: image channels (input and output).
        dim: feature channels of the first level; level ``i`` has ``dim * 2**i``. Even, and at least 8.
        num_blocks: transformer blocks per level, finest first (encoder levels 1-3 and the latent level; the decoder
            levels 3, 2, 1 repeat the counts of levels 3, 2, 1).
        num_refinement_blocks: transformer blocks after the decoder.
        heads: attention heads per level, finest first.
        ffn_expansion_factor: hidden width of the feed-forward networks relative to their input.
        decoder: the official switch for the frequency blocks; only True (AdaIR as published) is built.
    """

    arch = "adair"
    STAGE2_MODULES = STAGE2_MODULES
    FROZEN_MODULES = tuple(f"fre{i}.rate_conv" for i in (1, 2, 3))

    def __init__(self, *, channels: int = 3, dim: int = 48, num_blocks: Sequence[int] = (4, 6, 6, 8),
                 num_refinement_blocks: int = 4, heads: Sequence[int] = (1, 2, 4, 8),
                 ffn_expansion_factor: float = 2.66, decoder: bool = True):
        super().__init__()
        for name, value in (("num_blocks", num_blocks), ("heads", heads)):
            if len(value) != 4:
                raise ValueError(f"AdaIR: {name} needs 4 values, got {tuple(value)}")
        if not decoder:
            raise ValueError("AdaIR(decoder=False) is a plain Restormer without frequency blocks; it is not built here")
        widths = [dim * 2**level for level in range(4)]  # 48, 96, 192, 384 in the official network
        ffn = ffn_expansion_factor

        # Registered in the official order, so state_dict keys come out in the order of the released checkpoint.
        self.patch_embed = OverlapPatchEmbed(channels, dim)
        self.fre1 = FrequencyBlock(widths[3], heads[2], channels)
        self.fre2 = FrequencyBlock(widths[2], heads[2], channels)
        self.fre3 = FrequencyBlock(widths[1], heads[2], channels)

        self.encoder_level1 = _stage(widths[0], heads[0], ffn, num_blocks[0])
        self.down1_2 = Downsample(widths[0])
        self.encoder_level2 = _stage(widths[1], heads[1], ffn, num_blocks[1])
        self.down2_3 = Downsample(widths[1])
        self.encoder_level3 = _stage(widths[2], heads[2], ffn, num_blocks[2])
        self.down3_4 = Downsample(widths[2])
        self.latent = _stage(widths[3], heads[3], ffn, num_blocks[3])

        self.up4_3 = Upsample(widths[3])
        self.reduce_chan_level3 = nn.Conv2d(widths[3], widths[2], kernel_size=1, bias=False)
        self.decoder_level3 = _stage(widths[2], heads[2], ffn, num_blocks[2])
        self.up3_2 = Upsample(widths[2])
        self.reduce_chan_level2 = nn.Conv2d(widths[2], widths[1], kernel_size=1, bias=False)
        self.decoder_level2 = _stage(widths[1], heads[1], ffn, num_blocks[1])
        # Level 1 keeps the concatenated width widths[1] (no channel reduction), as in Restormer.
        self.up2_1 = Upsample(widths[1])
        self.decoder_level1 = _stage(widths[1], heads[0], ffn, num_blocks[0])

        self.refinement = _stage(widths[1], heads[0], ffn, num_refinement_blocks)
        self.output = nn.Conv2d(widths[1], channels, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore a batch (B, C, H, W) or one image (C, H, W); the result has the input's shape."""
        if x.ndim == 3:
            return self(x.unsqueeze(0)).squeeze(0)
        h, w = x.shape[-2:]
        inp = reflect_pad(x, "AdaIR")

        enc1 = self.encoder_level1(self.patch_embed(inp))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.fre1(inp, self.latent(self.down3_4(enc3)))

        dec3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], dim=1)))
        dec3 = self.fre2(inp, dec3)
        dec2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], dim=1)))
        dec2 = self.fre3(inp, dec2)
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], dim=1))

        out = self.output(self.refinement(dec1)) + inp
        return out[..., :h, :w]
