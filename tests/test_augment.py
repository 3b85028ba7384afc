"""augment.py: the dihedral table, CutBlur / Mixup / Blend as Yoo et al. define them, and the policy's rates."""
import math

import pytest
import torch

from augment import (DEFAULT_RATES, NUM_VIEWS, SHAPE_PRESERVING_VIEWS, VIEW_NAMES, AugmentPolicy, blend, cutblur,
                     dihedral, dihedral_inverse, mixup)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rectangle(mask):
    """(height, width) of the mask's True pixels when they form one filled rectangle, else None."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    return (height, width) if mask.sum() == height * width else None


def test_every_view_is_undone_exactly_by_its_inverse_on_non_square_inputs():
    """inverse(view(x)) == x bit for bit, for all 8 views, on (B, C, H, W), (C, H, W) and (H, W) with H != W."""
    for shape in [(2, 3, 5, 7), (3, 4, 6), (3, 8)]:
        x = torch.rand(shape)
        for k in range(NUM_VIEWS):
            assert torch.equal(dihedral_inverse(dihedral(x, k), k), x), (shape, VIEW_NAMES[k])


def test_views_match_their_names_and_are_distinct():
    """Each named view does what its name says on a 2x2 grid [[a, b], [c, d]], and all 8 results differ."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    expected = {
        "identity": [[1, 2], [3, 4]], "hflip": [[2, 1], [4, 3]], "vflip": [[3, 4], [1, 2]],
        "rot90": [[2, 4], [1, 3]], "rot180": [[4, 3], [2, 1]], "rot270": [[3, 1], [4, 2]],
        "transpose": [[1, 3], [2, 4]], "antitranspose": [[4, 2], [3, 1]],
    }
    assert NUM_VIEWS == 8 and set(VIEW_NAMES) == set(expected)
    views = [dihedral(x, k) for k in range(NUM_VIEWS)]
    for k, view in enumerate(views):
        assert view.tolist() == expected[VIEW_NAMES[k]], VIEW_NAMES[k]
    assert len({tuple(v.flatten().tolist()) for v in views}) == NUM_VIEWS


def test_only_the_shape_preserving_views_keep_a_non_square_shape():
    """SHAPE_PRESERVING_VIEWS are exactly the views that keep (H, W) of a 5x7 image; an index out of range fails."""
    x = torch.rand(1, 5, 7)
    keep = {k for k in range(NUM_VIEWS) if dihedral(x, k).shape == x.shape}
    assert keep == set(SHAPE_PRESERVING_VIEWS)
    with pytest.raises(ValueError, match="0..7"):
        dihedral(x, 8)


def test_cutblur_changes_only_the_input_inside_or_outside_one_box_of_about_alpha_size():
    """The target is returned unchanged; the input equals the clean image inside a box and the degraded one outside
    (or the reverse), the box side is about alpha*H by alpha*W, and both directions occur about equally often."""
    lq, gt = torch.zeros(2, 1, 100, 80), torch.ones(2, 1, 100, 80)
    inside_count, draws = 0, 120
    g = _gen(0)
    for _ in range(draws):
        out_lq, out_gt = cutblur(lq, gt, alpha=0.7, generator=g)
        assert torch.equal(out_gt, gt) and torch.equal(lq, torch.zeros_like(lq))
        # Exactly one of "the clean pixels" and "the degraded pixels" forms a rectangle: the box.
        boxes = {value: _rectangle(out_lq[0, 0] == value) for value in (0.0, 1.0)}
        assert set(out_lq.unique().tolist()) == {0.0, 1.0} and sum(b is not None for b in boxes.values()) == 1
        clean_inside = boxes[1.0] is not None
        height, width = boxes[1.0 if clean_inside else 0.0]
        assert abs(height / 100 - 0.7) < 0.05 and abs(width / 80 - 0.7) < 0.05
        assert torch.equal(out_lq[0], out_lq[1]), "one box per batch"
        inside_count += int(clean_inside)
    assert abs(inside_count / draws - 0.5) < 0.15


def test_cutblur_box_follows_alpha():
    """A smaller alpha gives a proportionally smaller box (alpha 0.3 on 100x100 -> about 30x30)."""
    lq, gt = torch.zeros(1, 1, 100, 100), torch.ones(1, 1, 100, 100)
    areas = []
    for seed in range(20):
        out, _ = cutblur(lq, gt, alpha=0.3, generator=_gen(seed))
        areas.append(min(out.sum(), (1 - out).sum()).item())
    assert all(25**2 <= a <= 35**2 for a in areas), areas


def test_mixup_mixes_both_sides_with_the_same_weight_and_permutation():
    """With gt = lq + 0.5 per sample, the outputs keep gt' = lq' + 0.5 exactly when v and the permutation are shared;
    and the weights follow Beta(1.2, 1.2): mean 1/2, variance 1/(4*(2*1.2+1))."""
    lq = torch.tensor([0.0, 0.1, 0.2, 0.3]).view(4, 1, 1, 1).expand(4, 3, 4, 4).contiguous()
    gt = lq + 0.5
    before = lq.clone(), gt.clone()
    g = _gen(1)
    changed = 0
    for _ in range(50):
        out_lq, out_gt = mixup(lq, gt, alpha=1.2, generator=g)
        assert torch.allclose(out_gt, out_lq + 0.5, atol=1e-6)
        assert torch.equal(lq, before[0]) and torch.equal(gt, before[1]), "inputs untouched"
        changed += not torch.allclose(out_lq, lq)
    assert changed >= 40, "only an identity permutation (1 in 24) leaves the batch as it was"
    # Weights: in a batch of two [0, 1] that is swapped, sample 1 becomes v.
    pair = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    weights = []
    for _ in range(4000):
        out, _ = mixup(pair, pair.clone(), alpha=1.2, generator=g)
        if out[0].item() != 0.0 or out[1].item() != 1.0:
            weights.append(out[1].item())
    w = torch.tensor(weights)
    assert len(weights) > 1500
    assert abs(w.mean() - 0.5) < 0.03 and abs(w.var() - 1 / (4 * 3.4)) < 0.01


def test_blend_blends_both_sides_towards_one_colour_per_sample():
    """With lq = 0 and gt = 1: gt' - lq' = v in [alpha, 1], lq' / (1 - v) is one colour per sample and channel in
    [0, 1], colours differ across samples, and the same v is used for the whole batch."""
    lq, gt = torch.zeros(4, 3, 5, 6), torch.ones(4, 3, 5, 6)
    g = _gen(2)
    vs = []
    for _ in range(200):
        out_lq, out_gt = blend(lq, gt, alpha=0.6, generator=g)
        v = out_gt - out_lq
        assert torch.allclose(v, v.flatten()[0].expand_as(v), atol=1e-6)
        v = v.flatten()[0].item()
        assert 0.6 - 1e-6 <= v <= 1 + 1e-6
        vs.append(v)
        colour = out_lq / (1 - v)
        assert torch.allclose(colour, colour[..., :1, :1].expand_as(colour), atol=1e-4)
        assert colour.min() >= -1e-4 and colour.max() <= 1 + 1e-4
        assert len({round(c, 4) for c in colour[:, 0, 0, 0].tolist()}) == 4
    assert abs(sum(vs) / len(vs) - 0.8) < 0.03, "v ~ U(0.6, 1) has mean 0.8"


def test_augmented_images_stay_in_range_and_draws_are_reproducible():
    """On random images in [0, 1] every augmentation returns values in [0, 1], and the same generator seed gives
    the same result while another seed gives another one."""
    lq, gt = torch.rand(3, 3, 16, 12), torch.rand(3, 3, 16, 12)
    for fn in (cutblur, mixup, blend):
        a = fn(lq, gt, generator=_gen(7))
        b = fn(lq, gt, generator=_gen(7))
        c = fn(lq, gt, generator=_gen(8))
        for x in a:
            assert x.min() >= 0 and x.max() <= 1
        assert all(torch.equal(x, y) for x, y in zip(a, b)), fn.__name__
        assert not all(torch.equal(x, y) for x, y in zip(a, c)), fn.__name__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentations_on_cuda_match_the_cpu_for_the_same_seed():
    """On a CUDA batch the outputs stay on the GPU and equal the CPU results for the same generator seed."""
    lq, gt = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    for fn in (cutblur, mixup, blend):
        cpu = fn(lq, gt, generator=_gen(3))
        gpu = fn(lq.cuda(), gt.cuda(), generator=_gen(3))
        assert all(y.is_cuda and torch.allclose(x, y.cpu(), atol=1e-6) for x, y in zip(cpu, gpu)), fn.__name__


@pytest.mark.parametrize("rates", [None, {"cutblur": 0.5, "mixup": 0.1, "blend": 0.0}])
def test_policy_fires_each_augmentation_at_its_configured_rate(rates):
    """Over 4000 tiny batches each augmentation (and "none") fires at its rate within 4.5 binomial standard
    deviations; the defaults are 12.5 % each."""
    policy = AugmentPolicy(rates=rates, seed=0)
    expected = {**DEFAULT_RATES, **(rates or {})}
    expected["none"] = 1 - sum(expected.values())
    counts = dict.fromkeys(expected, 0)
    lq, gt = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4)
    n = 4000
    for _ in range(n):
        counts[policy(lq, gt)[2]] += 1
    for name, p in expected.items():
        tolerance = 4.5 * math.sqrt(max(p * (1 - p), 1e-9) / n)
        assert abs(counts[name] / n - p) <= tolerance, (name, counts[name] / n, p)
    if rates is None:
        assert expected == {"cutblur": 0.125, "mixup": 0.125, "blend": 0.125, "none": 0.625}


def test_policy_applies_the_augmentation_it_names_with_its_alpha():
    """With CutBlur at rate 1 the policy says "cutblur", leaves the target alone and uses the configured alpha;
    with strong=False it returns its inputs untouched and says "none"."""
    lq, gt = torch.zeros(2, 3, 50, 50), torch.ones(2, 3, 50, 50)
    out_lq, out_gt, name = AugmentPolicy(rates={"cutblur": 1.0, "mixup": 0, "blend": 0},
                                         alphas={"cutblur": 0.2}, seed=0)(lq, gt)
    assert name == "cutblur" and torch.equal(out_gt, gt)
    assert 8**2 <= min(out_lq[0, 0].sum(), (1 - out_lq[0, 0]).sum()) <= 12**2
    off = AugmentPolicy(strong=False, rates={"cutblur": 1.0, "mixup": 0, "blend": 0})
    a, b, name = off(lq, gt)
    assert name == "none" and a is lq and b is gt


def test_policy_with_a_seed_repeats_its_sequence():
    """Two policies with the same seed pick the same augmentations and produce the same images."""
    lq, gt = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    p1, p2 = AugmentPolicy(rates={"cutblur": 0.3, "mixup": 0.3, "blend": 0.3}, seed=5), \
        AugmentPolicy(rates={"cutblur": 0.3, "mixup": 0.3, "blend": 0.3}, seed=5)
    for _ in range(30):
        a, b = p1(lq, gt), p2(lq, gt)
        assert a[2] == b[2] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kwargs, message", [
    ({"rates": {"cutblur": -0.1}}, "sum to at most 1"),
    ({"rates": {"cutblur": 0.5, "mixup": 0.4, "blend": 0.2}}, "sum to at most 1"),
    ({"rates": {"cutmix": 0.1}}, "unknown augmentation"),
    ({"alphas": {"cutblur": 1.5}}, "cutblur alpha"),
    ({"alphas": {"mixup": 0}}, "mixup alpha"),
    ({"alphas": {"blend": -0.1}}, "blend alpha"),
])
def test_policy_rejects_bad_rates_and_alphas(kwargs, message):
    """Negative rates, rates summing above 1, unknown names and out-of-range alphas fail at construction."""
    with pytest.raises(ValueError, match=message):
        AugmentPolicy(**kwargs)
