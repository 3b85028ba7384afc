"""Tests for GFL_Loss.py: reference values, the epoch-driven frequency mask, odd sizes, autocast, choosing by name,
the FFT loss term."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from GFL_Loss import (LOSSES, CharbonnierLoss, FFTLoss, GuidedFrequencyLoss, L1Loss, WithFFT, build_loss,
                      fft_weight_option)


def _relative_error(value, reference):
    return abs(value - reference) / abs(reference)


def _numpy_gfl(pred, target, *, start, end, num_epochs, epoch, eps=1e-3):
    """Independent float64 NumPy version of the definition in fixtures/gfl/README.md, loops and all."""
    coords = np.arange(5, dtype=np.float32) - 2
    profile = np.exp(-coords ** 2 / np.float32(2))
    kernel = np.outer(profile, profile)
    kernel = (kernel / kernel.sum()).astype(np.float64)

    def blur(x):
        padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
        height, width = x.shape[-2:]
        return sum(kernel[i, j] * padded[..., i:i + height, j:j + width] for i in range(5) for j in range(5))

    def laplacian(x):
        kept = np.zeros_like(x)
        kept[..., ::2, ::2] = 4 * blur(x)[..., ::2, ::2]
        return x - blur(kept)

    end_t = int(start + (end - start) * min(epoch / num_epochs, 1))
    mask = np.ones(pred.shape[-1])
    mask[start:end_t] = 0
    spectral = (np.fft.fft2(pred, norm="ortho") - np.fft.fft2(target, norm="ortho")) * mask
    total = ((pred - target) ** 2 + spectral.real ** 2 + spectral.imag ** 2
             + (laplacian(pred) - laplacian(target)) ** 2 + eps ** 2)
    return np.sqrt(total).mean()


def test_gfl_reproduces_reference_cases(shared):
    """Every fixture case (loss and sum of |d loss / d pred|) is reproduced in float64 to 1e-10 relative."""
    folder = shared("fixtures", "gfl")
    pred = torch.from_numpy(np.load(folder / "pred.npy"))
    target = torch.from_numpy(np.load(folder / "target.npy"))
    cases = json.loads((folder / "cases.json").read_text())
    assert pred.dtype == torch.float64 and len(cases) > 0
    for case in cases:
        loss_fn = GuidedFrequencyLoss(**case["config"], eps=case["eps"])
        leaf = pred.clone().requires_grad_(True)
        loss = loss_fn(leaf, target, case["epoch"])
        loss.backward()
        where = f"{case['config']} epoch {case['epoch']}"
        assert _relative_error(loss.item(), case["loss"]) <= 1e-10, where
        assert _relative_error(leaf.grad.abs().sum().item(), case["grad_sum_abs"]) <= 1e-10, where


def test_gfl_without_epoch_says_to_pass_it():
    """Calling GFL without an epoch fails with a message telling the caller to pass the epoch."""
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(TypeError, match="epoch"):
        GuidedFrequencyLoss()(x, x)
    with pytest.raises(ValueError, match="epoch"):
        GuidedFrequencyLoss()(x, x, -1)


def test_gfl_mask_moves_with_epoch():
    """With a white-noise difference (energy in every frequency column) the loss falls as the masked band
    [start, end_t) widens from nothing at epoch 0 to [4, 60) at num_epochs."""
    loss_fn = GuidedFrequencyLoss(start_frequency=4, end_frequency=60, num_epochs=10)
    generator = torch.Generator().manual_seed(5)
    pred = 0.1 * torch.randn(2, 3, 32, 64, dtype=torch.float64, generator=generator)
    target = torch.zeros_like(pred)
    epochs = (0, 2, 5, 10)
    assert [loss_fn.mask_end(epoch) for epoch in epochs] == [4, 15, 32, 60]
    losses = [loss_fn(pred, target, epoch).item() for epoch in epochs]
    assert losses[0] > losses[1] > losses[2] > losses[3]
    assert losses[0] > 1.2 * losses[3]


def test_gfl_epoch_beyond_num_epochs_clamps():
    """Epochs past num_epochs give exactly the loss of num_epochs; fractional epochs are accepted."""
    loss_fn = GuidedFrequencyLoss(start_frequency=2, end_frequency=30, num_epochs=8)
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 2, 3, 24, 40, generator=generator)
    at_end = loss_fn(pred, target, 8)
    assert loss_fn.mask_end(8) == loss_fn.mask_end(80) == 30
    assert torch.equal(loss_fn(pred, target, 80), at_end)
    assert torch.equal(loss_fn(pred, target, 8000.5), at_end)
    assert loss_fn.mask_end(4.5) == int(2 + 28 * 4.5 / 8)


def test_gfl_odd_size_matches_numpy_reference():
    """On 37x45 images D/U keep the last row and column and U restores the input size; loss matches NumPy."""
    generator = torch.Generator().manual_seed(1)
    pred, target = torch.rand(2, 2, 3, 37, 45, dtype=torch.float64, generator=generator)
    leaf = pred.clone().requires_grad_(True)
    loss = GuidedFrequencyLoss(start_frequency=3, end_frequency=40, num_epochs=10)(leaf, target, 4)
    loss.backward()
    expected = _numpy_gfl(pred.numpy(), target.numpy(), start=3, end=40, num_epochs=10, epoch=4)
    assert _relative_error(loss.item(), expected) <= 1e-8
    assert leaf.grad.shape == pred.shape and torch.isfinite(leaf.grad).all()
    assert leaf.grad[..., -1, :].abs().sum() > 0 and leaf.grad[..., :, -1].abs().sum() > 0


def test_gfl_treats_channels_independently():
    """The loss of a 3-channel batch equals the mean of the losses of each channel alone (no mixing across them)."""
    generator = torch.Generator().manual_seed(2)
    pred, target = torch.rand(2, 2, 3, 20, 28, dtype=torch.float64, generator=generator)
    loss_fn = GuidedFrequencyLoss(start_frequency=2, end_frequency=20, num_epochs=5)
    per_channel = [loss_fn(pred[:, c:c + 1], target[:, c:c + 1], 3) for c in range(3)]
    assert torch.allclose(loss_fn(pred, target, 3), torch.stack(per_channel).mean(), rtol=1e-12, atol=0)


def test_gfl_keeps_no_state():
    """The Gaussian kernel is not stored in the state dict, so checkpoints do not depend on the loss."""
    assert GuidedFrequencyLoss().state_dict() == {}


def test_charbonnier_matches_hand_computation():
    """Charbonnier is mean(sqrt(d^2 + eps^2)): sqrt(0+.25)=.5, sqrt(1.44+.25)=1.3, sqrt(.140625+.25)=.625."""
    pred = torch.tensor([0.0, 1.2, -0.375, -1.2], dtype=torch.float64)
    target = torch.zeros(4, dtype=torch.float64)
    assert CharbonnierLoss(eps=0.5)(pred, target).item() == pytest.approx((0.5 + 1.3 + 0.625 + 1.3) / 4, rel=1e-15)
    assert CharbonnierLoss()(target, target).item() == pytest.approx(1e-3, rel=1e-12)


def test_l1_is_mean_absolute_error():
    """L1Loss is the mean absolute difference and ignores the epoch."""
    pred = torch.tensor([[0.5, -0.25], [1.0, 0.0]])
    assert L1Loss()(pred, torch.zeros(2, 2), 7).item() == pytest.approx(0.4375)


@pytest.mark.parametrize("name", LOSSES)
def test_losses_pass_gradients(name):
    """Each loss gives a finite scalar and a finite, non-zero gradient with respect to the prediction."""
    generator = torch.Generator().manual_seed(3)
    pred = torch.rand(2, 3, 16, 24, generator=generator).requires_grad_(True)
    target = torch.rand(2, 3, 16, 24, generator=generator)
    loss = build_loss(name, num_epochs=10)(pred, target, 5)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_build_loss_by_name():
    """Names map to the right classes, num_epochs reaches GFL, and an unknown name lists the valid ones."""
    assert isinstance(build_loss("charbonnier"), CharbonnierLoss)
    assert isinstance(build_loss("l1"), L1Loss)
    assert build_loss("GFL").num_epochs == 100
    assert build_loss("gfl", num_epochs=250).num_epochs == 250
    with pytest.raises(ValueError) as error:
        build_loss("l2")
    assert all(name in str(error.value) for name in LOSSES)


def test_shape_mismatch_is_reported():
    """A prediction and a target of different shapes fail with both shapes in the message."""
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\).*\(1, 3, 8, 9\)"):
        CharbonnierLoss()(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_gfl_under_bf16_autocast_matches_float32():
    """Under CPU bf16 autocast the convolution and FFT stay in float32 (the loss matches a float64 computation to
    1e-5, which a bf16 convolution misses), and a bf16 model output is upcast: float32 loss, finite gradients."""
    generator = torch.Generator().manual_seed(4)
    pred, target = torch.rand(2, 2, 3, 24, 32, generator=generator)
    loss_fn = GuidedFrequencyLoss(start_frequency=2, end_frequency=20, num_epochs=10)
    reference = loss_fn(pred.double(), target.double(), 3).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss_fn(pred, target, 3)
        layer = nn.Conv2d(3, 3, 3, padding=1)
        output = layer(pred)
        from_bf16 = loss_fn(output, target, 3)
    assert inside.dtype == torch.float32 and torch.allclose(inside, reference, rtol=1e-5, atol=0)
    assert output.dtype == torch.bfloat16 and from_bf16.dtype == torch.float32
    assert torch.allclose(from_bf16, loss_fn(output.float(), target, 3), rtol=1e-6, atol=0)
    from_bf16.backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    assert loss_fn(pred.half(), target, 3).dtype == torch.float32


def test_fft_loss_matches_hand_computation():
    """FFTLoss is the mean of |real| and |imaginary| parts of the unnormalised 2-D FFT of pred - target, worked out
    by hand: a 2x2 map [[1, 2], [3, 4]] has the spectrum [[10, -2], [-4, 0]] (all real): 16 / 8 = 2; the row
    [0, 1, 0] has 1, -1/2 - i sqrt(3)/2, -1/2 + i sqrt(3)/2: (2 + sqrt(3)) / 6; a delta has a flat spectrum of ones."""
    loss = FFTLoss()
    grid = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    assert loss(grid, torch.zeros_like(grid)).item() == pytest.approx(2.0, rel=1e-14)
    assert loss(grid + 5, torch.full_like(grid, 5.0)).item() == pytest.approx(2.0, rel=1e-14)  # only the difference
    row = torch.tensor([[[[0.0, 1.0, 0.0]]]], dtype=torch.float64)
    assert loss(row, torch.zeros_like(row)).item() == pytest.approx((2 + math.sqrt(3)) / 6, rel=1e-14)
    delta = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    delta[..., 0, 0] = 1
    assert loss(delta, torch.zeros_like(delta)).item() == pytest.approx(0.5, rel=1e-14)


def test_fft_loss_transforms_each_channel_alone():
    """The FFT runs over height and width of each channel of each image: the loss of a batch is the mean of the
    losses of its (image, channel) maps, which a 3-D or 4-D FFT mixing channels or images would not give."""
    generator = torch.Generator().manual_seed(5)
    pred, target = torch.rand(2, 2, 3, 8, 12, generator=generator, dtype=torch.float64)
    maps = [FFTLoss()(pred[b, c], target[b, c]).item() for b in range(2) for c in range(3)]
    assert FFTLoss()(pred, target).item() == pytest.approx(sum(maps) / len(maps), rel=1e-12)
    mixed = torch.view_as_real(torch.fft.fftn(pred - target, dim=(-3, -2, -1))).abs().mean().item()
    assert FFTLoss()(pred, target).item() != pytest.approx(mixed, rel=1e-3)


@pytest.mark.parametrize("name", LOSSES)
def test_build_loss_adds_the_weighted_fft_term(name):
    """build_loss(name, fft_weight=W) is the named loss plus W x FFTLoss, for every loss; W = 0 is the loss alone."""
    generator = torch.Generator().manual_seed(6)
    pred, target = torch.rand(2, 2, 3, 16, 16, generator=generator, dtype=torch.float64)
    base = build_loss(name, num_epochs=10)
    combined = build_loss(name, num_epochs=10, fft_weight=0.1)
    assert isinstance(combined, WithFFT) and type(build_loss(name, fft_weight=0.0)) is type(base)
    expected = base(pred, target, 3) + 0.1 * FFTLoss()(pred, target)
    assert combined(pred, target, 3).item() == pytest.approx(expected.item(), rel=1e-14)
    with pytest.raises(ValueError, match="fft_weight"):
        build_loss(name, fft_weight=-0.1)


def test_fft_loss_under_bf16_autocast_is_float32():
    """Under CPU bf16 autocast, and for a bf16 or fp16 prediction, the FFT term is computed in float32: it matches
    the float64 value to 1e-6 relative for float32 inputs, and equals the loss of the upcast prediction; the
    gradient reaches a bf16 layer finite."""
    generator = torch.Generator().manual_seed(7)
    pred, target = torch.rand(2, 2, 3, 32, 32, generator=generator)
    loss_fn = build_loss("l1", fft_weight=0.1)
    reference = loss_fn(pred.double(), target.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss_fn(pred, target)
        layer = nn.Conv2d(3, 3, 3, padding=1)
        output = layer(pred)
        from_bf16 = loss_fn(output, target)
    assert inside.dtype == torch.float32 and inside.item() == pytest.approx(reference.item(), rel=1e-6)
    assert output.dtype == torch.bfloat16 and from_bf16.dtype == torch.float32
    assert from_bf16.item() == pytest.approx(loss_fn(output.float(), target).item(), rel=1e-6)
    from_bf16.backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    assert FFTLoss()(pred.half(), target).dtype == torch.float32


@pytest.mark.parametrize("text, value", [("0", 0.0), ("0.1", 0.1), ("1e-2", 0.01)])
def test_fft_weight_option_accepts_weights(text, value):
    """--fft_weight takes any finite number >= 0."""
    assert fft_weight_option(text) == value


@pytest.mark.parametrize("text", ["-0.1", "nan", "inf", "heavy"])
def test_fft_weight_option_rejects_non_weights(text):
    """A negative, non-finite or non-numeric --fft_weight is an argparse error that names the value and the fix."""
    with pytest.raises(argparse.ArgumentTypeError, match=r"number >= 0"):
        fft_weight_option(text)
