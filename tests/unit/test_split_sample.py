"""Split: disjoint, complete, deterministic, and closer to the whole's class distribution than a random split
on a long-tailed dataset. Sampling: class-aware weights equal the two-step draw, and training draws exactly the
stage's distribution in every mode."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.formats.tables import NO_CLASS
from stages.models.data import training_draw
from stages.sample import expected_class_frequency, image_weights, sampling_weights
from stages.split import class_counts, js_divergence, random_split, split


def long_tailed_boxes(n_images: int, n_classes: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    freq = 1.0 / np.arange(1, n_classes + 1) ** 1.3          # Zipf-like: head >= 20x tail
    freq /= freq.sum()
    rows = []
    for i in range(n_images):
        for c in rng.choice(n_classes, size=rng.integers(1, 5), p=freq):
            rows.append((f"img{i:05d}", f"/m/c{c:03d}", 0.1, 0.1, 0.5, 0.5, False))
    return pd.DataFrame(rows, columns=["image_id", "label", "x_min", "y_min", "x_max", "y_max", "is_group_of"])


def images_of(boxes: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"image_id": sorted(boxes["image_id"].unique())})


def test_js_divergence_known_values():
    assert js_divergence([1, 0], [1, 0]) == 0.0
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    # hand-computed: p=(.5,.5), q=(1,0): m=(.75,.25); KL(p||m)=.5log2(2/3)+.5log2(2)=0.2075; KL(q||m)=log2(4/3)
    assert js_divergence([0.5, 0.5], [1, 0]) == pytest.approx(0.5 * (0.5 * np.log2(2 / 3) + 0.5 + np.log2(4 / 3)))


def test_split_beats_random_on_long_tail():
    boxes = long_tailed_boxes(1500, 60, seed=1)
    table, report = split(images=images_of(boxes), boxes=boxes, seed=0, mining_iters=1500)
    ids = sorted(boxes["image_id"].unique())
    counts, _ = class_counts(boxes, ids)
    total = counts.sum(0)
    ours = {s: js_divergence(counts[(table["split"] == s).to_numpy()].sum(0), total) for s in ("val_a", "val_b")}
    # several random splits: ours must beat every one of them on both validation parts
    for seed in range(5):
        rnd = random_split(len(ids), (0.8, 0.1, 0.1), seed=seed)
        for s, part in (("val_a", 1), ("val_b", 2)):
            assert ours[s] < js_divergence(counts[rnd == part].sum(0), total)
    assert report["js_divergence"]["val_a"] == pytest.approx(ours["val_a"])


@settings(max_examples=15, deadline=None)
@given(n=st.integers(10, 200), seed=st.integers(0, 3))
def test_split_disjoint_complete_deterministic(n, seed):
    boxes = long_tailed_boxes(n, 12, seed=seed)
    imgs = images_of(boxes)
    t1, _ = split(images=imgs, boxes=boxes, seed=seed, mining_iters=200)
    t2, _ = split(images=imgs.sample(frac=1.0, random_state=1), boxes=boxes, seed=seed, mining_iters=200)
    assert t1.equals(t2)                                     # deterministic, independent of row order
    assert sorted(t1["image_id"]) == sorted(imgs["image_id"])  # complete
    assert not t1["image_id"].duplicated().any()            # disjoint
    sizes = t1["split"].value_counts()
    assert abs(sizes.get("train", 0) - 0.8 * len(imgs)) <= 2


def test_class_counts_sparse_equal_dense_and_categorical_equal_object():
    boxes = long_tailed_boxes(300, 20, seed=4)
    ids = sorted(boxes["image_id"].unique())[::-1][:250]          # some boxes' images left out
    counts, labels = class_counts(boxes, ids)
    dense = np.zeros((len(ids), len(labels)))
    row, col = {v: i for i, v in enumerate(ids)}, {v: i for i, v in enumerate(labels)}
    for img, lab in zip(boxes["image_id"], boxes["label"]):
        if img in row:
            dense[row[img], col[lab]] += 1
    assert labels == sorted(boxes["label"].unique())
    np.testing.assert_array_equal(counts.toarray(), dense)
    cat = boxes.astype({"image_id": "category", "label": "category"})
    c2, l2 = class_counts(cat, ids)
    assert l2 == labels and (c2 != counts).nnz == 0
    t1, _ = split(images=images_of(boxes), boxes=boxes, seed=3)
    t2, _ = split(images=images_of(boxes), boxes=cat, seed=3)
    assert t1.equals(t2)
    for method in ("class_aware", "uniform"):
        pd.testing.assert_frame_equal(sampling_weights(boxes=boxes, image_ids=ids, method=method),
                                      sampling_weights(boxes=cat, image_ids=ids, method=method))


def test_split_keeps_each_class_share_on_a_long_tail():
    """Every class seen in 20+ images reaches both validation parts, and each class's share of val_a is closer
    to 10% than under random splits."""
    boxes = long_tailed_boxes(3000, 80, seed=5)
    table, report = split(images=images_of(boxes), boxes=boxes, seed=0)
    ids = sorted(boxes["image_id"].unique())
    counts, labels = class_counts(boxes, ids)
    common = np.asarray((counts > 0).sum(0)).ravel() >= 20

    def share_error(assign: np.ndarray) -> float:
        return float(np.abs(counts[assign == 1].sum(0)[common] / counts.sum(0)[common] - 0.1).mean())

    ours = table["split"].map({"train": 0, "val_a": 1, "val_b": 2}).to_numpy()
    for part in (1, 2):
        assert (counts[ours == part].sum(0)[common] > 0).all()
    assert max(report["classes_missing"].values()) <= int((~common).sum())
    assert share_error(ours) < min(share_error(random_split(len(ids), (0.8, 0.1, 0.1), seed=s)) for s in range(5))


def test_class_aware_weights_equal_two_step_draw():
    boxes = long_tailed_boxes(300, 10, seed=2)
    ids = sorted(boxes["image_id"].unique())
    table = sampling_weights(boxes=boxes, image_ids=ids, method="class_aware")
    w = image_weights(table)
    # Monte-Carlo of the two-step draw: class uniformly, then an image containing it uniformly
    pres = boxes[["image_id", "label"]].drop_duplicates()
    by_class = pres.groupby("label")["image_id"].apply(list)
    rng = np.random.default_rng(0)
    draws = 200_000
    cls = rng.integers(0, len(by_class), draws)
    hits = pd.Series(0.0, index=ids)
    for c, imgs in enumerate(by_class):
        k = int((cls == c).sum())
        picked = rng.integers(0, len(imgs), k)
        hits = hits.add(pd.Series(np.bincount(picked, minlength=len(imgs)), index=imgs).groupby(level=0).sum(),
                        fill_value=0)
    emp = hits / draws
    assert np.abs(emp.reindex(w.index).to_numpy() - w.to_numpy()).max() < 0.003
    # under class-aware sampling the rarest class is drawn far more often than under uniform sampling
    f_ca = expected_class_frequency(table)
    f_u = expected_class_frequency(sampling_weights(boxes=boxes, image_ids=ids, method="uniform"))
    rare = f_u.index[0]
    assert f_ca[rare] > 3 * f_u[rare]


def test_uniform_weights_and_bad_method():
    boxes = long_tailed_boxes(20, 3, seed=0)
    ids = [*boxes["image_id"].unique(), "bare0", "bare1"]  # two images without a box
    table = sampling_weights(boxes=boxes, image_ids=ids, method="uniform")
    w = image_weights(table)
    assert len(w) == len(ids) and np.allclose(w, 1 / len(ids))
    assert list(table.loc[table["image_id"].str.startswith("bare"), "label"]) == [NO_CLASS, NO_CLASS]
    n_classes = table.groupby("image_id")["label"].transform("size")
    assert np.allclose(table["weight"], 1 / (len(ids) * n_classes))  # split evenly among the image's classes
    ca = sampling_weights(boxes=boxes, image_ids=ids, method="class_aware")
    assert set(ca["image_id"]) == set(boxes["image_id"]) and NO_CLASS not in set(ca["label"])
    with pytest.raises(ValueError, match="unknown sampling method"):
        sampling_weights(boxes=boxes, image_ids=["img00000"], method="bogus")


def _frequencies(keys: np.ndarray, n_keys: int) -> np.ndarray:
    return np.bincount(keys, minlength=n_keys) / len(keys)


def _assert_matches(freq: np.ndarray, p: np.ndarray, n: int) -> None:
    """Monte-Carlo frequencies within 5 standard errors of the probabilities (and nothing drawn where p is 0)."""
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * se + 1e-12), np.max(np.abs(freq - p) / np.maximum(se, 1e-12))


@pytest.mark.parametrize("method", ["class_aware", "uniform"])
@pytest.mark.parametrize("mode", ["image_first", "class_first", "full_class_batch"])
def test_training_draws_the_sample_stages_distribution(method, mode):
    from stages.train import plan_epoch

    boxes = long_tailed_boxes(40, 6, seed=3)
    ids = sorted([*boxes["image_id"].unique(), "bare0"])
    table = sampling_weights(boxes=boxes, image_ids=ids, method=method)
    labels = sorted(boxes["label"].unique())
    label_index = {lab: i + 1 for i, lab in enumerate(labels)}
    draw = training_draw(table, image_ids=ids, label_index=label_index)
    # exact: the draw's pairs are the table's rows, its image probabilities the table's image sums
    assert [(ids[i], labels[c - 1] if c > 0 else NO_CLASS) for i, c in zip(draw.image, draw.cls)] == \
        list(zip(table["image_id"], table["label"]))
    np.testing.assert_allclose(draw.p, table["weight"], rtol=1e-12)
    np.testing.assert_allclose(draw.image_p(), image_weights(table).reindex(ids, fill_value=0.0), rtol=1e-12)
    # Monte-Carlo: what plan_epoch draws
    n = 60_000 if mode == "full_class_batch" else 200_000
    order, classes, _ = plan_epoch(rng=np.random.default_rng(0), n=n, batch_size=4, draw=draw,
                                   class_first=mode == "class_first", full_class_batch=mode == "full_class_batch")
    bent = mode == "full_class_batch" and method == "uniform"
    if not bent:
        _assert_matches(_frequencies(order, len(ids)), draw.image_p(), n)
    if mode == "image_first":
        assert (classes == -1).all()
        return
    pair_of = {(i, c): k for k, (i, c) in enumerate(zip(draw.image, draw.cls))}
    drawn = np.asarray([pair_of[(i, c)] for i, c in zip(order, classes)])  # every draw is a pair of the table
    if bent:  # distinct classes per batch bend a non-uniform class marginal; each class's pairs keep their odds
        for c in np.unique(draw.cls):
            rows = np.flatnonzero(draw.cls == c)
            got = drawn[np.isin(drawn, rows)]
            _assert_matches(_frequencies(np.searchsorted(rows, got), len(rows)), draw.p[rows] / draw.p[rows].sum(),
                            len(got))
        return
    _assert_matches(_frequencies(drawn, len(draw.p)), draw.p, n)


def test_an_expert_model_draws_the_stage_distribution_on_its_classes():
    boxes = long_tailed_boxes(40, 6, seed=4)
    ids = sorted(boxes["image_id"].unique())
    table = sampling_weights(boxes=boxes, image_ids=ids, method="class_aware")
    chosen = ["/m/c001", "/m/c004"]
    draw = training_draw(table, image_ids=ids, label_index={lab: i + 1 for i, lab in enumerate(chosen)})
    kept = table[table["label"].isin(chosen)]
    np.testing.assert_allclose(draw.p, kept["weight"] / kept["weight"].sum(), rtol=1e-12)
    # class-aware over the expert's classes: each class half of the draw
    assert np.isclose(draw.p[draw.cls == 1].sum(), 0.5) and np.isclose(draw.p[draw.cls == 2].sum(), 0.5)
    assert set(np.asarray(ids)[draw.image]) == set(boxes.loc[boxes["label"].isin(chosen), "image_id"])
