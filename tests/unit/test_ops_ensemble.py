import numpy as np
import pandas as pd
import pytest
import torch

from stages.formats.hierarchy import Hierarchy
from stages.ops._array import to_numpy
from stages.ops.ensemble import ap_factors, naive_ensemble, reweight, topk_vote
from stages.ops.hierarchy import expand_hierarchy
from stages.ops.nms import suppress
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
