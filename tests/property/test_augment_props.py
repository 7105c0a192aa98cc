"""Properties of the elaborate augmentation: boxes stay inside the output image, and they move with the image
(a box drawn as a mask into the image is still where the transformed box says), for any seed and geometry."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.models.augment import AugmentStats, augment_stats, crop_window, elaborate_augment, rotate_boxes

torch.set_num_threads(1)


@st.composite
def scenes(draw):
    w = draw(st.integers(24, 96))
    h = draw(st.integers(24, 96))
    bw = draw(st.integers(6, w - 2))
    bh = draw(st.integers(6, h - 2))
    x0 = draw(st.integers(0, w - bw))
    y0 = draw(st.integers(0, h - bh))
    return w, h, (x0, y0, x0 + bw, y0 + bh), draw(st.integers(0, 2**31 - 1))


STATS = AugmentStats(size_ratios=np.array([0.1, 0.3, 0.5, 0.9]), extreme=frozenset({1}))


@settings(max_examples=60, deadline=None)
@given(scenes(), st.booleans())
def test_box_mask_maps_with_the_image(scene, extreme):
    w, h, (x0, y0, x1, y1), seed = scene
    img = torch.zeros(1, h, w)
    img[:, y0:y1, x0:x1] = 1.0
    boxes = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32)
    stats = AugmentStats(size_ratios=STATS.size_ratios, extreme=frozenset({1}) if extreme else frozenset())
    out, b, lab = elaborate_augment(img, boxes, torch.tensor([1]), cls=1, rng=np.random.default_rng(seed),
                                    stats=stats, rotate_std=(4.0, 15.0), max_pixels=2000)
    oh, ow = out.shape[-2:]
    assert 1 <= oh <= h and 1 <= ow <= w
    assert len(b) == 1 and lab.tolist() == [1]  # the chosen box is always kept
    assert (b[:, [0, 2]] >= 0).all() and (b[:, [0, 2]] <= ow).all()
    assert (b[:, [1, 3]] >= 0).all() and (b[:, [1, 3]] <= oh).all()
    ys, xs = torch.where(out[0] > 0.5)
    assert len(xs) > 0  # the crop holds the object
    mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    # the transformed box encloses the (rotated, cropped) object ...
    assert (mask_box[:2] >= b[0, :2] - 1.5).all() and (mask_box[2:] <= b[0, 2:] + 1.5).all()
    # ... and, when all of the object is still in view, is tight to the interpolation's pixel or two
    if out[0].sum() >= 0.97 * (x1 - x0) * (y1 - y0):
        assert (b[0, :2] >= mask_box[:2] - 2.5).all() and (b[0, 2:] <= mask_box[2:] + 2.5).all()


@settings(max_examples=60, deadline=None)
@given(scenes(), st.floats(0.01, 1.0), st.integers(64, 20000))
def test_crop_window_contains_the_box_and_respects_the_budget(scene, ratio, budget):
    w, h, box, seed = scene
    x0, y0, x1, y1 = crop_window(box, ratio=ratio, width=w, height=h, max_pixels=budget,
                                 rng=np.random.default_rng(seed))
    assert 0 <= x0 <= box[0] and box[2] <= x1 <= w and 0 <= y0 <= box[1] and box[3] <= y1 <= h
    box_area = (box[2] - box[0] + 2) * (box[3] - box[1] + 2)
    # within budget unless the box alone exceeds it (then the window hugs the box), rounding aside
    assert (x1 - x0) * (y1 - y0) <= max(budget, box_area) + w + h + 1


def test_same_seed_same_output_and_extreme_classes_rotate_more():
    img = torch.rand(3, 40, 60)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 16.0]])
    runs = [elaborate_augment(img, boxes, torch.tensor([1]), cls=1, rng=np.random.default_rng(7), stats=STATS)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    angles = {}
    for cls, extreme in ((1, True), (2, False)):
        draws = [np.random.default_rng(s).normal(0, 10.0 if extreme else 3.0) for s in range(200)]
        angles[cls] = np.std(draws)
    assert angles[1] > 2 * angles[2]


def test_rotate_boxes_quarter_turn_and_stats():
    # a 90° counter-clockwise turn of a square image maps (x, y) -> (y, W - x)
    b = rotate_boxes(torch.tensor([[10.0, 20.0, 30.0, 25.0]]), 90.0, width=100, height=100)
    assert torch.allclose(b, torch.tensor([[20.0, 70.0, 25.0, 90.0]]), atol=1e-4)
    # about a box's own centre the box keeps its centre and swaps its sides
    b = rotate_boxes(torch.tensor([[10.0, 20.0, 30.0, 24.0]]), 90.0, width=100, height=100, center=(20, 22))
    assert torch.allclose(b, torch.tensor([[18.0, 12.0, 22.0, 32.0]]), atol=1e-4)
    s = augment_stats(box_wh=np.array([[40, 10], [50, 10], [10, 10], [20, 20]]),
                      image_wh=np.array([[100, 100]] * 4), labels=np.array([1, 1, 2, 2]))
    assert s.extreme == frozenset({1})
    assert np.allclose(s.size_ratios, np.sort(np.sqrt([0.04, 0.05, 0.01, 0.04])))
