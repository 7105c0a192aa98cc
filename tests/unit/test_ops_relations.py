import numpy as np
import pandas as pd
import pytest

from stages.ops.relations import RelationStats, mine_relations, rescore


def _boxes():
    rows = []
    # 30 images: person with a face inside; 10 of them also a car; 5 images car alone
    for i in range(30):
        rows.append((f"p{i}", "/m/person", 0.1, 0.1, 0.6, 0.9))
        rows.append((f"p{i}", "/m/face", 0.2, 0.15, 0.35, 0.3))
        if i < 10:
            rows.append((f"p{i}", "/m/car", 0.6, 0.5, 1.0, 0.9))
    for i in range(5):
        rows.append((f"c{i}", "/m/car", 0.0, 0.0, 0.5, 0.5))
    d = pd.DataFrame(rows, columns=["image_id", "label", "x_min", "y_min", "x_max", "y_max"])
    d["is_group_of"] = False
    return d


def test_mine_relations_counts_and_roundtrip():
    st = mine_relations(_boxes(), ioa_thr=0.9, images_per_chunk=7)
    ix = {lab: i for i, lab in enumerate(st.labels)}
    p, f, c = ix["/m/person"], ix["/m/face"], ix["/m/car"]
    assert st.n_images == 35
    assert st.labels == ("/m/car", "/m/face", "/m/person")
    assert st.class_count.tolist() == [15, 30, 30]
    assert st.cooc[p, f] == 30 and st.cooc[p, c] == 10 and st.cooc[p, p] == 0
    cond = st.conditional()
    assert cond[p, c] == pytest.approx(10 / 15)       # p(person | car)
    assert cond[c, p] == pytest.approx(10 / 30)       # p(car | person)
    assert st.inside[p, f] == 30 and st.inner_total[p, f] == 30     # faces inside persons
    assert st.contains[p, f] == 30 and st.outer_total[p, f] == 30   # persons contain a face
    assert st.inside[p, c] == 0 and st.inside[f, p] == 0
    back = RelationStats.from_json_obj(st.to_json_obj())
    for name in ("cooc", "inside", "inner_total", "contains", "outer_total", "class_count"):
        assert np.array_equal(getattr(back, name), getattr(st, name))


def test_rescore_cooccurrence_and_surround():
    st = mine_relations(_boxes(), ioa_thr=0.9)
    d = pd.DataFrame({
        "image_id": ["a", "a", "a", "b", "b"],
        "label": ["/m/person", "/m/face", "/m/face", "/m/car", "/m/person"],
        "score": [0.9, 0.4, 0.4, 0.9, 0.1],
        "x_min": [0.1, 0.2, 0.7, 0.0, 0.5], "y_min": [0.1, 0.2, 0.7, 0.0, 0.5],
        "x_max": [0.6, 0.3, 0.8, 0.4, 0.6], "y_max": [0.9, 0.3, 0.8, 0.4, 0.6]})
    out = rescore(d, st, conf_thr=0.5, cooc_weight=0.5, surround_thr=0.9, min_support=20, boost=0.1,
                  penalty=0.1)
    # labels as read from parquet (categorical; with and without a category unknown to the statistics)
    for extra in ([], ["/m/unknown"]):
        cat = d.assign(label=pd.Categorical(d["label"], categories=[*sorted(set(d["label"])), *extra]))
        np.testing.assert_array_equal(rescore(cat, st, conf_thr=0.5, cooc_weight=0.5, surround_thr=0.9,
                                              min_support=20, boost=0.1, penalty=0.1)["score"], out["score"])
    s = out["score"].tolist()
    # face: p(face|person)=1, target 0.9 -> max raised to 0.4 + 0.5*(0.9-0.4) = 0.65, scale 0.65/0.4
    # then the face inside the person is boosted, the one outside is penalised
    assert s[1] == pytest.approx(0.65 * 1.1)
    assert s[2] == pytest.approx(0.65 * 0.9)
    # person in b: p(person|car)=10/15, target 0.6 -> 0.1 + 0.5*(0.6-0.1) = 0.35; persons usually contain a
    # face but b has no confident face -> the rule does not apply
    assert s[4] == pytest.approx(0.35)
    # the person in a contains the confident-free face? faces are 0.4 < conf_thr: rule not applied
    assert s[0] == pytest.approx(0.9)
    assert s[3] == pytest.approx(0.9)
