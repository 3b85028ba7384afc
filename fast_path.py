"""Faster formulations of the official PromptIR (``model.py``) and of the blocks AdaIR (``adair.py``) shares with it:
the same function on the same parameters.

``enable_fast_path(model)`` puts a model on the fast path; ``disable_fast_path(model)`` takes it back to the official
formulation, and ``is_fast(module)`` says which one a module runs. What the fast path changes:

- channels-last memory for every feature map (``channels_last=True``): the channel LayerNorm needs no transposing
  copies and the convolutions run in their NHWC kernels;
- folded attention (``FastAttention``): the Gram matrix of the raw q and k divided by the outer product of their
  norms, and ``attn @ v`` and ``project_out`` merged into one matrix, so q, k and the per-head output are never
  written; a float16 Gram matrix is summed in float32, since its sums over a whole image pass float16's range;
- without autograd: residuals added in place, and on the CPU each block computed in bands of rows
  (``FastTransformerBlock.forward_bands``), so its wide intermediates stay small enough to be reused;
- optionally ``torch.compile`` of each transformer block (``compile=True``, CUDA) and activation recomputation of
  named stages during training (``recompute=``, ``set_recomputation``).

How: every official module whose formulation changes (``PromptIR``, ``TransformerBlock``, ``Attention``,
``FeedForward``, ``PromptGenBlock``) has a subclass here that overrides only ``forward`` and adds no parameter or
buffer; ``enable_fast_path`` assigns each module's ``__class__`` to its subclass and ``disable_fast_path`` assigns it
back. The instance (its ``__dict__``) is never rebuilt, so parameter names, shapes, values and memory layouts, the
state_dict and optimizer states stay exactly those of the official model: checkpoints move freely between the paths
(fused AdamW silently miscomputes when a parameter and its state tensors differ in layout). The subclasses live at
module level, so ``copy.deepcopy`` (the trainer's EMA copy) and pickling keep them, DistributedDataParallel wraps the
model like any other, and ``nn.Module.compile`` compiles the fast forward. Two settings are instance attributes the
subclasses read: ``FastPromptIR.channels_last`` and ``FastTransformerBlock.recompute``.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from adair import AdaIR
from model import Attention, FeedForward, PromptGenBlock, PromptIR, TransformerBlock
from utils import listing

# The CPU inference path runs each block in bands of rows whose widest intermediate (the feed-forward network's
# hidden maps) holds about BAND_BYTES, and at least BAND_MIN_ROWS rows (each band recomputes two rows).
BAND_BYTES = 8 * 2**20
BAND_MIN_ROWS = 8

# Compiled graphs the blocks' shared code may keep: one per distinct block shape (9 per input size for the official
# network), times the training, validation and inference sizes and grad modes a process meets.
COMPILE_RECOMPILE_LIMIT = 128


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _is_channels_last(x) else torch.contiguous_format


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


class FastAttention(Attention):
    """``Attention`` with less memory traffic, in the memory format of its input (NCHW or channels_last).

    q and k are never normalised: the Gram matrix of the raw q and k is divided by the outer product of their norms,
    with the temperature folded in (a C x C division instead of two C x HW ones). ``attn @ v`` and ``project_out``
    are one matrix, ``W_out @ blockdiag(attn)``, applied to v once, so the per-head output is never written. q, k and
    v stay views of the convolution output: no rearrange copies.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward_bands(self, x: torch.Tensor, norm: nn.Module, rows: int) -> torch.Tensor:
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


class FastFeedForward(FeedForward):
    """``FeedForward`` that, without autograd, multiplies gate and value into the GELU's fresh buffer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate).mul_(value))  # one large buffer fewer: allocating it costs more

    def forward_bands(self, x: torch.Tensor, norm: nn.Module, out: torch.Tensor, rows: int) -> None:
        """Write ``x + self(norm(x))`` into ``out``, ``rows`` rows at a time (one image, no autograd); each band
        reads one more input row on each side for the 3x3 convolution."""
        for top, bottom, start, stop in _bands(x.shape[2], rows):
            hidden = self.dwconv(self.project_in(norm(x[:, :, start:stop])))[:, :, top - start:bottom - start]
            gate, value = hidden.chunk(2, dim=1)
            torch.add(x[:, :, top:bottom], self.project_out(F.gelu(gate).mul_(value)), out=out[:, :, top:bottom])


class FastTransformerBlock(TransformerBlock):
    """``TransformerBlock`` whose residuals go into fresh outputs without autograd (in bands of rows on the CPU), and
    which recomputes its activations in backward when ``recompute`` is set (``set_recomputation``)."""

    recompute = False  # per instance once set_recomputation has run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            if x.device.type == "cpu":
                return self.forward_bands(x)
            x = _add_residual(self.attn(self.norm1(x)), x)
            return _add_residual(self.ffn(self.norm2(x)), x)
        if self.recompute:  # keep only the input; recompute the rest in backward (PyTorch calls this checkpointing)
            return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=False,
                                                     preserve_rng_state=False)  # nothing random to replay
        return super().forward(x)

    def forward_bands(self, x: torch.Tensor) -> torch.Tensor:
        """Without autograd on the CPU: image by image, in bands of rows, so the wide intermediates (3 and 5.3 times
        the channels) stay small enough to be reused from the allocator and the caches instead of being fresh
        memory each time; only maps of the block's own width are allocated whole. The same function as forward."""
        out = torch.empty_like(x)
        rows = max(BAND_MIN_ROWS, BAND_BYTES // (x.shape[-1] * self.ffn.dwconv.out_channels * x.element_size()))
        for i in range(x.shape[0]):
            y = self.attn.forward_bands(x[i:i + 1], self.norm1, rows)
            self.ffn.forward_bands(y, self.norm2, out[i:i + 1], rows)
        return out


class FastPromptGenBlock(PromptGenBlock):
    """``PromptGenBlock`` that resizes the small prompt in the features' memory format rather than converting the
    resized map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.linear_layer(x.mean(dim=(-2, -1))).softmax(dim=1)
        prompt = torch.einsum("bl,lchw->bchw", weights, self.prompt_param[0])
        prompt = prompt.contiguous(memory_format=_layout(x))
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv3x3(prompt)


class _FastNetwork(nn.Module):
    """A whole network whose feature maps are channels-last when ``channels_last`` is set; its output is
    contiguous."""

    channels_last = True  # per instance once enable_fast_path has run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # reflect padding and every layer keep the format
        return super().forward(x).contiguous()


class FastPromptIR(_FastNetwork, PromptIR):
    """``PromptIR`` on the fast path (``_FastNetwork``)."""


class FastAdaIR(_FastNetwork, AdaIR):
    """``AdaIR`` on the fast path (``_FastNetwork``): its transformer blocks are the shared fast ones; its frequency
    blocks run as they are (in the features' memory format)."""


# The official class of each module the fast path changes, and its fast subclass.
FAST_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    PromptIR: FastPromptIR, AdaIR: FastAdaIR, TransformerBlock: FastTransformerBlock, Attention: FastAttention,
    FeedForward: FastFeedForward, PromptGenBlock: FastPromptGenBlock}
OFFICIAL_CLASSES = {fast: official for official, fast in FAST_CLASSES.items()}
# Instance attributes the fast subclasses read, removed when a module goes back to its official class.
FAST_SETTINGS = ("channels_last", "recompute")


def is_fast(module: nn.Module) -> bool:
    """Whether ``module`` (a whole model, or one of its blocks) runs its fast formulation.

    Args:
        module: a model or a module of one.
    """
    return type(module) in OFFICIAL_CLASSES


def enable_fast_path(model: nn.Module, *, channels_last: bool = True, compile: bool = False,
                     mode: str | None = None, recompute: Sequence[str] = ()) -> nn.Module:
    """Put ``model`` on the fast path (see the module docstring) and return it; calling it again changes settings.

    Args:
        model: a PromptIR (or any module holding its blocks); its parameters are not touched.
        channels_last: keep feature maps in channels-last memory (fastest on CPUs; measure on GPUs). False leaves
            memory formats to PyTorch, as on the official path.
        compile: compile each ``TransformerBlock`` with ``torch.compile`` in place (``compile_blocks``: one graph
            per block shape, the recompile limit scoped to those calls). CUDA only: move the model to the GPU first
            (Inductor's CPU code for the multi-head attention softmax wrote out of bounds in torch 2.14, and
            compiling for the CPU takes minutes for a gain the eager fast path already gives).
        mode: ``torch.compile`` mode, for example ``"max-autotune-no-cudagraphs"``; None for the default.
        recompute: top-level stages whose blocks recompute their activations in backward (``set_recomputation``).

    Raises:
        ValueError: ``compile=True`` for a model that is not on a CUDA device, or an unknown stage name; the model is
            left as it was.
    """
    if compile and next(model.parameters()).device.type != "cuda":
        raise ValueError("enable_fast_path(compile=True) is for CUDA: move the model to the GPU first "
                         "(model.to('cuda')), or leave compile off on the CPU")
    stages = _recompute_stages(model, recompute)
    for module in model.modules():
        if type(module) in FAST_CLASSES:
            module.__class__ = FAST_CLASSES[type(module)]
        if isinstance(module, _FastNetwork):
            module.channels_last = channels_last
    _set_recompute(model, stages)
    if compile:
        compile_blocks(model, mode=mode)
    return model


def disable_fast_path(model: nn.Module) -> nn.Module:
    """Take ``model`` back to the official formulation, uncompiled and without recomputation; returns it.

    Args:
        model: a model that ``enable_fast_path`` changed (any other is returned as it is).
    """
    for module in model.modules():
        if is_fast(module):
            module.__class__ = OFFICIAL_CLASSES[type(module)]
            for name in FAST_SETTINGS:
                module.__dict__.pop(name, None)
            if isinstance(module, TransformerBlock):
                module.__dict__.pop("_compiled_call_impl", None)  # set by nn.Module.compile (compile_blocks)
    return model


def set_recomputation(model: nn.Module, stages: Sequence[str]) -> None:
    """Recompute the activations of the blocks of the named top-level stages during training, and of no others.

    Those blocks keep only their input for backward and recompute the rest (``torch.utils.checkpoint``): less memory
    for about a third more work in them. ``("decoder_level1", "refinement")``, the full-resolution blocks, hold most
    of the activation memory. Changes no compiled graph but those of the blocks it switches.

    Args:
        model: a model on the fast path.
        stages: names of top-level modules that hold transformer blocks; empty for none.

    Raises:
        ValueError: a name that is not a stage with transformer blocks (the message lists those), or a model that
            is not on the fast path.
    """
    resolved = _recompute_stages(model, stages)
    if not all(is_fast(m) for name in resolved for m in getattr(model, name).modules()
               if isinstance(m, TransformerBlock)):
        raise ValueError("recomputation is part of the fast path: call enable_fast_path(model, recompute=...)")
    _set_recompute(model, resolved)


def _block_stages(model: nn.Module) -> list[str]:
    return [name for name, child in model.named_children()
            if any(isinstance(m, TransformerBlock) for m in child.modules())]


def _recompute_stages(model: nn.Module, stages: Sequence[str]) -> list[str]:
    stages = [stages] if isinstance(stages, str) else list(stages)
    valid = _block_stages(model)
    unknown = sorted(set(stages) - set(valid))
    if unknown:
        raise ValueError(f"cannot recompute {', '.join(unknown)}; stages with transformer blocks are {listing(valid)}")
    return stages


def _set_recompute(model: nn.Module, stages: Sequence[str]) -> None:
    for name in _block_stages(model):
        for module in getattr(model, name).modules():
            if isinstance(module, FastTransformerBlock):
                module.recompute = name in stages


def compile_blocks(model: nn.Module, *, mode: str | None = None) -> None:
    """Compile every ``TransformerBlock`` of ``model`` in place with ``nn.Module.compile`` (regional compilation).

    Parameter names keep no ``_orig_mod.`` prefix, and a deep copy of the model (an EMA copy, say) comes out
    uncompiled. Blocks of one width, head count and input shape share one compiled graph (static shapes), so the
    official network compiles about ten graphs instead of one huge one, on the first call at each shape. Inductor
    caches its kernels on disk (``TORCHINDUCTOR_CACHE_DIR``, by default under the system's temporary folder), so a
    second process compiles faster. Each block's compile call carries its own recompile limit,
    ``COMPILE_RECOMPILE_LIMIT``; the process-wide one is left alone (see ``_recompile_limit`` for older PyTorch).

    Args:
        model: the model whose blocks are compiled.
        mode: ``torch.compile`` mode; None for the default.
    """
    limit = _recompile_limit()
    for module in model.modules():
        if isinstance(module, TransformerBlock):
            module.compile(dynamic=False, mode=mode, **limit)


def _recompile_limit() -> dict[str, int]:
    """``torch.compile``'s ``recompile_limit`` for the blocks' graphs, scoped to their compile calls.

    All blocks run one code object, whose graphs count against one limit (8 by default): one graph per distinct block
    shape needs ``COMPILE_RECOMPILE_LIMIT``. PyTorch versions whose ``torch.compile`` takes no ``recompile_limit``
    have only the process-wide one: ``raise_process_recompile_limit`` raises that instead.
    """
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": COMPILE_RECOMPILE_LIMIT}
    raise_process_recompile_limit()
    return {}


def raise_process_recompile_limit() -> None:
    """Raise TorchDynamo's process-wide recompile limits to at least ``COMPILE_RECOMPILE_LIMIT`` graphs per code
    object (and twice that in all), for PyTorch versions whose ``torch.compile`` cannot scope the limit to one call.
    It changes the limit for everything the process compiles; ``compile_blocks`` calls it on those versions only."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), COMPILE_RECOMPILE_LIMIT))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 2 * COMPILE_RECOMPILE_LIMIT)
