"""Tests for benchmarks/tlc.py (the TLC prototype bench_recipe.py measures): exactly the global result when the
window covers the map, local windows otherwise, the local mean, the fast path, bf16, deep copies, undoing it."""
import copy

import pytest
import torch
from einops import rearrange

from benchmarks import tlc
from fast_path import enable_fast_path
from model import Attention, PromptGenBlock, build_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny").eval()


def _image(side=48, seed=1):
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_window_covering_the_image_is_exactly_the_global_result(tiny):
    """With a window at least the image, every local module runs its own forward: the output equals the model's
    bit for bit, on the official formulation and on the fast path."""
    model, x = copy.deepcopy(tiny), _image()
    reference = model(x)
    tlc.enable_tlc(model, window=48)
    assert torch.equal(model(x), reference)
    fast = enable_fast_path(copy.deepcopy(tiny))
    fast_reference = fast(x)
    tlc.enable_tlc(fast, window=1000)
    assert torch.equal(fast(x), fast_reference)


@torch.no_grad()
def test_smaller_window_changes_the_output_and_disable_restores_it(tiny):
    """A window smaller than the image changes the restoration (the statistics are local), and disable_tlc puts
    every module back to its class: the output is the model's again."""
    model, x = copy.deepcopy(tiny), _image()
    reference = model(x)
    tlc.enable_tlc(model, window=24)
    attn = model.encoder_level1[0].attn
    assert isinstance(attn, tlc.LocalAttention) and isinstance(attn, Attention)
    assert isinstance(model.prompt1, tlc.LocalPromptGenBlock) and isinstance(model.prompt1, PromptGenBlock)
    assert (model(x) - reference).abs().max() > 1e-4
    tlc.disable_tlc(model)
    assert type(model.encoder_level1[0].attn) is Attention and type(model.prompt1) is PromptGenBlock
    assert torch.equal(model(x), reference)
    assert not model._forward_pre_hooks


@torch.no_grad()
def test_local_attention_is_the_global_attention_of_each_window():
    """On a 16x8 map with 8-pixel windows (two windows, no overlap), each half of the output is the attention of
    that half's q, k and v (computed on the whole map), projected: an independent computation of the definition."""
    torch.manual_seed(2)
    attn = Attention(8, 2).eval()
    x = torch.rand(1, 8, 16, 8)
    qkv = attn.qkv_dwconv(attn.qkv(x))
    halves = []
    for part in (qkv[..., :8, :], qkv[..., 8:, :]):
        q, k, v = (rearrange(t, "b (h c) y x -> b h c (y x)", h=2) for t in part.chunk(3, dim=1))
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        a = (q @ k.transpose(-2, -1) * attn.temperature).softmax(dim=-1)
        halves.append(rearrange(a @ v, "b h c (y x) -> b (h c) y x", y=8))
    expected = attn.project_out(torch.cat(halves, dim=2))
    local = tlc.enable_tlc(torch.nn.Sequential(attn), window=8)
    local[0].tlc.image = (16, 8)
    assert torch.allclose(local(x), expected, atol=1e-6)


def test_local_mean_matches_brute_force():
    """local_mean is the mean over the window centred on each pixel, clamped inside the map (border pixels take
    the nearest whole window), checked pixel by pixel on a 7x9 map with a 3x4 window."""
    x = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(3))
    out = tlc.local_mean(x, (3, 4))
    for i in range(7):
        for j in range(9):
            top, left = min(max(i - 1, 0), 7 - 3), min(max(j - 1, 0), 9 - 4)
            expected = x[..., top:top + 3, left:left + 4].mean(dim=(-2, -1))
            assert torch.allclose(out[..., i, j], expected, atol=1e-6), (i, j)
    assert torch.allclose(tlc.local_mean(x, (7, 9)), x.mean(dim=(-2, -1), keepdim=True).expand_as(x), atol=1e-6)


@torch.no_grad()
def test_fast_path_bf16_and_deepcopy_keep_the_local_result(tiny):
    """TLC on the fast path gives the official formulation's TLC result (within float32 rounding); a deep copy (an
    ensemble's or EMA's) computes the same; under CPU bf16 autocast it stays within bf16 rounding of float32."""
    x = _image(64)
    official = tlc.enable_tlc(copy.deepcopy(tiny), window=24)(x)
    fast = tlc.enable_tlc(enable_fast_path(copy.deepcopy(tiny)), window=24)
    assert torch.allclose(fast(x), official, atol=1e-5)
    assert torch.allclose(copy.deepcopy(fast)(x), official, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fast(x)
    assert torch.isfinite(low).all() and (low.float() - official).abs().max() < 0.05


def test_window_for_crop_and_bad_window():
    """The window is 1.5 x the training crop (TLC's default); a window under one pixel, or a model without
    attention or prompt blocks, is refused with a message."""
    assert tlc.window_for_crop(128) == 192 and tlc.window_for_crop(48) == 72
    with pytest.raises(ValueError, match="at least 1 pixel"):
        tlc.enable_tlc(build_model("tiny"), window=0)
    with pytest.raises(ValueError, match="no PromptIR attention"):
        tlc.enable_tlc(torch.nn.Conv2d(3, 3, 1), window=8)


def test_training_crop_reads_the_checkpoint_options():
    """The crop is --patch_size, or the last --progressive phase's; whole images, a foreign checkpoint without
    options, or a last phase of whole images give None (no crop to scale the window from)."""
    assert tlc.training_crop({"args": {"patch_size": 128, "progressive": None}}) == 128
    assert tlc.training_crop({"args": {"patch_size": None, "progressive": ["64:8:2", "96:4:2"]}}) == 96
    assert tlc.training_crop({"args": {"patch_size": 64, "progressive": ["64:8:2", "whole:2:2"]}}) is None
    assert tlc.training_crop({"args": {"patch_size": None}}) is None
    assert tlc.training_crop({"model": {}}) is None and tlc.training_crop(None) is None

