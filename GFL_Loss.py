"""Training losses: Charbonnier, L1, the Guided Frequency Loss and the FFT loss term, and choosing one by name.

Every loss is an ``nn.Module`` called as ``loss(pred, target, epoch=None)``; only the Guided Frequency Loss uses the
epoch. ``build_loss(name, fft_weight=W)`` adds ``W x FFTLoss`` (MoCE-IR's and BioIR's frequency term) to any of them.
Half-precision inputs (for example a model's output under ``torch.autocast``) are upcast to float32, so the
loss arithmetic, the Gaussian convolution and the FFT never run in float16 or bfloat16.
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("charbonnier", "gfl", "l1")


def _common_dtype(pred, target):
    """Check that ``pred`` and ``target`` have one shape and cast them to one dtype of at least float32 precision.

    Args:
        pred (Tensor): Restored images.
        target (Tensor): Clean images of the same shape.

    Returns:
        tuple[Tensor, Tensor]: Both tensors in the promoted dtype (float16 and bfloat16 become float32).
    """
    if pred.shape != target.shape:
        raise ValueError(f"GFL_Loss.py: pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}; "
                         "pass a prediction and its target of the same shape")
    dtype = torch.promote_types(pred.dtype, target.dtype)
    if not dtype.is_floating_point or dtype.itemsize < 4:
        dtype = torch.float32
    return pred.to(dtype), target.to(dtype)


class CharbonnierLoss(nn.Module):
    """Charbonnier loss ``mean(sqrt((pred - target)^2 + eps^2))``, the smooth L1 of MPRNet and Restormer.

    Args:
        eps (float): Smoothing constant; the loss behaves like L2 for differences below it and like L1 above.
            Default: 1e-3.
    """

    def __init__(self, *, eps=1e-3):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"GFL_Loss.py: CharbonnierLoss needs eps > 0, got {eps}")
        self.eps = eps

    def forward(self, pred, target, epoch=None):
        """Return the scalar loss; ``epoch`` is accepted for a uniform call and ignored."""
        pred, target = _common_dtype(pred, target)
        return torch.sqrt((pred - target) ** 2 + self.eps ** 2).mean()


class L1Loss(nn.Module):
    """Mean absolute error, the loss of the official PromptIR recipe."""

    def forward(self, pred, target, epoch=None):
        """Return the scalar loss; ``epoch`` is accepted for a uniform call and ignored."""
        pred, target = _common_dtype(pred, target)
        return F.l1_loss(pred, target)


def _gaussian_kernel(*, dtype, device, size=5, sigma=1.0):
    """Return a normalised ``size`` x ``size`` Gaussian of shape (1, 1, size, size) in ``dtype``.

    The weights are computed in float32 and then cast, as the authors' package does: the reference values in
    ``fixtures/gfl`` carry that rounding (an exact float64 kernel moves the loss by about 1e-9 relative).
    """
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    profile = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel = torch.outer(profile, profile)
    return (kernel / kernel.sum()).to(dtype).view(1, 1, size, size)


def _blur(x, kernel):
    """Gaussian blur of each channel of (B, C, H, W) alone (depthwise) with replicate padding, keeping the size."""
    pad = kernel.shape[-1] // 2
    channels = x.shape[1]
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="replicate"), kernel.expand(channels, 1, -1, -1),
                    groups=channels)


def _downsample(x):
    """D: keep every second row and column, starting at 0 (odd sizes keep the last row or column)."""
    return x[..., ::2, ::2]


def _upsample(x, size):
    """U: put the values back at the positions ``_downsample`` kept, times 4, zeros elsewhere, in a map of ``size``."""
    out = x.new_zeros(*x.shape[:-2], *size)
    out[..., ::2, ::2] = 4 * x
    return out


class GuidedFrequencyLoss(nn.Module):
    """Guided Frequency Loss (Benjdira, Ali and Koubaa, arXiv 2309.15563).

    With ``d = pred - target`` the loss is ``mean(sqrt(d^2 + |M * (F(pred) - F(target))|^2
    + (L(pred) - L(target))^2 + eps^2))``: a Charbonnier term on the pixels, on a Laplacian pyramid level
    ``L(x) = x - G(U(D(G(x))))`` and on the masked orthonormal 2-D FFT ``F``. The mask ``M`` keeps the frequency
    columns ``[0, start)`` and ``[end_t, W)``, where ``end_t`` grows from ``start_frequency`` at epoch 0 to
    ``end_frequency`` at ``num_epochs`` (and stays there), so the frequency term first covers every column and then
    narrows to the lowest and highest ones. The whole loss is linear in ``pred - target`` up to the square root, so it
    is computed on the difference; each channel of each image is filtered alone (a depthwise convolution).

    Args:
        start_frequency (int): First frequency column of the masked band. Default: 10.
        end_frequency (int): End (exclusive) of the masked band once ``num_epochs`` is reached. Default: 255.
        num_epochs (int | float): Epoch at which the mask stops growing. Default: 100.
        eps (float): Charbonnier constant. Default: 1e-3.
    """

    def __init__(self, *, start_frequency=10, end_frequency=255, num_epochs=100, eps=1e-3):
        super().__init__()
        if not 0 <= start_frequency <= end_frequency:
            raise ValueError("GFL_Loss.py: GuidedFrequencyLoss needs 0 <= start_frequency <= end_frequency, got "
                             f"start_frequency={start_frequency}, end_frequency={end_frequency}")
        if num_epochs <= 0:
            raise ValueError(f"GFL_Loss.py: GuidedFrequencyLoss needs num_epochs > 0, got {num_epochs}")
        if eps <= 0:
            raise ValueError(f"GFL_Loss.py: GuidedFrequencyLoss needs eps > 0, got {eps}")
        self.start_frequency = start_frequency
        self.end_frequency = end_frequency
        self.num_epochs = num_epochs
        self.eps = eps

    def extra_repr(self):
        return (f"start_frequency={self.start_frequency}, end_frequency={self.end_frequency}, "
                f"num_epochs={self.num_epochs}, eps={self.eps}")

    def mask_end(self, epoch):
        """Return ``end_t``, the first kept frequency column above the masked band at ``epoch``.

        Args:
            epoch (int | float): Training progress in epochs (fractions allowed); clamped at ``num_epochs``.
        """
        if epoch is None:
            raise TypeError("GFL_Loss.py: GuidedFrequencyLoss needs the training progress: call it as "
                            "loss(pred, target, epoch) with the current epoch (0-based); without it the frequency "
                            "mask never moves")
        epoch = float(epoch)
        if epoch < 0:
            raise ValueError(f"GFL_Loss.py: GuidedFrequencyLoss got epoch={epoch}; pass an epoch >= 0")
        start, end = self.start_frequency, self.end_frequency
        return int(start + (end - start) * min(epoch / self.num_epochs, 1))

    def forward(self, pred, target, epoch=None):
        """Return the scalar loss.

        Args:
            pred (Tensor): Restored images, (..., H, W), any leading dims (usually (B, C, H, W)).
            target (Tensor): Clean images of the same shape.
            epoch (int | float): Current epoch; required.
        """
        end_t = self.mask_end(epoch)
        pred, target = _common_dtype(pred, target)
        height, width = pred.shape[-2:]
        # Autocast would run the convolution in half precision; everything here stays in the upcast dtype.
        with torch.autocast(device_type=pred.device.type, enabled=False):
            # Every (image, channel) map becomes a channel of one batch item: the depthwise convolution over many
            # channels is far faster on the CPU than a one-channel convolution over a large batch.
            diff = (pred - target).reshape(1, -1, height, width)
            kernel = _gaussian_kernel(dtype=diff.dtype, device=diff.device)
            blurred = _blur(diff, kernel)
            laplacian = diff - _blur(_upsample(_downsample(blurred), (height, width)), kernel)

            spectrum = torch.fft.fft2(diff, norm="ortho")
            keep = torch.ones(width, dtype=diff.dtype, device=diff.device)
            keep[self.start_frequency:end_t] = 0
            spectral = (spectrum.real ** 2 + spectrum.imag ** 2) * keep

            return torch.sqrt(diff ** 2 + spectral + laplacian ** 2 + self.eps ** 2).mean()


class FFTLoss(nn.Module):
    """Frequency loss ``mean |FFT(pred) - FFT(target)|``: the 2-D FFT of each channel of each image (unnormalised,
    ``torch.fft.fft2``'s default, as MoCE-IR and BioIR compute it), real and imaginary parts compared as separate
    values, so the mean runs over 2 x B x C x H x W numbers. Always computed in at least float32, autocast off.

    The FFT is unnormalised, so for the same per-pixel error the term grows with the side of the training crop
    (about linearly): a weight means what the papers' 0.1 means at their crop size (128).
    """

    def forward(self, pred, target, epoch=None):
        """Return the scalar loss; ``epoch`` is accepted for a uniform call and ignored."""
        pred, target = _common_dtype(pred, target)
        with torch.autocast(device_type=pred.device.type, enabled=False):
            spectrum = torch.fft.fft2(pred - target)  # linear: FFT(pred) - FFT(target), one transform
            return torch.view_as_real(spectrum).abs().mean()


class WithFFT(nn.Module):
    """``loss(pred, target, epoch) + weight x FFTLoss(pred, target)``.

    Args:
        loss (nn.Module): the base loss, called as ``loss(pred, target, epoch)``.
        weight (float): weight of the frequency term, > 0.
    """

    def __init__(self, loss, weight):
        super().__init__()
        if not weight > 0:
            raise ValueError(f"GFL_Loss.py: WithFFT needs a weight > 0, got {weight}")
        self.loss, self.fft, self.weight = loss, FFTLoss(), float(weight)

    def extra_repr(self):
        return f"weight={self.weight}"

    def forward(self, pred, target, epoch=None):
        """Return the scalar loss (the base loss's dtype rules hold: float32 at least)."""
        return self.loss(pred, target, epoch) + self.weight * self.fft(pred, target)


def fft_weight_option(text):
    """argparse type of ``--fft_weight``: a finite number >= 0 (0: no frequency term)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a weight: give a number >= 0, e.g. 0.1 (0: off)")
    return value


def build_loss(name, *, num_epochs=None, fft_weight=0.0):
    """Build a training loss by name.

    Args:
        name (str): One of ``LOSSES``: "charbonnier", "gfl" or "l1" (case-insensitive).
        num_epochs (int | None): Epochs over which the GFL frequency mask grows; the training length is the natural
            choice. None keeps the GFL default (100). Ignored by the other losses.
        fft_weight (float): weight of the ``FFTLoss`` term added to the loss (``WithFFT``); 0 (the default) adds none.

    Returns:
        nn.Module: The loss, called as ``loss(pred, target, epoch)``.
    """
    if not fft_weight >= 0:
        raise ValueError(f"GFL_Loss.py: fft_weight must be >= 0, got {fft_weight}")
    loss = _base_loss(name, num_epochs=num_epochs)
    return WithFFT(loss, fft_weight) if fft_weight > 0 else loss


def _base_loss(name, *, num_epochs):
    key = str(name).lower()
    if key == "charbonnier":
        return CharbonnierLoss()
    if key == "l1":
        return L1Loss()
    if key == "gfl":
        return GuidedFrequencyLoss() if num_epochs is None else GuidedFrequencyLoss(num_epochs=num_epochs)
    raise ValueError(f"GFL_Loss.py: unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
