import numpy as np
import pandas as pd
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.formats.hierarchy import Hierarchy
from stages.ops._array import to_numpy
from stages.ops.boxes import box_iou
from stages.ops.ensemble import topk_vote
from stages.ops.hierarchy import expand_hierarchy
from stages.ops.nms import adj_nms, nms, soft_nms
from tests import ops_reference as ref

coord = st.integers(0, 8).map(lambda v: v / 8)      # a lattice: exact IoUs, threshold hits, ties


@st.composite
def box_sets(draw, max_n=25):
    n = draw(st.integers(0, max_n))
    raw = np.array(draw(st.lists(st.tuples(coord, coord, coord, coord), min_size=n, max_size=n)),
                   dtype=np.float64).reshape(n, 4)
    b = np.c_[np.minimum(raw[:, 0], raw[:, 2]), np.minimum(raw[:, 1], raw[:, 3]),
              np.maximum(raw[:, 0], raw[:, 2]), np.maximum(raw[:, 1], raw[:, 3])]
    s = np.array(draw(st.lists(st.integers(1, 10).map(lambda v: v / 10), min_size=n, max_size=n)))
    g = np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), dtype=np.int64)
    arrays = (b, s.astype(np.float64), g)
    # the ops run on numpy arrays (CPU) and torch tensors (GPU path): draw both
    return arrays if draw(st.booleans()) else tuple(torch.from_numpy(a) for a in arrays)


thr = st.sampled_from([0.0, 0.25, 0.5, 0.7])


@settings(max_examples=60, deadline=None)
@given(box_sets(), thr)
def test_nms_subset_no_pair_above_thr(args, t):
    k = to_numpy(nms(*args, iou_thr=t))
    b, s, g = (to_numpy(a) for a in args)
    assert len(set(k.tolist())) == len(k) and set(k.tolist()) <= set(range(len(s)))
    assert set(k.tolist()) == ref.nms(b, s, g, t)
    iou = box_iou(b[k], b[k])
    same = (g[k][:, None] == g[k][None, :]) & ~np.eye(len(k), dtype=bool)
    assert not (iou[same] > t).any()
    assert (s[k][1:] <= s[k][:-1]).all()


@settings(max_examples=60, deadline=None)
@given(box_sets(), st.sampled_from(["gaussian", "linear"]), thr)
def test_soft_nms_never_raises_a_score(args, method, t):
    k, new = (to_numpy(a) for a in soft_nms(*args, method=method, iou_thr=t, sigma=0.5, score_thr=0.001))
    s = to_numpy(args[1])
    assert (new <= s[k]).all()
    assert (new > 0.001).all()


@settings(max_examples=60, deadline=None)
@given(box_sets(), thr)
def test_adj_nms_keeps_a_subset_of_nms(args, t):
    k, new = (to_numpy(a) for a in adj_nms(*args, iou_thr=t, sigma=0.5, score_thr=0.001))
    assert set(k.tolist()) <= set(to_numpy(nms(*args, iou_thr=t)).tolist())
    assert (new <= to_numpy(args[1])[k]).all()


@settings(max_examples=40, deadline=None)
@given(box_sets())
def test_voting_with_k0_is_identity(args):
    b, s, g = args
    nb, ns = topk_vote(b, s, g, g * 0 + 1, k=0)
    assert type(nb) is type(b)
    assert np.array_equal(to_numpy(nb), to_numpy(b)) and np.array_equal(to_numpy(ns), to_numpy(s))


H = Hierarchy.from_json_obj({"LabelName": "/m/root", "Subcategory": [
    {"LabelName": "a", "Subcategory": [{"LabelName": "b", "Subcategory": [{"LabelName": "c"}]}]},
    {"LabelName": "d", "Subcategory": [{"LabelName": "c"}]}]})


@settings(max_examples=40, deadline=None)
@given(box_sets(max_n=15), st.lists(st.sampled_from(["a", "b", "c", "d", "x"]), min_size=15, max_size=15))
def test_expansion_idempotent(args, labels):
    b, s, g = (to_numpy(a) for a in args)
    n = len(s)
    d = pd.DataFrame({"image_id": [f"i{v}" for v in g.tolist()], "label": labels[:n], "score": s,
                      "x_min": b[:, 0], "y_min": b[:, 1], "x_max": b[:, 2], "y_max": b[:, 3]})
    once = expand_hierarchy(d, H)
    pd.testing.assert_frame_equal(expand_hierarchy(once, H), once)
    assert set(once["label"]) <= set(labels[:n]) | {"a", "b", "d"}
