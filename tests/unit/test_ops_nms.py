import numpy as np
import pandas as pd
import pytest
import torch

from stages.ops._array import to_numpy
from stages.ops.boxes import box_ioa, box_iou, paired_ioa, paired_iou
from stages.ops.nms import (
    adj_nms,
    cap_per_group,
    group_ids,
    nms,
    soft_nms,
    suppress,
    suppress_arrays,
    top_per_image,
)
from tests import ops_reference as ref


def _case(seed, n=120, n_groups=7, grid=None, ties=False):
    rng = np.random.default_rng(seed)
    b = ref.random_boxes(rng, n, grid=grid)
    s = rng.integers(1, 6, n) / 5.0 if ties else rng.random(n)
    g = rng.integers(0, n_groups, n)
    return b, s, g


@pytest.fixture(params=["numpy", "torch"])
def kind(request):
    """The ops take numpy arrays (the CPU path) or torch tensors (the GPU path): every case runs on both."""
    return request.param


def _t(kind, b, s, g):
    arrays = (np.asarray(b, np.float64), np.asarray(s, np.float64), np.asarray(g, np.int64))
    return arrays if kind == "numpy" else tuple(torch.from_numpy(a) for a in arrays)


def N(x):
    return to_numpy(x)


def test_box_iou_and_ioa_hand_computed():
    a = np.array([[0.0, 0.0, 0.5, 0.5]])
    b = np.array([[0.0, 0.0, 0.25, 0.5], [0.5, 0.5, 1.0, 1.0], [0.2, 0.2, 0.2, 0.2]])
    assert np.allclose(box_iou(a, b), [[0.5, 0.0, 0.0]])
    assert np.allclose(box_ioa(b, a), [[1.0], [0.0], [0.0]])
    assert np.allclose(box_ioa(a, b), [[0.5, 0.0, 0.0]])
    t = box_iou(torch.from_numpy(a), torch.from_numpy(a))
    assert isinstance(t, torch.Tensor) and float(t) == 1.0


def test_paired_and_pairwise_overlaps_match_the_reference_loop(kind):
    rng = np.random.default_rng(3)
    a, b = ref.random_boxes(rng, 40, grid=4), ref.random_boxes(rng, 40, grid=4)  # grid: touching / equal boxes
    a[5] = [0.2, 0.2, 0.2, 0.6]  # zero area: IoA 0
    (ta, _, _), (tb, _, _) = _t(kind, a, [0], [0]), _t(kind, b, [0], [0])
    iou = [[ref.iou(x, y) for y in b] for x in a]
    ioa = [[ref.ioa(x, y) for y in b] for x in a]
    np.testing.assert_allclose(N(box_iou(ta, tb)), iou, atol=1e-12)
    np.testing.assert_allclose(N(box_ioa(ta, tb)), ioa, atol=1e-12)
    np.testing.assert_allclose(N(paired_iou(ta, tb)), np.diag(iou), atol=1e-12)
    np.testing.assert_allclose(N(paired_ioa(ta, tb)), np.diag(ioa), atol=1e-12)
    # yxyx boxes give the same values (both axes are treated alike)
    np.testing.assert_array_equal(N(paired_ioa(ta[:, [1, 0, 3, 2]], tb[:, [1, 0, 3, 2]])), N(paired_ioa(ta, tb)))


@pytest.mark.parametrize("grid,ties", [(None, False), (8, True), (4, False)])
@pytest.mark.parametrize("thr", [0.3, 0.5])
def test_nms_matches_reference(grid, ties, thr, kind):
    b, s, g = _case(1, grid=grid, ties=ties)
    keep = N(nms(*_t(kind, b, s, g), iou_thr=thr))
    assert set(keep.tolist()) == ref.nms(b, s, g, thr)
    assert len(set(keep.tolist())) == len(keep)
    assert np.all(np.diff(s[keep]) <= 0)


def test_nms_boxes_exactly_at_threshold_are_kept(kind):
    # IoU exactly 0.5 (dyadic coordinates, exact in float64): kept at thr 0.5, dropped at any lower thr
    b = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.25, 0.5], [0.0, 0.0, 0.5, 0.25]])
    s = np.array([0.9, 0.8, 0.8])
    g = np.zeros(3, dtype=np.int64)
    assert sorted(nms(*_t(kind, b, s, g), iou_thr=0.5).tolist()) == [0, 1, 2]
    assert nms(*_t(kind, b, s, g), iou_thr=0.4999).tolist() == [0]
    # different groups never suppress each other
    assert sorted(nms(*_t(kind, b, s, np.arange(3)), iou_thr=0.1).tolist()) == [0, 1, 2]


def test_nms_tie_goes_to_lower_index(kind):
    b = np.array([[0.1, 0.1, 0.6, 0.6], [0.1, 0.1, 0.6, 0.6]])
    assert nms(*_t(kind, b, np.array([0.5, 0.5]), np.zeros(2, dtype=np.int64)), iou_thr=0.5).tolist() == [0]


@pytest.mark.parametrize("method", ["gaussian", "linear"])
@pytest.mark.parametrize("grid,ties", [(None, False), (8, True)])
def test_soft_nms_matches_reference(method, grid, ties, kind):
    b, s, g = _case(2, grid=grid, ties=ties)
    keep, new = soft_nms(*_t(kind, b, s, g), method=method, iou_thr=0.5, sigma=0.5, score_thr=0.05)
    want = ref.soft_nms(b, s, g, method=method, thr=0.5, sigma=0.5, score_thr=0.05)
    assert set(keep.tolist()) == set(want)
    assert np.allclose(N(new), [want[i] for i in keep.tolist()], rtol=1e-12, atol=0)
    assert np.all(np.diff(N(new)) <= 0)


def test_soft_nms_linear_at_threshold_does_not_decay(kind):
    b = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.25, 0.5]])    # IoU exactly 0.5
    _, new = soft_nms(*_t(kind, b, np.array([0.9, 0.8]), np.zeros(2, dtype=np.int64)), method="linear",
                      iou_thr=0.5)
    assert new.tolist() == [0.9, 0.8]
    keep, new = soft_nms(*_t(kind, b, np.array([0.9, 0.8]), np.zeros(2, dtype=np.int64)), method="linear",
                         iou_thr=0.49)
    assert new.tolist() == [0.9, 0.4]


def test_soft_nms_same_kept_boxes_as_ensemble_boxes(kind):
    eb = pytest.importorskip("ensemble_boxes")
    rng = np.random.default_rng(3)
    c = rng.random((60, 2)) * 0.6
    b = np.concatenate([c, c + rng.random((60, 2)) * 0.4 + 0.01], 1)
    s = rng.random(60)
    lab = rng.integers(0, 4, 60)
    bb, ss, ll = eb.soft_nms([b], [s], [lab], method=2, sigma=0.5, thresh=0.001)
    keep, new = soft_nms(*_t(kind, b, s, lab), sigma=0.5, score_thr=0.001)
    key = lambda boxes, labels: sorted(map(tuple, np.round(np.c_[labels, boxes], 12).tolist()))  # noqa: E731
    assert key(b[N(keep)], lab[N(keep)]) == key(bb, ll)
    # ensemble_boxes returns the original scores of the kept boxes; ours are decayed (never higher)
    assert sorted(ss.tolist()) == sorted(s[N(keep)].tolist())
    assert np.all(N(new) <= s[N(keep)])


def test_adj_nms_is_nms_then_gaussian_reweighting(kind):
    b, s, g = _case(4, grid=8, ties=True)
    keep, new = adj_nms(*_t(kind, b, s, g), iou_thr=0.5, sigma=0.5, score_thr=0.001)
    k1 = sorted(ref.nms(b, s, g, 0.5))
    want = ref.soft_nms(b[k1], s[k1], g[k1], method="gaussian", sigma=0.5, score_thr=0.001)
    assert set(keep.tolist()) == {k1[i] for i in want}
    got = dict(zip(keep.tolist(), new.tolist()))
    assert all(abs(got[k1[i]] - v) < 1e-12 for i, v in want.items())


def test_empty_and_singletons():
    e = torch.zeros((0, 4), dtype=torch.float64)
    z = torch.zeros(0, dtype=torch.float64)
    zi = torch.zeros(0, dtype=torch.int64)
    assert nms(e, z, zi).numel() == 0
    assert soft_nms(e, z, zi)[0].numel() == 0
    k, s = soft_nms(torch.tensor([[0.1, 0.1, 0.2, 0.2]], dtype=torch.float64), torch.tensor([0.5],
                    dtype=torch.float64), torch.tensor([3]))
    assert k.tolist() == [0] and s.tolist() == [0.5]
    with pytest.raises(ValueError):
        soft_nms(e, z, zi, method="hard")


def _frame(b, s, g, images=3):
    return pd.DataFrame({"image_id": [f"img{x % images}" for x in g], "label": [f"/m/{x // images}" for x in g],
                         "score": s, "x_min": b[:, 0], "y_min": b[:, 1], "x_max": b[:, 2], "y_max": b[:, 3]})


@pytest.mark.parametrize("method", ["nms", "soft_nms", "soft_nms_linear", "adj_nms", "none"])
def test_suppress_frame_matches_tensor_ops(method, kind):
    b, s, g = _case(5, n=200, n_groups=12)
    df = _frame(b, s, g)
    out = suppress(df, method=method, iou_thr=0.5, sigma=0.5, score_thr=0.01)
    gid = group_ids(df["image_id"], df["label"])
    args = _t(kind, b, s, gid)
    if method == "nms":
        k = nms(*args, iou_thr=0.5)
        want = s[N(k)]
    elif method == "adj_nms":
        k, want = adj_nms(*args, score_thr=0.01)
    elif method == "none":
        k = np.flatnonzero(s > 0.01)
        want = s[N(k)]
    else:
        k, want = soft_nms(*args, method="linear" if method.endswith("linear") else "gaussian", score_thr=0.01)
    assert len(out) == len(k)
    assert sorted(np.asarray(want).tolist()) == pytest.approx(sorted(out["score"].tolist()))
    # sorted by image then score desc
    assert out["image_id"].is_monotonic_increasing
    for _, grp in out.groupby("image_id"):
        assert grp["score"].is_monotonic_decreasing


def test_top_per_image():
    b, s, g = _case(6, n=50)
    out = top_per_image(_frame(b, s, g), max_per_image=4)
    assert out.groupby("image_id").size().max() == 4
    full = _frame(b, s, g)
    for img, grp in out.groupby("image_id"):
        assert sorted(grp["score"]) == sorted(full[full.image_id == img]["score"].nlargest(4))


def _ref_cap(s, g, cap) -> list[int]:
    """Slow reference: per group, the ``cap`` first boxes by (score desc, index asc)."""
    keep = []
    for grp in np.unique(g):
        idx = sorted(np.flatnonzero(g == grp), key=lambda i: (-s[i], i))
        keep += idx[:cap]
    return sorted(keep)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("cap", [1, 3, 10])
def test_cap_per_group_keeps_the_top_k_of_each_group(cap, ties, kind):
    rng = np.random.default_rng(cap)
    n = 300
    g = np.concatenate([rng.integers(0, 6, n - 20), 1000 + np.arange(20)])   # big groups + singletons
    g = 37 * g + 5                                                            # sparse ids
    s = rng.integers(1, 5, n) / 4.0 if ties else rng.random(n)
    _, ts, tg = _t(kind, np.zeros((n, 4)), s, g)
    got = cap_per_group(tg, ts, max_per_class=cap)
    assert type(got) is type(ts)
    assert N(got).tolist() == _ref_cap(s, g, cap)
    kept = np.bincount(np.unique(g, return_inverse=True)[1][N(got)])
    full = np.bincount(np.unique(g, return_inverse=True)[1])
    assert (kept == np.minimum(full, cap)).all()            # exactly min(size, cap) per group


def test_cap_per_group_leaves_groups_under_the_cap_untouched(kind):
    b, s, g = _case(11, n=200, n_groups=9)
    _, ts, tg = _t(kind, b, s, g)
    biggest = int(np.bincount(g).max())
    assert N(cap_per_group(tg, ts, max_per_class=biggest)).tolist() == list(range(200))
    # a cap that bites only the groups above it: the others keep every box
    cap = biggest - 3
    got = set(N(cap_per_group(tg, ts, max_per_class=cap)).tolist())
    for grp in np.unique(g):
        idx = np.flatnonzero(g == grp)
        if len(idx) <= cap:
            assert set(idx.tolist()) <= got
        else:
            assert len(set(idx.tolist()) & got) == cap
    assert N(cap_per_group(tg[:0], ts[:0], max_per_class=5)).tolist() == []
    with pytest.raises(ValueError, match="max_per_class"):
        cap_per_group(tg, ts, max_per_class=0)


@pytest.mark.parametrize("method", ["nms", "soft_nms", "adj_nms", "none"])
def test_suppress_with_a_cap(method, kind):
    """A cap above every group changes nothing; a cap that bites = suppressing the capped boxes only
    (``none`` has no pairwise step: no cap)."""
    b, s, g = _case(12, n=240, n_groups=5)
    df = _frame(b, s, g)
    plain = suppress(df, method=method, score_thr=0.01)
    pd.testing.assert_frame_equal(suppress(df, method=method, score_thr=0.01, max_per_class=240), plain)
    capped = suppress(df, method=method, score_thr=0.01, max_per_class=10)
    if method == "none":
        pd.testing.assert_frame_equal(capped, plain)
        return
    gid = group_ids(df["image_id"], df["label"])
    top = np.asarray(_ref_cap(s, gid, 10))
    pd.testing.assert_frame_equal(capped, suppress(df.iloc[top].reset_index(drop=True), method=method,
                                                   score_thr=0.01))
    assert capped.groupby(["image_id", "label"]).size().max() <= 10
    # the array op maps the kept boxes back to the input rows
    tb, ts, tg = _t(kind, b, s, gid)
    keep, new = suppress_arrays(tb, ts, tg, method=method, score_thr=0.01, max_per_class=10)
    assert set(N(keep).tolist()) <= set(top.tolist())
    if method == "nms":
        assert np.array_equal(N(new), s[N(keep)])
