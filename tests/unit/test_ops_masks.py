"""Mask paste + vote + COCO RLE (``stages.ops.masks``) against the plain full-image reference, and EncodedMask."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from pycocotools import mask as mu

from stages.formats.seg_submission import decode_counts, encode_counts, read_segmentation_submission
from stages.ops.masks import box_pixels, paste_masks, resize_bilinear, vote_masks
from tests import ops_reference as ref


def coco(mask: np.ndarray) -> dict:
    return mu.encode(np.asfortranarray(mask.astype(np.uint8)))


def smooth_maps(rng: np.random.Generator, shape: tuple, size) -> np.ndarray:
    """Blob-like probability maps [*shape, h, w] (``size`` = h or (h, w)): a random 5 x 5 field, upsampled,
    through a sigmoid."""
    h, w = (size, size) if np.isscalar(size) else size
    field = rng.normal(size=(*shape, 5, 5)) * 2.0
    out = np.stack([resize_bilinear(f, h, w) for f in field.reshape(-1, 5, 5)]).reshape(*shape, h, w)
    return (1.0 / (1.0 + np.exp(-3.0 * out))).astype(np.float32)


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Boxes of every kind: random, tiny (< 1 px at the test image sizes), empty, touching each border, the
    whole image."""
    lo = rng.random((n, 2))
    size = rng.random((n, 2)) * rng.choice([0.001, 0.02, 0.3, 1.0], (n, 1))
    b = np.clip(np.concatenate([lo, lo + size], axis=1), 0.0, 1.0)
    fixed = [[0, 0, 1, 1], [0, 0.2, 0.3, 1], [0.7, 0, 1, 0.4], [0, 0, 0.5, 1], [0.5, 0, 1, 1],  # borders
             [0.3, 0.3, 0.3, 0.6], [0.41, 0.4, 0.4102, 0.45], [0.999, 0.999, 1, 1], [0, 0, 0.001, 0.001]]  # tiny
    b[: len(fixed)] = fixed
    return b


def maps_of_kind(rng: np.random.Generator, kind: str, shape: tuple, size) -> np.ndarray:
    h, w = (size, size) if np.isscalar(size) else size
    if kind == "noise":
        return rng.random((*shape, h, w)).astype(np.float32)
    if kind == "smooth":
        return smooth_maps(rng, shape, (h, w))
    if kind == "levels":  # exact 0.5 and values whose crossings fall exactly on rows: the exact-evaluation paths
        return rng.choice(np.array([0.0, 0.25, 0.5, 0.75, 1.0], np.float32), (*shape, h, w))
    if kind == "half":  # flat at the threshold
        m = np.full((*shape, h, w), 0.5, np.float32)
        m[..., : h // 2, :] = 0.9
        return m
    raise ValueError(kind)


KINDS = ["noise", "smooth", "levels", "half"]


def assert_same(out: list[dict], want: list[np.ndarray]) -> None:
    assert len(out) == len(want)
    for i, (o, w) in enumerate(zip(out, want)):
        r = coco(w)
        assert o["size"] == r["size"], i
        assert o["counts"] == r["counts"], f"box {i}: {mu.decode(o).sum()} vs {w.sum()} foreground pixels"


def test_resize_is_torch_bilinear():
    rng = np.random.default_rng(0)
    for h, w, H, W in [(64, 64, 200, 130), (64, 64, 17, 5), (7, 3, 7, 30), (1, 1, 4, 9), (5, 8, 1, 1)]:
        m = rng.random((h, w)).astype(np.float32)
        t = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(H, W), mode="bilinear",
                                            align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(resize_bilinear(m, H, W), t, atol=1e-5)


def test_box_pixels_are_the_centres_inside():
    boxes = np.array([[0.1, 0.0, 0.55, 1.0], [0.2, 0.2, 0.2, 0.2], [0.24, 0, 0.26, 1]])
    r0, r1, c0, c1 = box_pixels(boxes, 10, 10)
    assert (c0.tolist(), c1.tolist()) == ([1, 2, 2], [5, 2, 3])  # centres 1.5..4.5 in [1, 5.5); none; 2.5
    assert (r0.tolist(), r1.tolist()) == ([0, 2, 0], [10, 2, 10])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [(64, 64), (7, 7), (1, 1), (28, 13), (1, 9)])
def test_paste_equals_full_image_reference(kind, size):
    rng = np.random.default_rng([KINDS.index(kind), *size])
    for height, width in [(48, 64), (1, 1), (3, 97), (200, 13)]:
        boxes = random_boxes(rng, 40)
        maps = maps_of_kind(rng, kind, (40,), size)
        out = paste_masks(maps, boxes, height=height, width=width)
        assert_same(out, [ref.paste_mask(m, b, height, width) for m, b in zip(maps, boxes)])


def test_paste_large_image():
    """Counts up to a full 1024 x 768 image and long runs (the string's multi-char values, both signs)."""
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 30)
    maps = maps_of_kind(rng, "smooth", (30,), 64)
    out = paste_masks(maps, boxes, height=768, width=1024)
    assert_same(out, [ref.paste_mask(m, b, 768, 1024) for m, b in zip(maps, boxes)])


def test_paste_float64_maps_and_threshold():
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 20)
    maps = rng.random((20, 16, 16))
    for thr in (0.0, 0.3, 0.9):
        out = paste_masks(maps, boxes, height=40, width=50, thr=thr)
        assert_same(out, [ref.paste_mask(m, b, 40, 50, thr) for m, b in zip(maps, boxes)])


def test_tiny_boxes_give_valid_possibly_empty_masks():
    maps = np.ones((3, 8, 8), np.float32)
    boxes = np.array([[0.50, 0.50, 0.52, 0.52],  # 0.2 px, no pixel centre inside: empty
                      [0.54, 0.54, 0.56, 0.56],  # 0.2 px around the centre 5.5: one pixel
                      [0.3, 0.3, 0.3, 0.3]])  # zero area
    out = paste_masks(maps, boxes, height=10, width=10)
    assert [int(mu.area(o)) for o in out] == [0, 1, 0]
    assert mu.decode(out[1])[5, 5] == 1
    assert out[0]["counts"] == coco(np.zeros((10, 10), bool))["counts"]


def test_columns_merge_across_a_full_height_box():
    """Foreground from the bottom of one column to the top of the next is one run in COCO's column order."""
    out = paste_masks(np.ones((1, 4, 4), np.float32), np.array([[0.25, 0, 0.75, 1]]), height=6, width=4)
    assert out[0]["counts"] == coco(np.pad(np.ones((6, 2), bool), ((0, 0), (1, 1))))["counts"]
    assert mu.frPyObjects({"size": [6, 4], "counts": [6, 12, 6]}, 6, 4)["counts"] == out[0]["counts"]


def test_boxes_of_different_images_and_chunks():
    rng = np.random.default_rng(3)
    n = 50
    boxes = random_boxes(rng, n)
    maps = maps_of_kind(rng, "smooth", (3, n), 32)
    hh, ww = rng.integers(1, 120, n), rng.integers(1, 120, n)
    for vote in ("mean", "majority"):
        want = [ref.vote_mask(maps[:, i], boxes[i], hh[i], ww[i], vote=vote) for i in range(n)]
        for chunk in (1, 7, 1000):
            assert_same(vote_masks(maps, boxes, height=hh, width=ww, vote=vote, chunk_boxes=chunk), want)


@pytest.mark.parametrize("vote", ["mean", "majority"])
@pytest.mark.parametrize("models", [2, 3, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_vote_equals_full_image_reference(vote, models, kind):
    rng = np.random.default_rng([models, KINDS.index(kind)])
    boxes = random_boxes(rng, 30)
    maps = maps_of_kind(rng, kind, (models, 30), 16)
    out = vote_masks(maps, boxes, height=60, width=45, vote=vote)
    assert_same(out, [ref.vote_mask(maps[:, i], boxes[i], 60, 45, vote=vote) for i in range(30)])


@pytest.mark.parametrize("vote", ["mean", "majority"])
def test_one_model_vote_is_the_identity(vote):
    rng = np.random.default_rng(4)
    boxes = random_boxes(rng, 30)
    maps = maps_of_kind(rng, "smooth", (30,), 64)
    assert vote_masks(maps[None], boxes, height=70, width=90, vote=vote) == paste_masks(maps, boxes, height=70,
                                                                                        width=90)


@pytest.mark.parametrize("vote", ["mean", "majority"])
def test_unanimous_pixels_keep_their_label(vote):
    rng = np.random.default_rng(5)
    boxes = random_boxes(rng, 30)
    maps = maps_of_kind(rng, "smooth", (3, 30), 32)
    each = np.stack([[mu.decode(o) for o in paste_masks(m, boxes, height=50, width=40)] for m in maps])
    voted = np.stack([mu.decode(o) for o in vote_masks(maps, boxes, height=50, width=40, vote=vote)])
    agree = (each == each[0]).all(axis=0)
    assert agree.any() and (~agree).any()
    assert np.array_equal(voted[agree], each[0][agree])
    # and identical maps vote for themselves
    same = np.repeat(maps[:1], 4, axis=0)
    assert vote_masks(same, boxes, height=50, width=40, vote=vote) == paste_masks(maps[0], boxes, height=50,
                                                                                   width=40)


def test_majority_ties_are_background():
    rng = np.random.default_rng(6)
    boxes = random_boxes(rng, 20)
    maps = maps_of_kind(rng, "smooth", (2, 20), 32)
    a, b = ([mu.decode(o) for o in paste_masks(m, boxes, height=30, width=30)] for m in maps)
    voted = [mu.decode(o) for o in vote_masks(maps, boxes, height=30, width=30, vote="majority")]
    for x, y, v in zip(a, b, voted):  # two models: a 1-1 tie is background, so the vote is the intersection
        assert np.array_equal(v, x & y)
    four = np.stack([np.ones((1, 4, 4)), np.ones((1, 4, 4)), np.zeros((1, 4, 4)), np.zeros((1, 4, 4))])
    three = four[:3]
    full = np.array([[0.0, 0.0, 1.0, 1.0]])
    assert mu.area(vote_masks(four, full, height=5, width=5, vote="majority")[0]) == 0  # 2 of 4
    assert mu.area(vote_masks(three, full, height=5, width=5, vote="majority")[0]) == 25  # 2 of 3


def test_mean_vote_is_strictly_above_half():
    maps = np.stack([np.zeros((1, 4, 4)), np.ones((1, 4, 4))])  # mean exactly 0.5 everywhere
    full = np.array([[0.0, 0.0, 1.0, 1.0]])
    assert mu.area(vote_masks(maps, full, height=5, width=5, vote="mean")[0]) == 0
    maps[0, 0, 0, 0] = 0.9  # one corner: only the pixels near it pass
    assert 0 < mu.area(vote_masks(maps, full, height=5, width=5, vote="mean")[0]) < 25


def test_mean_vote_is_the_mean_of_the_pasted_maps():
    rng = np.random.default_rng(7)
    boxes = random_boxes(rng, 30)
    maps = maps_of_kind(rng, "smooth", (3, 30), 64)
    out = vote_masks(maps, boxes, height=64, width=80, vote="mean")
    for i in range(30):
        mean = sum(ref.paste_prob(m[i], boxes[i], 64, 80) for m in maps) / 3
        assert np.array_equal(mu.decode(out[i]).astype(bool), mean > 0.5)


def test_encoded_mask_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    boxes = random_boxes(rng, 12)
    maps = maps_of_kind(rng, "smooth", (12,), 64)
    out = paste_masks(maps, boxes, height=90, width=120)
    for o, m, b in zip(out, maps, boxes):
        text = encode_counts(o["counts"])
        assert text.isascii() and " " not in text
        assert decode_counts(text) == o["counts"]
        assert np.array_equal(mu.decode({"size": [90, 120], "counts": decode_counts(text)}).astype(bool),
                              ref.paste_mask(m, b, 90, 120))
    line = " ".join(f"/m/a 0.{i + 1} {encode_counts(o['counts'])}" for i, o in enumerate(out))
    p = tmp_path / "seg.csv"
    p.write_text(f"ImageID,ImageWidth,ImageHeight,PredictionString\nimg,120,90,{line}\n")
    back = read_segmentation_submission(p, known_labels={"/m/a"})
    assert [r.encode() for r in back["rle"]] == [o["counts"] for o in out]
    assert (back["mask_height"] == 90).all() and (back["mask_width"] == 120).all()


@pytest.mark.parametrize("boxes, message", [
    ([[0.1, 0.1, 1.2, 0.5]], "box 0: x_max = 1.2 is outside [0, 1]"),
    ([[-0.1, 0.1, 0.2, 0.5]], "box 0: x_min = -0.1 is outside [0, 1]"),
    ([[0.1, np.nan, 0.2, 0.5]], "box 0: y_min = nan is outside [0, 1]"),
    ([[0.5, 0.1, 0.2, 0.5]], "box 0: x_max < x_min"),
    ([[0.1, 0.1, 0.2]], "boxes must be [N, 4]"),
    ([[0.1, 0.1, 0.2, 0.5], [0, 0, 1, 1]], "2 boxes but probability maps for 1 boxes"),
])
def test_bad_boxes(boxes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        paste_masks(np.ones((1, 4, 4)), np.array(boxes, dtype=float), height=10, width=10)


def test_bad_maps_and_sizes():
    box = np.array([[0.1, 0.1, 0.5, 0.5]])
    with pytest.raises(ValueError, match=r"probs must be \[N, h, w\] \(one 2-D map per box\), not shape \(4, 4\)"):
        paste_masks(np.ones((4, 4)), box, height=10, width=10)
    with pytest.raises(ValueError, match=r"probs must be \[models, boxes, h, w\]"):
        vote_masks(np.ones((1, 4, 4)), box, height=10, width=10)
    with pytest.raises(ValueError, match=r">= 1 x 1 pixels"):
        paste_masks(np.ones((1, 0, 4)), box, height=10, width=10)
    with pytest.raises(ValueError, match=r"model 1, box 0: probability 1.5 is not in \[0, 1\]"):
        vote_masks(np.stack([np.ones((1, 4, 4)), np.full((1, 4, 4), 1.5)]), box, height=10, width=10)
    with pytest.raises(ValueError, match=r"probability nan is not in \[0, 1\]"):
        paste_masks(np.full((1, 4, 4), np.nan), box, height=10, width=10)
    with pytest.raises(ValueError, match=r"height must be one int or one per box \(1\)"):
        paste_masks(np.ones((1, 4, 4)), box, height=[10, 20], width=10)
    with pytest.raises(ValueError, match="image width must be >= 1 pixel"):
        paste_masks(np.ones((1, 4, 4)), box, height=10, width=0)
    with pytest.raises(ValueError, match="whole pixels"):
        paste_masks(np.ones((1, 4, 4)), box, height=10.5, width=10)
    with pytest.raises(ValueError, match="vote must be one of"):
        vote_masks(np.ones((1, 1, 4, 4)), box, height=10, width=10, vote="median")
    with pytest.raises(ValueError, match=r"thr must be in \[0, 1\)"):
        paste_masks(np.ones((1, 4, 4)), box, height=10, width=10, thr=1.0)


def test_no_boxes():
    assert paste_masks(np.zeros((0, 64, 64), np.float32), np.zeros((0, 4)), height=10, width=10) == []


def test_counts_string_matches_pycocotools_on_awkward_runs():
    """Run lengths crossing every 5-bit char boundary, both signs of the differences."""
    h, w = 257, 300
    for seed in range(5):
        rng = np.random.default_rng(seed)
        maps = (rng.random((20, 3, 3)) > 0.5).astype(np.float32)
        boxes = random_boxes(rng, 20)
        out = paste_masks(maps, boxes, height=h, width=w)
        assert_same(out, [ref.paste_mask(m, b, h, w) for m, b in zip(maps, boxes)])
