import json

import numpy as np
import pandas as pd
import pytest

from stages import ensemble as ensemble_stage
from stages import postprocess as postprocess_stage
from stages import relations as relations_stage
from stages.formats.io import read_provenance, read_table, write_table
from stages.ops.nms import suppress


def _dets(seed, n=400, images=12, model="m"):
    rng = np.random.default_rng(seed)
    c = rng.random((n, 2)) * 0.6
    b = np.concatenate([c, c + rng.random((n, 2)) * 0.4], 1)
    return pd.DataFrame({"image_id": rng.choice([f"img{k:03d}" for k in range(images)], n),
                         "label": rng.choice(["/m/cat", "/m/dog", "/m/animal"], n), "score": rng.random(n),
                         "x_min": b[:, 0], "y_min": b[:, 1], "x_max": b[:, 2], "y_max": b[:, 3], "model": model})


def _key(df):
    return df.sort_values(["image_id", "label", "score", "x_min"]).reset_index(drop=True)


@pytest.mark.parametrize("method", ["nms", "soft_nms", "adj_nms", "none"])
def test_postprocess_roundtrip_shards_equal_whole(tmp_path, method):
    d = _dets(0)
    write_table(tmp_path / "in.parquet", d, "detections")
    out = tmp_path / "out.parquet"
    rc = postprocess_stage.main(["--detections", str(tmp_path / "in.parquet"), "--out", str(out),
                                 "--method", method, "--iou-thr", "0.4", "--score-thr", "0.01",
                                 "--rows-per-shard", "50"])
    assert rc == 0
    got = read_table(out, "detections")
    want = suppress(read_table(tmp_path / "in.parquet", "detections"), method=method, iou_thr=0.4,
                    score_thr=0.01)
    pd.testing.assert_frame_equal(_key(got), _key(want), check_exact=False)
    assert read_provenance(out)["method"] == method


def test_postprocess_hierarchy_relations_cap(tmp_path):
    hier = {"LabelName": "/m/root", "Subcategory": [
        {"LabelName": "/m/animal", "Subcategory": [{"LabelName": "/m/cat"}, {"LabelName": "/m/dog"}]}]}
    (tmp_path / "h.json").write_text(json.dumps(hier))
    write_table(tmp_path / "h.parquet", pd.DataFrame({"child": ["/m/cat", "/m/dog"],
                                                      "parent": ["/m/animal", "/m/animal"]}), "hierarchy")
    d = _dets(1, n=200)
    d = d[d.label != "/m/animal"].reset_index(drop=True)
    write_table(tmp_path / "in.parquet", d, "detections")
    boxes = d.rename(columns={}).drop(columns=["score", "model"]).assign(is_group_of=False)
    write_table(tmp_path / "boxes.parquet", boxes, "boxes")
    splits = pd.DataFrame({"image_id": sorted(set(d.image_id)), "split": "train"})
    write_table(tmp_path / "splits.parquet", splits, "splits")
    assert relations_stage.main(["--boxes", str(tmp_path / "boxes.parquet"), "--splits",
                                 str(tmp_path / "splits.parquet"), "--out", str(tmp_path / "rel.json")]) == 0
    outs = []
    for h in ("h.json", "h.parquet"):
        out = tmp_path / f"out_{h}.parquet"
        assert postprocess_stage.main(["--detections", str(tmp_path / "in.parquet"), "--out", str(out),
                                       "--method", "nms", "--expand-hierarchy", str(tmp_path / h),
                                       "--relations", str(tmp_path / "rel.json"), "--max-per-image", "5"]) == 0
        outs.append(read_table(out, "detections"))
    pd.testing.assert_frame_equal(outs[0], outs[1])
    assert "/m/animal" in set(outs[0].label)
    assert outs[0].groupby("image_id").size().max() <= 5


def test_postprocess_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "bad.parquet").write_text("not parquet")
    rc = postprocess_stage.main(["--detections", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "bad.parquet" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _ap_json(path, aps):
    path.write_text(json.dumps({"mAP": float(np.mean(list(aps.values()))),
                                "per_class": {k: {"name": k, "ap": v} for k, v in aps.items()}}))


def test_ensemble_cli_roundtrip(tmp_path):
    for i in range(2):
        write_table(tmp_path / f"d{i}.parquet", _dets(10 + i, model=f"m{i}"), "detections")
    _ap_json(tmp_path / "a0.json", {"/m/cat": 0.5, "/m/dog": 0.2, "/m/animal": 0.1})
    _ap_json(tmp_path / "a1.json", {"/m/cat": 0.25, "/m/dog": 0.4, "/m/animal": 0.1})
    base = ["--detections", str(tmp_path / "d0.parquet"), str(tmp_path / "d1.parquet")]
    aps = ["--ap-metrics", str(tmp_path / "a0.json"), str(tmp_path / "a1.json")]
    assert ensemble_stage.main(base + aps + ["--out", str(tmp_path / "e.parquet"), "--rows-per-shard", "100"]) == 0
    assert ensemble_stage.main(base + aps + ["--out", str(tmp_path / "e1.parquet")]) == 0
    sharded, whole = read_table(tmp_path / "e.parquet", "detections"), read_table(tmp_path / "e1.parquet",
                                                                                   "detections")
    pd.testing.assert_frame_equal(_key(sharded), _key(whole))
    assert ensemble_stage.main(base + ["--no-reweight", "--no-vote", "--out", str(tmp_path / "e2.parquet")]) == 0
    plain = read_table(tmp_path / "e2.parquet", "detections")
    assert not plain.equals(whole) and len(plain) > 0
    # one model without re-weighting = its post-processing
    assert ensemble_stage.main(["--detections", str(tmp_path / "d0.parquet"), "--no-reweight",
                                "--out", str(tmp_path / "one.parquet")]) == 0
    assert postprocess_stage.main(["--detections", str(tmp_path / "d0.parquet"),
                                   "--out", str(tmp_path / "pp.parquet")]) == 0
    pd.testing.assert_frame_equal(read_table(tmp_path / "one.parquet", "detections"),
                                  read_table(tmp_path / "pp.parquet", "detections"))
    # mismatched AP list
    assert ensemble_stage.main(base + ["--ap-metrics", str(tmp_path / "a0.json"), "--out",
                                       str(tmp_path / "x.parquet")]) == 2


def test_postprocess_keeps_the_upstream_provenance(tmp_path):
    from stages import postprocess
    from stages.formats.io import read_provenance, write_table
    import pandas as pd

    dets = pd.DataFrame({"image_id": ["a", "a"], "label": ["/m/x", "/m/x"], "score": [0.9, 0.8],
                         "x_min": [0.1, 0.1], "y_min": [0.1, 0.1], "x_max": [0.5, 0.5], "y_max": [0.5, 0.52]})
    write_table(tmp_path / "in.parquet", dets, "detections", provenance={"stage": "ensemble", "k": 4})
    assert postprocess.main(["--detections", str(tmp_path / "in.parquet"), "--method", "nms",
                             "--out", str(tmp_path / "out.parquet")]) == 0
    prov = read_provenance(tmp_path / "out.parquet")
    assert prov["stage"] == "postprocess" and prov["method"] == "nms"
    assert prov["upstream"]["stage"] == "ensemble" and prov["upstream"]["k"] == 4
