"""The pairwise kernels (NMS, soft-NMS, adj-NMS, top-k voting, the auto ensemble's cross matching) build the
IoUs of a group too large for one block a slice of rows at a time: the results are identical to those of whole
[N, N] blocks, and no IoU array they build is larger than the block, whatever the group size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stages.ops.ensemble as ens
import stages.ops.nms as nms_mod
import stages.ops.tree_merge as tm
from stages.ops._array import to_numpy
from stages.ops.nms import row_chunks, suppress_arrays
from tests import ops_reference as ref


@pytest.fixture(params=["numpy", "torch"])
def kind(request):
    return request.param


def _case(seed, n, n_groups):
    rng = np.random.default_rng(seed)
    # boxes on a coarse grid so that many pairs overlap (and some tie), in a few large groups
    b = ref.random_boxes(rng, n, grid=6)
    s = rng.integers(1, 40, n) / 40.0
    g = rng.integers(0, n_groups, n)
    src = rng.integers(0, 3, n)
    return b, s, g, src


def _t(kind, *arrays):
    arrays = tuple(np.asarray(a) for a in arrays)
    return arrays if kind == "numpy" else tuple(torch.from_numpy(a) for a in arrays)


class _Recorder:
    """Wraps box_iou in the modules that build pairwise blocks; records the largest output (elements)."""

    def __init__(self, monkeypatch):
        self.largest = 0
        orig = nms_mod.box_iou

        def box_iou(a, b):
            out = orig(a, b)
            self.largest = max(self.largest, int(np.prod(out.shape)))
            return out

        for mod in (nms_mod, ens, tm):
            monkeypatch.setattr(mod, "box_iou", box_iou)


def test_row_chunks_cover_the_rows_within_the_block():
    assert row_chunks(3, 10, block_elems=1000) == [(0, 10)]                  # 3 x 10 x 10 fits
    chunks = row_chunks(1, 1000, block_elems=4096)
    assert chunks[0] == (0, 4) and chunks[-1] == (996, 1000) and len(chunks) == 250
    assert all(r1 - r0 == 1 for r0, r1 in row_chunks(1, 10_000, block_elems=100))   # one row at least
    covered = [i for r0, r1 in row_chunks(2, 37, block_elems=200) for i in range(r0, r1)]
    assert covered == list(range(37))


def _run_all(kind, b, s, g, src):
    out = {}
    for method in ("nms", "soft_nms", "soft_nms_linear", "adj_nms"):
        keep, new = suppress_arrays(*_t(kind, b, s, g), method=method, iou_thr=0.5, sigma=0.5, score_thr=0.01)
        order = np.argsort(to_numpy(keep), kind="stable")
        out[method] = (to_numpy(keep)[order], to_numpy(new)[order])
    vb, vs = ens.topk_vote(*_t(kind, b, s, g, src), k=3, score_weight=0.05, box_weight=0.7, min_iou=0.1)
    out["vote"] = (to_numpy(vb), to_numpy(vs))
    out["cross_match"] = tm.cross_match(b, s, g, src, iou_thr=0.4)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_sliced_blocks_give_the_same_results_as_whole_blocks(monkeypatch, kind, seed):
    b, s, g, src = _case(seed, n=400, n_groups=3)                       # groups of ~130 boxes
    whole = _run_all(kind, b, s, g, src)
    rec = _Recorder(monkeypatch)
    monkeypatch.setattr(nms_mod, "BLOCK_ELEMS", 600)                    # ~4 rows of a group per slice
    sliced = _run_all(kind, b, s, g, src)
    assert rec.largest <= 600
    for name, want in whole.items():
        for got, exp in zip(sliced[name], want):
            np.testing.assert_array_equal(got, exp, err_msg=name)
    # the case is not trivial: suppression drops boxes, voting moves them
    assert len(whole["nms"][0]) < len(s) and not np.array_equal(whole["vote"][0], b)


def test_one_huge_group_stays_within_the_block(monkeypatch):
    """One (image, class) of 3,000 boxes without a cap: whole blocks would be 9M IoUs; with a block of 2^15
    elements every array built stays at that size, and hard NMS still matches the reference."""
    b, s, g, src = _case(3, n=3000, n_groups=1)
    rec = _Recorder(monkeypatch)
    monkeypatch.setattr(nms_mod, "BLOCK_ELEMS", 1 << 15)
    keep, _ = suppress_arrays(b, s, g, method="nms", iou_thr=0.5)
    assert set(keep.tolist()) == ref.nms(b, s, g, 0.5)
    suppress_arrays(b, s, g, method="adj_nms", iou_thr=0.5, sigma=0.5, score_thr=0.01)
    ens.topk_vote(b, s, g, src, k=4)
    tm.cross_match(b, s, g, src, iou_thr=0.5)
    assert 0 < rec.largest <= 1 << 15
