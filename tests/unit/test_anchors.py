import json

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from stages.anchors import anchors, kmeans_iou, main, resized_box_wh, wh_iou
from stages.formats.io import write_table

TRUE = np.array([[20.0, 200.0], [60.0, 60.0], [200.0, 20.0]])  # ratios h/w: 10, 1, 0.1


def _clustered(n_per=200, seed=1):
    rng = np.random.default_rng(seed)
    return np.concatenate([c * rng.uniform(0.9, 1.1, size=(n_per, 2)) for c in TRUE])


def test_wh_iou_hand_values():
    iou = wh_iou(np.array([[10.0, 10.0], [4.0, 25.0]]), np.array([[10.0, 10.0], [5.0, 20.0]]))
    # (10,10)vs(5,20): inter 5*10=50, union 100+100-50=150; (4,25)vs(10,10): inter 40, union 100+100-40
    assert np.allclose(iou, [[1.0, 50 / 150], [40 / 160, 80 / 120]])


def test_kmeans_recovers_known_clusters_and_is_deterministic():
    wh = _clustered()
    centres, assign = kmeans_iou(wh, k=3, seed=0)
    assert np.allclose(centres, TRUE[[2, 1, 0]], rtol=0.05)  # sorted by ratio h/w
    assert np.array_equal(np.bincount(assign), [200, 200, 200])
    assert np.array_equal(assign[:200], np.full(200, 2))
    c2, a2 = kmeans_iou(wh, k=3, seed=0)
    assert np.array_equal(centres, c2) and np.array_equal(assign, a2)


def test_anchors_output_plugs_into_anchor_generator():
    out = anchors(wh=_clustered(), k=3, strides=(4, 8), scales=(8, 11))
    assert out.aspect_ratios == [[pytest.approx(0.1, rel=0.05), pytest.approx(1.0, rel=0.05),
                                  pytest.approx(10.0, rel=0.05)]] * 2
    assert out.sizes == [[32.0, 44.0], [64.0, 88.0]]
    assert out.mean_iou > 0.8
    gen = AnchorGenerator(sizes=tuple(map(tuple, out.sizes)), aspect_ratios=tuple(map(tuple, out.aspect_ratios)))
    assert gen.num_anchors_per_location() == [6, 6]
    imgs = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    feats = [torch.zeros(1, 8, 16, 16), torch.zeros(1, 8, 8, 8)]
    (a,) = gen(imgs, feats)
    assert a.shape == (16 * 16 * 6 + 8 * 8 * 6, 4)


def test_resized_box_wh_follows_torchvision_resize():
    boxes = pd.DataFrame({"image_id": ["a", "b"], "x_min": [0.0, 0.0], "y_min": [0.0, 0.0],
                          "x_max": [0.5, 1.0], "y_max": [0.25, 1.0]})
    images = pd.DataFrame({"image_id": ["a", "b"], "width": [400, 4000], "height": [200, 1000]})
    wh = resized_box_wh(boxes, images, min_size=800, max_size=1333)
    # a: scale min(800/200, 1333/400)=3.3325 -> (200*3.3325, 50*3.3325); b: scale 1333/4000
    assert np.allclose(wh, [[666.5, 166.625], [1333.0, 333.25]])


def test_cli_round_trip(tmp_path):
    wh = _clustered(n_per=30)
    n = len(wh)
    ids = [f"i{j}" for j in range(n)]
    boxes = pd.DataFrame({"image_id": ids, "label": "/m/x", "x_min": 0.0, "y_min": 0.0,
                          "x_max": wh[:, 0] / 400, "y_max": wh[:, 1] / 400, "is_group_of": False})
    images = pd.DataFrame({"image_id": ids, "path": "p.jpg", "width": 800, "height": 800})
    splits = pd.DataFrame({"image_id": ids, "split": ["train"] * (n - 5) + ["val_a"] * 5})
    for name, df in (("boxes", boxes), ("images", images), ("splits", splits)):
        write_table(tmp_path / f"{name}.parquet", df, name)
    out = tmp_path / "anchors.json"
    rc = main(["--boxes", str(tmp_path / "boxes.parquet"), "--images", str(tmp_path / "images.parquet"),
               "--splits", str(tmp_path / "splits.parquet"), "--split", "train", "--k", "3", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["num_boxes"] == n - 5
    assert len(res["sizes"]) == 5 and res["sizes"][0] == [32.0, 44.0, 56.0]
    assert res["aspect_ratios"][0] == pytest.approx([0.1, 1.0, 10.0], rel=0.1)
    # image scaled 800 -> 800: box sizes are 2x the clustered ones
    assert np.allclose(sorted(res["centres"], key=lambda c: c[1] / c[0]), 2 * TRUE[[2, 1, 0]], rtol=0.1)
    bad = main(["--boxes", str(tmp_path / "boxes.parquet"), "--images", str(tmp_path / "images.parquet"),
                "--splits", str(tmp_path / "splits.parquet"), "--split", "nope", "--out", str(out)])
    assert bad == 2


def test_bad_input_rejected():
    with pytest.raises(ValueError):
        kmeans_iou(np.ones((2, 2)), k=3)
    with pytest.raises(ValueError):
        kmeans_iou(np.array([[1.0, 0.0], [1.0, 1.0]]), k=1)
