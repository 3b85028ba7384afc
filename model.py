"""PromptIR (Potlapalli et al., NeurIPS 2023): a Restormer encoder-decoder with prompt blocks in the decoder.

``PromptIR()`` is the official network as released (``PromptIR(decoder=True)``): the same module names, tensor shapes
and forward function, checked number for number against ``../shared/fixtures/promptir_parity``. The six modules the
official forward never calls (``DEAD_MODULES``) are left out; weights that still carry them load anyway.

``enable_fast_path(model)`` (or ``model.set_fast()``) switches to formulations of the same function with less memory
traffic, optionally with every transformer block compiled; the plain path stays the official formulation.

Besides the network this file owns the presets for tests and the demo, the one weight loader for every checkpoint
layout we meet, and freezing modules by name for fine-tuning.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

from utils import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

# Official modules that its forward never calls (215,296 parameters): dropped from checkpoints without a word.
DEAD_MODULES = ("chnl_reduce1", "chnl_reduce2", "chnl_reduce3",
                "reduce_noise_channel_1", "reduce_noise_channel_2", "reduce_noise_channel_3")
# The modules the second fine-tuning stage trains; everything else stays frozen.
STAGE2_MODULES = ("refinement", "output", "decoder_level1", "noise_level1", "reduce_noise_level1", "up2_1")

# Compiled graphs one process may keep for the blocks' shared code: one per distinct block shape (9 per input size
# for the official network), times the training, validation and inference sizes and grad modes a process meets.
COMPILE_RECOMPILE_LIMIT = 128

# The CPU inference path runs each block in bands of rows whose widest intermediate (the feed-forward network's
# hidden maps) holds about BAND_BYTES, and at least BAND_MIN_ROWS rows (each band recomputes two rows).
BAND_BYTES = 8 * 2**20
BAND_MIN_ROWS = 8

PAD_MULTIPLE = 8  # three 2x downsamplings
# Reflection cannot add as many pixels as the side has: sides of 1 to 4 pixels would need 7 to 4 more, 5 needs 3.
MIN_SIZE = 5

PRESETS: dict[str, dict[str, Any]] = {
    "official": {},
    "small": {"dim": 24, "num_blocks": (2, 3, 3, 4), "num_refinement_blocks": 2, "prompt_dims": (32, 64, 160)},
    "tiny": {"dim": 8, "num_blocks": (1, 1, 1, 1), "num_refinement_blocks": 1, "heads": (1, 1, 1, 1),
             "prompt_dims": (8, 16, 16), "prompt_sizes": (16, 8, 4)},
}


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _is_channels_last(x) else torch.contiguous_format


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
        self.fast = False  # set by PromptIR.set_fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return self._forward_fast(x)
        h, w = x.shape[-2:]
        q, k, v = (rearrange(t, "b (head c) h w -> b head c (h w)", head=self.num_heads)
                   for t in self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project_out(rearrange(attn @ v, "b head c (h w) -> b (head c) h w", h=h, w=w))

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same function with less memory traffic, in the memory format of ``x`` (NCHW or channels_last).

        q and k are never normalised in place: the Gram matrix of the raw q and k is divided by the outer product of
        their norms, with the temperature folded in (a C x C division instead of two C x HW ones). ``attn @ v`` and
        ``project_out`` are one matrix, ``W_out @ blockdiag(attn)``, applied to v once, so the per-head output is
        never written. q, k and v stay views of the convolution output: no rearrange copies.
        """
        b, c = x.shape[:2]
        qkv = self.qkv_dwconv(self.qkv(x)).flatten(2)  # (B, 3C, HW), a view in x's memory layout
        qk = qkv[:, :2 * c].unflatten(1, (2, self.num_heads, c // self.num_heads))  # (B, q|k, head, c, HW)
        q, k = qk[:, 0], qk[:, 1]
        # Batch and heads cannot share one batch dimension without copying q and k. On the CPU, where a fresh copy
        # costs more than its arithmetic, one matmul per image instead; on GPUs one batched matmul (fewer launches),
        # and compiled graphs choose their own layouts.
        if b == 1 or x.device.type != "cpu" or torch.compiler.is_compiling():
            gram = _gram(q, k)
        else:
            gram = torch.stack([_gram(qi, ki) for qi, ki in zip(q, k)])
        norms = torch.linalg.vector_norm(qk, dim=-1, dtype=torch.float32 if qk.dtype == torch.float16 else None)
        return _apply_mix(self._mix(gram, norms), qkv[:, 2 * c:], x)

    def _forward_bands(self, x: torch.Tensor, norm: nn.Module, rows: int) -> torch.Tensor:
        """``x + self(norm(x))`` for one image without autograd, ``rows`` rows at a time.

        The Gram matrix and the norms are sums over pixels, so they are summed band by band and q and k are never
        stored whole; only v is. Each band reads one more input row on each side for the 3x3 convolution.
        """
        _, c, h, w = x.shape
        heads = self.num_heads
        acc = torch.promote_types(x.dtype, torch.float32)  # sums in at least float32, also under autocast
        v = gram = squares = None
        for top, bottom, start, stop in _bands(h, rows):
            band = self.qkv_dwconv(self.qkv(norm(x[:, :, start:stop])))[:, :, top - start:bottom - start]
            if v is None:
                v = torch.empty((1, c, h, w), dtype=band.dtype, device=band.device, memory_format=_layout(x))
            v[:, :, top:bottom] = band[:, 2 * c:]
            qk = band[:, :2 * c].flatten(2).unflatten(1, (2, heads, c // heads))
            part, part_squares = _gram(qk[:, 0], qk[:, 1]).to(acc), qk.to(acc).square().sum(dim=-1)
            gram = part if gram is None else gram.add_(part)
            squares = part_squares if squares is None else squares.add_(part_squares)
        return _add_residual(_apply_mix(self._mix(gram, squares.sqrt()), v.flatten(2), x), x)

    def _mix(self, gram: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """``W_out @ blockdiag(attn)`` (B, C, C) from the raw Gram matrices (B, head, c, c) and the norms of q and k
        over the pixels (B, q|k, head, c)."""
        norms = norms.clamp_min(1e-12)  # F.normalize's eps
        attn = (gram * (self.temperature / (norms[:, 0, ..., None] * norms[:, 1, :, None, :]))).softmax(dim=-1)
        b, c = gram.shape[0], self.project_out.out_channels
        w_out = self.project_out.weight.view(c, self.num_heads, c // self.num_heads).to(attn.dtype)
        return torch.einsum("ohi,bhij->bohj", w_out, attn).reshape(b, c, c)


def _gram(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k^T``, summed over the pixels. q and k are not normalised first, so the sums grow with the image (65,536
    pixels at 256x256) past float16's largest value, 65,504: float16 operands are multiplied in float32, with
    autocast off. Other dtypes as they come (bfloat16 has float32's range)."""
    if q.dtype != torch.float16:
        return q @ k.mT
    with torch.autocast(q.device.type, enabled=False):
        return q.float() @ k.float().mT


def _apply_mix(mix: torch.Tensor, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mix @ v`` for v (B, C, HW), shaped and laid out like ``like`` (B, C, H, W)."""
    mix = mix.to(v.dtype)  # the attention is computed in at least float32 where float16 could overflow
    if _is_channels_last(like):
        return (v.mT @ mix.mT).mT.view(like.shape)  # pixels-major result: channels_last
    return (mix @ v).view(like.shape)


def _add_residual(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + y``, into ``y``'s fresh buffer when the dtypes allow (under autocast y may be the lower precision)."""
    return y.add_(x) if y.dtype == x.dtype else x + y


def _bands(height: int, rows: int) -> Iterator[tuple[int, int, int, int]]:
    """(top, bottom, start, stop) per band: output rows ``top:bottom`` of a 3x3 convolution need input rows
    ``start:stop``, one more on each side except at the image border (where the zero padding is the image's own)."""
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        yield top, bottom, max(0, top - 1), min(height, bottom + 1)


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
        self.fast = False  # set by PromptIR.set_fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        if self.fast and not torch.is_grad_enabled():
            return self.project_out(F.gelu(gate).mul_(value))  # one large buffer fewer: allocating it costs more
        return self.project_out(F.gelu(gate) * value)

    def _forward_bands(self, x: torch.Tensor, norm: nn.Module, out: torch.Tensor, rows: int) -> None:
        """Write ``x + self(norm(x))`` into ``out``, ``rows`` rows at a time (one image, no autograd); each band
        reads one more input row on each side for the 3x3 convolution."""
        for top, bottom, start, stop in _bands(x.shape[2], rows):
            hidden = self.dwconv(self.project_in(norm(x[:, :, start:stop])))[:, :, top - start:bottom - start]
            gate, value = hidden.chunk(2, dim=1)
            torch.add(x[:, :, top:bottom], self.project_out(F.gelu(gate).mul_(value)), out=out[:, :, top:bottom])


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
        self.fast = False  # set by PromptIR.set_fast
        self.recompute = False  # set by enable_fast_path(checkpoint=...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and not torch.is_grad_enabled():
            if x.device.type == "cpu":
                return self._forward_bands(x)
            x = _add_residual(self.attn(self.norm1(x)), x)  # no autograd: residuals go into the fresh outputs
            return _add_residual(self.ffn(self.norm2(x)), x)
        if self.recompute and torch.is_grad_enabled():  # keep only the input; recompute the rest in backward
            return torch.utils.checkpoint.checkpoint(self._residual_forward, x, use_reentrant=False,
                                                     preserve_rng_state=False)  # nothing random to replay
        return self._residual_forward(x)

    def _residual_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))

    def _forward_bands(self, x: torch.Tensor) -> torch.Tensor:
        """Without autograd on the CPU: image by image, in bands of rows, so the wide intermediates (3 and 5.3 times
        the channels) stay small enough to be reused from the allocator and the caches instead of being fresh
        memory each time; only maps of the block's own width are allocated whole. The same function as forward."""
        out = torch.empty_like(x)
        rows = max(BAND_MIN_ROWS, BAND_BYTES // (x.shape[-1] * self.ffn.dwconv.out_channels * x.element_size()))
        for i in range(x.shape[0]):
            y = self.attn._forward_bands(x[i:i + 1], self.norm1, rows)
            self.ffn._forward_bands(y, self.norm2, out[i:i + 1], rows)
        return out


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
        self.fast = False  # set by PromptIR.set_fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.linear_layer(x.mean(dim=(-2, -1))).softmax(dim=1)
        prompt = torch.einsum("bl,lchw->bchw", weights, self.prompt_param[0])
        if self.fast and _is_channels_last(x):
            prompt = prompt.contiguous(memory_format=torch.channels_last)  # resize the small map, not the large one
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv3x3(prompt)


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
        self.fast = self.channels_last = False

    def set_fast(self, enabled: bool = True, *, channels_last: bool = True) -> PromptIR:
        """Switch between the plain forward (the official formulation) and the fast one; returns the model.

        The fast path computes the same function with less memory traffic (see ``Attention._forward_fast``) and, with
        ``channels_last``, keeps every feature map in channels-last memory, so the channel LayerNorm needs no
        transposing copies and the convolutions run in their NHWC kernels. Without autograd the residuals are added
        in place, and on the CPU each block runs in bands of rows (``TransformerBlock._forward_bands``). The
        parameters are not touched (names, shapes, values and memory layout), so checkpoints and optimizer states
        move freely between the paths: fused AdamW silently miscomputes when a parameter and its state tensors
        differ in layout.
        """
        self.fast, self.channels_last = enabled, enabled and channels_last
        for module in self.modules():
            if isinstance(module, (Attention, FeedForward, TransformerBlock, PromptGenBlock)):
                module.fast = enabled
            if isinstance(module, TransformerBlock) and not enabled:
                module.recompute = False
        return self

    @staticmethod
    def _prompted(x: torch.Tensor, prompt: PromptGenBlock, noise_level: TransformerBlock,
                  reduce: nn.Conv2d) -> torch.Tensor:
        return reduce(noise_level(torch.cat([x, prompt(x)], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Restore a batch (B, C, H, W) or one image (C, H, W); the result has the input's shape."""
        if x.ndim == 3:
            return self(x.unsqueeze(0)).squeeze(0)
        if x.ndim != 4:
            raise ValueError(f"PromptIR expects (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % PAD_MULTIPLE, -w % PAD_MULTIPLE
        if pad_h >= h or pad_w >= w:
            raise ValueError(f"PromptIR needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels (they are reflect-padded "
                             f"to a multiple of {PAD_MULTIPLE}), got {h}x{w}")
        inp = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x
        if self.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)

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
        return out[..., :h, :w].contiguous() if self.fast else out[..., :h, :w]


def build_model(preset: str = "official", **overrides: Any) -> PromptIR:
    """A PromptIR of a named size (``PRESETS``), with any constructor argument overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PromptIR(**{**PRESETS[preset], **overrides})


def enable_fast_path(model: PromptIR, *, channels_last: bool = True, compile: bool = False,
                     mode: str | None = None, checkpoint: Sequence[str] = ()) -> PromptIR:
    """Put ``model`` on the fast path (``PromptIR.set_fast``) and optionally compile it; returns the model.

    Args:
        model: the network; its parameter names and shapes stay as they are.
        channels_last: keep feature maps in channels-last memory (fastest on CPUs; measure on GPUs). False leaves
            memory formats to PyTorch, as on the plain path.
        compile: compile each ``TransformerBlock`` with ``torch.compile`` in place (regional compilation, static
            shapes). Blocks of one width, head count and input shape share one compiled graph, so the official
            network compiles about ten graphs instead of one huge one. Compilation happens on the first call at
            each shape. Inductor caches its kernels on disk (``TORCHINDUCTOR_CACHE_DIR``, by default under the
            system's temporary folder), so a second process compiles faster. CUDA only: move the model to the GPU
            first (Inductor's CPU code for the multi-head attention softmax wrote out of bounds in torch 2.14, and
            compiling for the CPU takes minutes for a gain the eager fast path already gives).
        mode: ``torch.compile`` mode, for example ``"max-autotune-no-cudagraphs"``; None for the default.
        checkpoint: top-level stages (for example ``("decoder_level1", "refinement")``, the full-resolution blocks
            that hold most of the activation memory) whose blocks keep only their input during training and
            recompute the rest in backward: less memory for about a third more work in those blocks.

    Raises:
        ValueError: ``compile=True`` for a model that is not on a CUDA device, or an unknown stage name.
    """
    if compile and next(model.parameters()).device.type != "cuda":
        raise ValueError("enable_fast_path(compile=True) is for CUDA: move the model to the GPU first "
                         "(model.to('cuda')), or leave compile off on the CPU")
    set_checkpointing(model, checkpoint)
    model.set_fast(True, channels_last=channels_last)
    if compile:
        # Every block runs the same code object at its own shape: allow one graph per distinct block shape.
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), COMPILE_RECOMPILE_LIMIT))
        if hasattr(config, "accumulated_recompile_limit"):
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 2 * COMPILE_RECOMPILE_LIMIT)
        _compile_blocks(model, mode=mode)
    return model


def set_checkpointing(model: PromptIR, stages: Sequence[str]) -> None:
    """Checkpoint the blocks of the named top-level stages during training (fast path) and no others: they keep only
    their input for backward and recompute the rest. Changes no compiled graph but those of the blocks it switches.

    Raises:
        ValueError: a name that is not a stage with transformer blocks (the message lists those).
    """
    stages = [stages] if isinstance(stages, str) else list(stages)
    valid = [name for name, child in model.named_children()
             if any(isinstance(m, TransformerBlock) for m in child.modules())]
    unknown = sorted(set(stages) - set(valid))
    if unknown:
        raise ValueError(f"cannot checkpoint {', '.join(unknown)}; stages with transformer blocks are "
                         f"{', '.join(valid)}")
    for name in valid:
        for module in getattr(model, name).modules():
            if isinstance(module, TransformerBlock):
                module.recompute = name in stages


def _compile_blocks(model: nn.Module, *, mode: str | None) -> None:
    """Compile every ``TransformerBlock`` of ``model`` in place (``nn.Module.compile``: parameter names keep no
    ``_orig_mod.`` prefix). A deep copy of the model (an EMA copy, say) comes out uncompiled."""
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.compile(dynamic=False, mode=mode)


# ------------------------------------------------------------------------------------------------------- weights
# Where the weights sit in a checkpoint, tried in this order: EMA copies first (BasicSR's params_ema, our trainer's
# ema when it kept one), then plain weights (BasicSR's params, our trainer's model); the official release is a
# Lightning checkpoint with "state_dict". Wrappers may nest.
WRAPPER_KEYS = ("params_ema", "ema", "params", "model", "state_dict", "net")
# Added to key names by the official Lightning module, DistributedDataParallel and torch.compile; possibly stacked.
KEY_PREFIXES = ("net.", "module.", "_orig_mod.")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _holds_weights(obj: Any) -> bool:
    return isinstance(obj, nn.Module) or (isinstance(obj, Mapping) and len(obj) > 0)


def _strip_prefixes(key: str) -> str:
    while key.startswith(KEY_PREFIXES):
        key = key[len(next(p for p in KEY_PREFIXES if key.startswith(p))):]
    return key


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The PromptIR weights inside a loaded checkpoint, named as in our model.

    Accepts a plain state dict, a module, or a dict that holds one under a key of ``WRAPPER_KEYS`` (first match wins,
    wrappers may nest). Strips ``KEY_PREFIXES`` from the start of each key, as often as they are stacked, and drops
    the official network's ``DEAD_MODULES``. An EMA copy wins over the plain weights (``params_ema``, our trainer's
    ``ema``: the weights it validated and chose ``best.pth`` by); pass ``checkpoint["model"]`` for the plain ones.

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
                                  f"under one of {', '.join(WRAPPER_KEYS)}; its keys are {', '.join(map(str, obj))}")
        obj = obj[key]
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = _strip_prefixes(key)
        if name in state:
            raise CheckpointError(f"two weights are both named {name!r} once prefixes are stripped")
        if name.split(".", 1)[0] not in DEAD_MODULES:
            state[name] = value
    return state


def _listing(title: str, items: list[str], limit: int = 25) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in items[:limit]) + more


def load_weights(model: nn.Module, source: str | os.PathLike | Any, *, trusted: bool = False,
                 strict: bool = True) -> nn.Module:
    """Load weights of any layout ``extract_state_dict`` knows into ``model`` and return it.

    Args:
        model: the network to fill.
        source: a checkpoint path (read with ``torch.load(weights_only=True)`` through ``utils.load_checkpoint``)
            or an already-loaded checkpoint, state dict or module.
        trusted: allow full unpickling for a file you trust (needed for files that store Python objects).
        strict: every key must match. With ``strict=False`` missing and unexpected keys are logged and skipped;
            shape mismatches are errors either way.

    Raises:
        CheckpointError: the file cannot be read, holds no weights, or does not fit the model; the message lists
            the missing, unexpected and mismatched keys.
    """
    where = str(source) if isinstance(source, (str, os.PathLike)) else "the given weights"
    obj = load_checkpoint(source, trusted=trusted) if isinstance(source, (str, os.PathLike)) else source
    try:
        state = extract_state_dict(obj)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    listed = [("shape mismatches", mismatched)] + ([("missing", missing), ("unexpected", unexpected)] if strict else [])
    problems = [_listing(title, keys) for title, keys in listed if keys]
    if problems:
        raise CheckpointError(f"{where} does not fit this model:\n" + "\n".join(problems) +
                              "\nWas it saved from a model of other sizes? Build the model with the same preset.")
    if missing or unexpected:
        log.warning("%s: skipped %d missing and %d unexpected keys (strict=False): %s", where, len(missing),
                    len(unexpected), ", ".join(missing + unexpected))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model


# ------------------------------------------------------------------------------------------------------- freezing
def freeze_except(model: nn.Module, names: Sequence[str]) -> None:
    """Train only the named top-level modules of ``model`` (for example ``STAGE2_MODULES``); freeze the rest."""
    names = [names] if isinstance(names, str) else list(names)
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
