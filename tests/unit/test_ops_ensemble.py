import numpy as np
import pandas as pd
import pytest
import torch

from stages.formats.hierarchy import Hierarchy
from stages.ops._array import to_numpy
from stages.ops.ensemble import ap_factors, naive_ensemble, reweight, topk_vote, view_ids
from stages.ops.hierarchy import expand_hierarchy
from stages.ops.nms import group_ids, suppress
from tests import ops_reference as ref

H = Hierarchy.from_json_obj({"LabelName": "/m/root", "Subcategory": [
    {"LabelName": "/m/animal", "Subcategory": [{"LabelName": "/m/cat"}, {"LabelName": "/m/dog"}]},
    {"LabelName": "/m/pet", "Subcategory": [{"LabelName": "/m/cat"}]}]})


def _dets(rng, n, labels=("/m/cat", "/m/dog"), images=3, model=None):
    b = ref.random_boxes(rng, n)
    d = pd.DataFrame({"image_id": rng.choice([f"i{k}" for k in range(images)], n),
                      "label": rng.choice(list(labels), n), "score": rng.random(n),
                      "x_min": b[:, 0], "y_min": b[:, 1], "x_max": b[:, 2], "y_max": b[:, 3]})
    if model:
        d["model"] = model
    return d


def test_expand_hierarchy_hand_case():
    d = pd.DataFrame({"image_id": ["a", "a", "a"], "label": ["/m/cat", "/m/animal", "/m/unknown"],
                      "score": [0.6, 0.9, 0.3], "x_min": [0.1, 0.1, 0.0], "y_min": [0.1, 0.1, 0.0],
                      "x_max": [0.5, 0.5, 1.0], "y_max": [0.5, 0.5, 1.0]})
    out = expand_hierarchy(d, H)
    got = {(r.label, r.score) for r in out.itertuples()}
    # cat -> animal (duplicate box: the 0.9 animal row wins) and pet; unknown passes through
    assert got == {("/m/cat", 0.6), ("/m/animal", 0.9), ("/m/pet", 0.6), ("/m/unknown", 0.3)}


def test_expand_hierarchy_matches_reference_and_is_idempotent():
    d = _dets(np.random.default_rng(0), 40, labels=("/m/cat", "/m/dog", "/m/animal"))
    out = expand_hierarchy(d, H)
    want = {}
    for r in d.itertuples():
        for lab in {r.label} | H.ancestors(r.label):
            key = (r.image_id, lab, r.x_min, r.y_min, r.x_max, r.y_max)
            want[key] = max(want.get(key, -1), r.score)
    got = {(r.image_id, r.label, r.x_min, r.y_min, r.x_max, r.y_max): r.score for r in out.itertuples()}
    assert got == want
    pd.testing.assert_frame_equal(expand_hierarchy(out, H), out)


def test_ap_factors_formula():
    f = ap_factors([{"a": 0.5, "b": 0.0, "c": 0.2}, {"a": 0.25, "b": 0.0, "d": float("nan")}])
    assert f[0] == {"a": 1.0, "c": 1.0}
    assert f[1] == {"a": 0.5}
    d = pd.DataFrame({"label": ["a", "b", "c"], "score": [0.8, 0.8, 0.8]})
    assert reweight(d, f[1])["score"].tolist() == [0.4, 0.8, 0.8]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_vote_matches_reference(k, kind):
    rng = np.random.default_rng(k)
    n = 90
    c = rng.random((n, 2)) * 0.5
    b = np.concatenate([c, c + rng.random((n, 2)) * 0.5], 1)
    s, g, src = rng.random(n), rng.integers(0, 4, n), rng.integers(0, 3, n)
    arrays = (b, s, g, src) if kind == "numpy" else tuple(torch.from_numpy(a) for a in (b, s, g, src))
    nb, ns = topk_vote(*arrays, k=k)
    assert type(nb) is type(arrays[0])
    wb, ws = ref.vote(b, s, g, src, k=k)
    assert np.allclose(to_numpy(nb), wb, atol=1e-12) and np.allclose(to_numpy(ns), ws, atol=1e-12)


def test_vote_hand_case():
    b = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.0, 0.0, 0.5, 0.5], [0.8, 0.8, 0.9, 0.9]], dtype=torch.float64)
    s = torch.tensor([0.9, 0.5, 0.7], dtype=torch.float64)
    nb, ns = topk_vote(b, s, torch.zeros(3, dtype=torch.int64), torch.tensor([0, 1, 1]), k=4)
    assert ns.tolist() == pytest.approx([0.9 + 0.05 * 0.5, 0.5 + 0.05 * 0.9, 0.7])  # box 2 overlaps nothing
    assert nb[0].tolist() == pytest.approx([0, 0, 0.7 * 0.4 + 0.3 * 0.5, 0.7 * 0.4 + 0.3 * 0.5])
    assert nb[2].tolist() == b[2].tolist()


@pytest.mark.parametrize("method", ["adj_nms", "nms", "soft_nms"])
def test_one_model_ensemble_is_that_models_postprocessing(method):
    d = _dets(np.random.default_rng(7), 150, model="m1")
    aps = [{"/m/cat": 0.3, "/m/dog": 0.0}]
    out = naive_ensemble([d], ap_per_model=aps, k=4, method=method)
    pd.testing.assert_frame_equal(out, suppress(d, method=method))


def test_ensemble_reweights_and_votes():
    rng = np.random.default_rng(8)
    a, b = _dets(rng, 80, model="a"), _dets(rng, 80, model="b")
    aps = [{"/m/cat": 0.4, "/m/dog": 0.2}, {"/m/cat": 0.2, "/m/dog": 0.2}]
    plain = naive_ensemble([a, b], ap_per_model=None, k=0, method="none", score_thr=0)
    assert len(plain) == 160
    rw = naive_ensemble([a, b], ap_per_model=aps, k=0, method="none", score_thr=0)
    cat_b = rw[(rw.model == "b") & (rw.label == "/m/cat")]["score"].sort_values().to_numpy()
    want = b[b.label == "/m/cat"]["score"].sort_values().to_numpy() * 0.5
    assert np.allclose(cat_b, want)
    voted = naive_ensemble([a, b], ap_per_model=None, k=4, method="none", score_thr=0)
    assert (voted["score"].sum() > plain["score"].sum())


def test_a_model_with_ap_0_on_a_class_leaves_it_untouched():
    rng = np.random.default_rng(9)
    a, b = _dets(rng, 80, model="a"), _dets(rng, 80, model="b")
    aps = [{"/m/cat": 0.4, "/m/dog": 0.3}, {"/m/cat": 0.0, "/m/dog": 0.3}]
    both = naive_ensemble([a, b], ap_per_model=aps, k=4, method="adj_nms", score_thr=0)
    cats = both[both.label == "/m/cat"]
    assert set(cats["model"]) == {"a"}     # b has no say on cats: no box, and no vote on a's boxes
    cols = ["image_id", "label", "x_min", "y_min", "x_max", "y_max", "score"]
    alone = naive_ensemble([a[a.label == "/m/cat"]], ap_per_model=None, k=4, method="adj_nms", score_thr=0)
    pd.testing.assert_frame_equal(cats[cols].reset_index(drop=True), alone[cols].reset_index(drop=True))
    dogs = both[both.label == "/m/dog"]
    assert set(dogs["model"]) == {"a", "b"}


def _views(rng, n, *, model, views=((288, False), (288, True)), images=3):
    """A model's detections at several test-time views: the same objects, jittered per view."""
    base = _dets(rng, n, images=images, model=model)
    out = []
    for scale, flip in views:
        d = base.copy()
        for c in ("x_min", "y_min", "x_max", "y_max"):
            d[c] = d[c] + rng.normal(0, 0.01, n)
        d["score"] = np.clip(d["score"] + rng.normal(0, 0.05, n), 0.01, 1)
        out.append(d.assign(scale=np.int32(scale), flip=flip))
    return pd.concat(out, ignore_index=True)


def test_view_ids():
    d = pd.DataFrame({"scale": np.array([600, 800, 600, 600], np.int32), "flip": [False, False, True, False]})
    assert view_ids(d)[0].tolist() == [0, 2, 1, 0] and view_ids(d)[1] == 3
    assert view_ids(d[["scale"]])[1] == 2
    assert view_ids(pd.DataFrame({"score": [0.1, 0.2]}))[0].tolist() == [0, 0]


def test_merge_views_merges_each_models_views_first():
    """With merge_views each model's views are ensembled like models (vote across views, then the suppression),
    then the models are: the same as a two-level ensemble built by hand."""
    rng = np.random.default_rng(21)
    a, b = _views(rng, 60, model="a"), _views(rng, 60, model="b", views=((600, False), (800, False), (800, True)))
    c = _dets(rng, 60, model="c")                      # one view (no view columns): comes in as it is
    aps = [{"/m/cat": 0.4, "/m/dog": 0.2}, {"/m/cat": 0.2, "/m/dog": 0.3}, {"/m/cat": 0.1}]
    out = naive_ensemble([a, b, c], ap_per_model=aps, k=4, merge_views=True)
    f = ap_factors(aps)
    per_model = [naive_ensemble([g for _, g in reweight(d, f[i]).groupby(["scale", "flip"])], merge_views=False)
                 for i, d in enumerate((a, b))]
    want = naive_ensemble([*per_model, reweight(c, f[2])], k=4, merge_views=False)
    pd.testing.assert_frame_equal(out, want)
    # without it every view of every model is in one pool (a model's views do not vote for each other)
    pooled = naive_ensemble([a, b, c], ap_per_model=aps, k=4, merge_views=False)
    assert not pooled.equals(out)


def test_merge_views_of_one_model():
    """A one-model ensemble is its view merge: the views vote for each other (scores only rise before the
    suppression), then one suppression; without view columns it is the model's post-processing either way."""
    rng = np.random.default_rng(22)
    a = _views(rng, 80, model="a")
    merged = naive_ensemble([a], k=4, merge_views=True)
    views = [g for _, g in a.groupby(["scale", "flip"])]
    pd.testing.assert_frame_equal(merged, naive_ensemble(views, k=4, merge_views=False))
    pd.testing.assert_frame_equal(naive_ensemble([a], k=4, merge_views=False), suppress(a))
    plain = a.drop(columns=["scale", "flip"])
    pd.testing.assert_frame_equal(naive_ensemble([plain], k=4, merge_views=True), suppress(plain))
    voted = naive_ensemble([a], k=4, method="none", score_thr=0, merge_views=True)
    assert len(voted) == len(a) and voted["score"].sum() > a["score"].sum()


def test_ensemble_cap_per_class():
    """A cap above every pool changes nothing; a cap that bites keeps each pool's best boxes (before voting)."""
    rng = np.random.default_rng(23)
    a, b = _views(rng, 150, model="a", images=2), _dets(rng, 150, model="b", images=2)
    for merge_views in (True, False):
        plain = naive_ensemble([a, b], k=4, merge_views=merge_views)
        pd.testing.assert_frame_equal(naive_ensemble([a, b], k=4, max_per_class=300, merge_views=merge_views),
                                      plain)
    capped = naive_ensemble([a, b], k=4, method="none", score_thr=0, max_per_class=5, merge_views=False)
    pool = pd.concat([a, b], ignore_index=True)
    g = group_ids(pool["image_id"], pool["label"])
    assert len(capped) == np.minimum(np.bincount(np.unique(g, return_inverse=True)[1]), 5).sum()
    # the voters are the top 5 of each pool: the same as ensembling only those rows
    top = pool.assign(g=g).sort_values(["g", "score"], ascending=[True, False], kind="stable").groupby("g").head(5)
    a_top, b_top = top[top.model == "a"].drop(columns="g"), top[top.model == "b"].drop(columns="g")
    want = naive_ensemble([a_top, b_top], k=4, method="none", score_thr=0, merge_views=False)
    pd.testing.assert_frame_equal(capped.drop(columns=["scale", "flip"]),
                                  want.drop(columns=["scale", "flip"]), check_categorical=False)
