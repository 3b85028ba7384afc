"""Paired augmentations: the 8 dihedral views with their exact inverses, and CutBlur, Mixup and Blend.

The dihedral table serves both training (one random view per sample, the same on input and target) and test-time
augmentation (restore every view, map it back with its inverse, average).

CutBlur, Mixup and Blend follow Yoo et al., "Rethinking Data Augmentation for Image Super-resolution" (CVPR 2020):
CutBlur changes only the input; Mixup and Blend change input and target the same way. All randomness is drawn on the
CPU from a ``torch.Generator`` (the global one when none is given) and moved to the batch's device, so a seed gives the
same augmentation on every device.
"""
import random
from collections.abc import Mapping

import torch
from torch import Tensor

# One row per view: (name, forward map on the last two dims, index of the inverse view).
# "rot90" is torch.rot90 with k=1 (counter-clockwise); "transpose" swaps H and W;
# "antitranspose" mirrors across the other diagonal.
_VIEWS = (
    ("identity", lambda x: x, 0),
    ("hflip", lambda x: x.flip(-1), 1),
    ("vflip", lambda x: x.flip(-2), 2),
    ("rot90", lambda x: x.rot90(1, (-2, -1)), 5),
    ("rot180", lambda x: x.rot90(2, (-2, -1)), 4),
    ("rot270", lambda x: x.rot90(3, (-2, -1)), 3),
    ("transpose", lambda x: x.transpose(-2, -1), 6),
    ("antitranspose", lambda x: x.flip(-2, -1).transpose(-2, -1), 7),
)
NUM_VIEWS = len(_VIEWS)
VIEW_NAMES = tuple(name for name, _, _ in _VIEWS)
# Views that keep (H, W): the only ones a batch of equal non-square images may use.
SHAPE_PRESERVING_VIEWS = (0, 1, 2, 4)

STRONG_AUGMENTATIONS = ("cutblur", "mixup", "blend")
DEFAULT_RATES = {"cutblur": 0.125, "mixup": 0.125, "blend": 0.125}
DEFAULT_ALPHAS = {"cutblur": 0.7, "mixup": 1.2, "blend": 0.6}
_ALPHA_RULES = {
    "cutblur": (lambda a: 0 < a <= 1, "the box size as a fraction of the image, in (0, 1]"),
    "mixup": (lambda a: a > 0, "a Beta distribution parameter, > 0"),
    "blend": (lambda a: 0 <= a <= 1, "the lower bound of the blending weight, in [0, 1]"),
}


def _check_view(k: int) -> None:
    if not 0 <= k < NUM_VIEWS:
        raise ValueError(f"dihedral view index must be in 0..{NUM_VIEWS - 1} ({', '.join(VIEW_NAMES)}), got {k}")


def dihedral(x: Tensor, k: int) -> Tensor:
    """View ``k`` (see ``VIEW_NAMES``) of ``x``, acting on its last two dims (H, W); any leading dims."""
    _check_view(k)
    return _VIEWS[k][1](x)


def dihedral_inverse(x: Tensor, k: int) -> Tensor:
    """Undo ``dihedral(., k)``: ``dihedral_inverse(dihedral(x, k), k)`` equals ``x`` exactly."""
    _check_view(k)
    return _VIEWS[_VIEWS[k][2]][1](x)


def _check_pair(lq: Tensor, gt: Tensor) -> None:
    if lq.dim() != 4 or lq.shape != gt.shape:
        raise ValueError(f"expected input and target batches of the same shape (B, C, H, W), "
                         f"got {tuple(lq.shape)} and {tuple(gt.shape)}")


def _check_alpha(name: str, alpha: float) -> None:
    valid, meaning = _ALPHA_RULES[name]
    if not valid(alpha):
        raise ValueError(f"{name} alpha is {meaning}; got {alpha}")


def cutblur(lq: Tensor, gt: Tensor, *, alpha: float = 0.7, generator: torch.Generator | None = None):
    """CutBlur: paste between input and target in one box; the target is returned untouched.

    The box is ``r*H`` by ``r*W`` with ``r ~ N(alpha, 0.01^2)`` (clipped to (0, 1]) at a uniform position; one box
    and one choice per batch, as in the authors' code. With probability 1/2 the input's box is replaced by the clean
    box, otherwise the input becomes the clean image with the degraded box pasted in.

    Args:
        lq (Tensor): degraded batch (B, C, H, W) in [0, 1].
        gt (Tensor): clean batch of the same shape.
        alpha (float): mean box size as a fraction of height and width, in (0, 1]. Default: 0.7.
        generator (torch.Generator | None): CPU generator for the random draws; the global one when None.

    Returns:
        tuple[Tensor, Tensor]: the new input and ``gt`` itself.
    """
    _check_pair(lq, gt)
    _check_alpha("cutblur", alpha)
    h, w = lq.shape[-2:]
    y, x, inside = torch.rand(3, generator=generator).tolist()
    ratio = min(max(alpha + 0.01 * torch.randn(1, generator=generator).item(), 0.0), 1.0)
    bh, bw = max(1, int(h * ratio)), max(1, int(w * ratio))
    top, left = int(y * (h - bh + 1)), int(x * (w - bw + 1))
    box = (..., slice(top, top + bh), slice(left, left + bw))
    if inside < 0.5:
        out = lq.clone()
        out[box] = gt[box]
    else:
        out = gt.clone()
        out[box] = lq[box]
    return out, gt


def mixup(lq: Tensor, gt: Tensor, *, alpha: float = 1.2, generator: torch.Generator | None = None):
    """Mixup on both sides: ``v * x + (1 - v) * x[perm]`` with one ``v ~ Beta(alpha, alpha)`` and one permutation.

    Args:
        lq (Tensor): degraded batch (B, C, H, W) in [0, 1].
        gt (Tensor): clean batch of the same shape.
        alpha (float): Beta distribution parameter, > 0. Default: 1.2.
        generator (torch.Generator | None): CPU generator for the random draws; the global one when None.

    Returns:
        tuple[Tensor, Tensor]: the mixed input and target (a batch of one mixes with itself).
    """
    _check_pair(lq, gt)
    _check_alpha("mixup", alpha)
    # torch's Beta sampler takes no generator: seed Python's from ours so the draw stays reproducible.
    v = random.Random(int(torch.randint(2**62, (1,), generator=generator))).betavariate(alpha, alpha)
    perm = torch.randperm(lq.shape[0], generator=generator).to(lq.device)
    return (v * lq + (1 - v) * lq[perm]).clamp_(0, 1), (v * gt + (1 - v) * gt[perm]).clamp_(0, 1)


def blend(lq: Tensor, gt: Tensor, *, alpha: float = 0.6, generator: torch.Generator | None = None):
    """Blend on both sides: ``v * x + (1 - v) * c``, one colour ``c ~ U[0, 1]^C`` per sample, one ``v ~ U(alpha, 1)``.

    Args:
        lq (Tensor): degraded batch (B, C, H, W) in [0, 1].
        gt (Tensor): clean batch of the same shape.
        alpha (float): lower bound of the blending weight, in [0, 1]. Default: 0.6.
        generator (torch.Generator | None): CPU generator for the random draws; the global one when None.

    Returns:
        tuple[Tensor, Tensor]: the blended input and target.
    """
    _check_pair(lq, gt)
    _check_alpha("blend", alpha)
    b, c = lq.shape[:2]
    colour = torch.rand(b, c, 1, 1, generator=generator).to(device=lq.device, dtype=lq.dtype)
    v = alpha + (1 - alpha) * torch.rand(1, generator=generator).item()
    return (v * lq + (1 - v) * colour).clamp_(0, 1), (v * gt + (1 - v) * colour).clamp_(0, 1)


_FUNCTIONS = {"cutblur": cutblur, "mixup": mixup, "blend": blend}


def _merge(name: str, given: Mapping[str, float] | None, defaults: dict[str, float]) -> dict[str, float]:
    unknown = set(given or {}) - set(STRONG_AUGMENTATIONS)
    if unknown:
        raise ValueError(f"unknown augmentation(s) in {name}: {sorted(unknown)}; valid: {list(STRONG_AUGMENTATIONS)}")
    return {**defaults, **(given or {})}


class AugmentPolicy:
    """Picks at most one strong augmentation (CutBlur, Mixup or Blend) per batch.

    The default rates are the original homework's: each strong augmentation fires in 12.5 % of batches (37.5 % in
    all, 62.5 % of batches pass unchanged). Yoo et al. used 0.6 each for super-resolution; for blind rain and snow
    removal the original author kept most batches clean, and this project keeps that recipe. The alphas are the
    paper's (CutBlur 0.7, Mixup 1.2, Blend 0.6).

    Args:
        strong (bool): when False the policy is the identity (first fine-tuning stage). Default: True.
        rates (Mapping[str, float] | None): probability per batch of each augmentation; keys among "cutblur",
            "mixup", "blend"; missing keys keep their default of 0.125. Each >= 0, sum <= 1.
        alphas (Mapping[str, float] | None): strength per augmentation; missing keys keep the paper's values.
        seed (int | None): seeds the policy's own CPU generator (``self.generator``; save its ``get_state()`` to
            resume exactly); when None the global torch generator is used, so ``torch.manual_seed`` makes it
            reproducible.
    """

    def __init__(self, *, strong: bool = True, rates: Mapping[str, float] | None = None,
                 alphas: Mapping[str, float] | None = None, seed: int | None = None):
        self.strong = strong
        self.rates = _merge("rates", rates, DEFAULT_RATES)
        self.alphas = _merge("alphas", alphas, DEFAULT_ALPHAS)
        if any(r < 0 for r in self.rates.values()) or sum(self.rates.values()) > 1 + 1e-9:
            raise ValueError(f"augmentation rates must each be >= 0 and sum to at most 1, got {self.rates}")
        for name, alpha in self.alphas.items():
            _check_alpha(name, alpha)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def __call__(self, lq: Tensor, gt: Tensor) -> tuple[Tensor, Tensor, str]:
        """Returns ``(lq, gt, name)``, name being "none", "cutblur", "mixup" or "blend"."""
        if not self.strong:
            return lq, gt, "none"
        u = torch.rand(1, generator=self.generator).item()
        for name in STRONG_AUGMENTATIONS:
            if u < self.rates[name]:
                lq, gt = _FUNCTIONS[name](lq, gt, alpha=self.alphas[name], generator=self.generator)
                return lq, gt, name
            u -= self.rates[name]
        return lq, gt, "none"

    def __repr__(self) -> str:
        return f"AugmentPolicy(strong={self.strong}, rates={self.rates}, alphas={self.alphas})"
