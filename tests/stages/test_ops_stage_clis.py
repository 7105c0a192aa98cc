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


def test_rescoring_parameters_reach_the_rescoring_and_empty_optional_files_switch_steps_off(tmp_path):
    """The DAG passes ``--relations`` / ``--expand-hierarchy`` without a file when the config turns the step off;
    with a file, the rescoring config keys decide what rescoring does (all effects 0: no change)."""
    d = _dets(2, n=300)
    write_table(tmp_path / "in.parquet", d, "detections")
    boxes = d.drop(columns=["score", "model"]).assign(is_group_of=False)
    write_table(tmp_path / "boxes.parquet", boxes, "boxes")
    assert relations_stage.main(["--boxes", str(tmp_path / "boxes.parquet"), "--ioa-thr", "0.5",
                                 "--out", str(tmp_path / "rel.json")]) == 0
    assert json.loads((tmp_path / "rel.json").read_text())["ioa_thr"] == 0.5

    def run(name, *args):
        out = tmp_path / f"{name}.parquet"
        assert postprocess_stage.main(["--detections", str(tmp_path / "in.parquet"), *args, "--method", "nms",
                                       "--out", str(out)]) == 0
        return _key(read_table(out, "detections"))

    plain = run("plain", "--expand-hierarchy", "--relations")
    pd.testing.assert_frame_equal(plain, run("flagless"))
    rel = ["--relations", str(tmp_path / "rel.json"), "--min-support", "1", "--surround-thr", "0.1"]
    neutral = run("neutral", *rel, "--cooc-weight", "0", "--boost", "0", "--penalty", "0")
    pd.testing.assert_frame_equal(neutral, plain)
    rescored = run("rescored", *rel)
    assert len(rescored) == len(plain) and not np.allclose(rescored["score"], plain["score"])
    assert read_provenance(tmp_path / "rescored.parquet")["rescore"]["min_support"] == 1


def test_gather_form_keeps_every_row(tmp_path):
    """The DAG's gather: ``--method none --score-thr 0 --max-per-image 0`` only joins files."""
    parts = [_dets(3, n=500), _dets(4, n=400)]
    for i, part in enumerate(parts):
        write_table(tmp_path / f"s{i}.parquet", part, "detections")
    assert postprocess_stage.main(["--detections", str(tmp_path / "s0.parquet"), str(tmp_path / "s1.parquet"),
                                   "--method", "none", "--score-thr", "0", "--max-per-image", "0",
                                   "--out", str(tmp_path / "all.parquet")]) == 0
    pd.testing.assert_frame_equal(_key(read_table(tmp_path / "all.parquet", "detections")),
                                  _key(pd.concat(parts)), check_categorical=False)


def test_cli_options_are_the_schema_keys(capsys):
    """Option defaults, types and choices come from the config schema; bad values exit 2 naming the option."""
    from stages.core.config import schema_default

    a = postprocess_stage.parse_args(["--detections", "x.parquet", "--out", "y.parquet"])
    for key in ("method", "iou_thr", "sigma", "score_thr", "max_per_image", "max_per_class", "conf_thr",
                "cooc_weight", "surround_thr", "min_support", "boost", "penalty"):
        assert getattr(a, key) == schema_default("postprocess", key), key
    assert a.expand_hierarchy is None and a.relations is None
    for argv, msg in ((["--method", "fancy"], "invalid choice: 'fancy'"),
                      (["--min-support", "2.5"], "--min-support: invalid int value"),
                      (["--max-per-class", "many"], "--max-per-class: invalid int value"),):
        with pytest.raises(SystemExit) as e:
            postprocess_stage.parse_args(["--detections", "x", "--out", "y", *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ensemble_stage.main(["--detections", "x", "--out", "y", "--vote", "maybe"])
    assert "not a boolean: 'maybe'" in capsys.readouterr().err


def test_postprocess_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "bad.parquet").write_text("not parquet")
    rc = postprocess_stage.main(["--detections", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "bad.parquet" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _ap_json(path, aps):
    path.write_text(json.dumps({"mAP": float(np.mean(list(aps.values()))),
                                "per_class": {k: {"name": k, "ap": v} for k, v in aps.items()}}))


def test_ensemble_cli_roundtrip(tmp_path, capsys):
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
    assert ensemble_stage.main(base + ["--reweight", "false", "--vote", "False", "--out",
                                       str(tmp_path / "e2.parquet")]) == 0
    plain = read_table(tmp_path / "e2.parquet", "detections")
    assert not plain.equals(whole) and len(plain) > 0
    # one model without re-weighting = its post-processing
    assert ensemble_stage.main(["--detections", str(tmp_path / "d0.parquet"), "--reweight", "false",
                                "--out", str(tmp_path / "one.parquet")]) == 0
    assert postprocess_stage.main(["--detections", str(tmp_path / "d0.parquet"),
                                   "--out", str(tmp_path / "pp.parquet")]) == 0
    pd.testing.assert_frame_equal(read_table(tmp_path / "one.parquet", "detections"),
                                  read_table(tmp_path / "pp.parquet", "detections"))
    # mismatched AP list; AP files without re-weighting; a metric file without per-class AP
    assert ensemble_stage.main(base + ["--ap-metrics", str(tmp_path / "a0.json"), "--out",
                                       str(tmp_path / "x.parquet")]) == 2
    assert ensemble_stage.main(base + aps + ["--reweight", "false", "--out", str(tmp_path / "x.parquet")]) == 2
    (tmp_path / "bad.json").write_text(json.dumps({"mAP": 0.1}))
    assert ensemble_stage.main(base + ["--ap-metrics", str(tmp_path / "bad.json"), str(tmp_path / "a1.json"),
                                       "--out", str(tmp_path / "x.parquet")]) == 2
    assert "no 'per_class' object" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


def test_an_expert_in_the_ensemble_contributes_its_targets_only(tmp_path, capsys):
    for i in range(2):
        write_table(tmp_path / f"d{i}.parquet", _dets(20 + i, model=f"m{i}"), "detections")
    x = _dets(30, model="x")
    write_table(tmp_path / "x.parquet", x, "detections")
    write_table(tmp_path / "x_empty.parquet", x.iloc[:0], "detections")
    (tmp_path / "x.json").write_text(json.dumps({"targets": ["/m/dog"], "negatives": ["/m/cat"]}))
    common = ["--reweight", "false", "--rows-per-shard", "100"]
    globals_ = ["--detections", str(tmp_path / "d0.parquet"), str(tmp_path / "d1.parquet")]
    assert ensemble_stage.main(globals_ + common + ["--out", str(tmp_path / "g.parquet")]) == 0
    g = read_table(tmp_path / "g.parquet", "detections")
    # an expert with no detections leaves the ensemble unchanged
    assert ensemble_stage.main([*globals_, str(tmp_path / "x_empty.parquet"), *common, "--class-filters", "-",
                                "-", str(tmp_path / "x.json"), "--out", str(tmp_path / "e.parquet")]) == 0
    pd.testing.assert_frame_equal(_key(read_table(tmp_path / "e.parquet", "detections")), _key(g))
    # with detections: its non-target classes never appear; only its target class changes
    assert ensemble_stage.main([*globals_, str(tmp_path / "x.parquet"), *common, "--class-filters", "-", "-",
                                str(tmp_path / "x.json"), "--out", str(tmp_path / "w.parquet")]) == 0
    w = read_table(tmp_path / "w.parquet", "detections")
    assert set(w.loc[w["model"] == "x", "label"]) == {"/m/dog"}
    for lab in ("/m/cat", "/m/animal"):
        pd.testing.assert_frame_equal(_key(w[w["label"] == lab]), _key(g[g["label"] == lab]))
    assert len(w[w["label"] == "/m/dog"]) > len(g[g["label"] == "/m/dog"])
    # one filter per detections file
    assert ensemble_stage.main([*globals_, str(tmp_path / "x.parquet"), *common, "--class-filters", "-",
                                "--out", str(tmp_path / "bad.parquet")]) == 2
    assert "3 --detections but 1 --class-filters" in capsys.readouterr().err
    assert not (tmp_path / "bad.parquet").exists()


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


def test_postprocess_of_one_test_time_view(tmp_path, capsys):
    """--scale / --flip (the auto ensemble's leaves) post-process only that view's rows; no value: every row."""
    d = _dets(3, n=600).assign(scale=np.where(np.arange(600) % 3 == 0, 320, 288).astype(np.int32),
                               flip=np.arange(600) % 2 == 1)
    write_table(tmp_path / "in.parquet", d, "detections")
    args = ["--detections", str(tmp_path / "in.parquet"), "--method", "adj_nms", "--rows-per-shard", "70"]
    for scale, flip in ((288, True), (320, False), (None, False), (None, None)):
        out = tmp_path / f"{scale}_{flip}.parquet"
        view = ["--scale", *([str(scale)] if scale else []), "--flip", *([str(flip)] if flip is not None else [])]
        assert postprocess_stage.main([*args, *view, "--out", str(out)]) == 0
        keep = np.ones(len(d), dtype=bool)
        keep &= (d["scale"] == scale).to_numpy() if scale else keep
        keep &= (d["flip"] == flip).to_numpy() if flip is not None else keep
        rows = d[keep]
        assert 0 < len(rows) < len(d) or (scale, flip) == (None, None)
        want = suppress(rows.reset_index(drop=True), method="adj_nms", iou_thr=0.5, sigma=0.5, score_thr=0.001)
        got = read_table(out, "detections")
        pd.testing.assert_frame_equal(_key(got), _key(want)[got.columns], check_exact=False)
        assert read_provenance(out)["view"] == {"scale": scale, "flip": flip}
    write_table(tmp_path / "plain.parquet", _dets(4), "detections")
    bad = tmp_path / "bad.parquet"
    assert postprocess_stage.main(["--detections", str(tmp_path / "plain.parquet"), "--flip", "true",
                                   "--out", str(bad)]) == 2
    assert "field 'flip': no column 'flip'" in capsys.readouterr().err and not bad.exists()


def test_postprocess_cap_per_class(tmp_path):
    """--max-per-class keeps each (image, class)'s best rows before the suppression (a cap above every group
    changes nothing); the gather form (--method none) is never capped."""
    d = _dets(5, n=600, images=3)
    write_table(tmp_path / "in.parquet", d, "detections")

    def run(name, *args):
        out = tmp_path / f"{name}.parquet"
        assert postprocess_stage.main(["--detections", str(tmp_path / "in.parquet"), "--max-per-image", "0",
                                       "--rows-per-shard", "150", *args, "--out", str(out)]) == 0
        return read_table(out, "detections")

    default = run("default")
    pd.testing.assert_frame_equal(run("large", "--max-per-class", "600"), default)
    capped = run("capped", "--max-per-class", "4", "--method", "nms")
    assert capped.groupby(["image_id", "label"]).size().max() <= 4
    top = d.sort_values("score", ascending=False, kind="stable").groupby(["image_id", "label"]).head(4)
    want = suppress(top.reset_index(drop=True), method="nms")
    pd.testing.assert_frame_equal(_key(capped), _key(want), check_categorical=False)
    assert read_provenance(tmp_path / "capped.parquet")["max_per_class"] == 4
    assert len(run("gather", "--method", "none", "--score-thr", "0", "--max-per-class", "1")) == len(d)


def test_ensemble_cli_merges_views_and_caps(tmp_path):
    """--merge-views (default: the schema's true) merges each model's test-time views before the models;
    --max-per-class bounds every pool."""
    from stages.core.config import schema_default
    from stages.ops.ensemble import naive_ensemble
    from stages.ops.nms import top_per_image

    rng = np.random.default_rng(6)
    base = _dets(6, n=300, model="m0")
    views = [base.assign(x_min=base.x_min + rng.normal(0, 0.01, len(base)), scale=np.int32(288), flip=f)
             for f in (False, True)]
    d0 = pd.concat(views, ignore_index=True)
    d1 = _dets(7, n=300, model="m1").assign(scale=np.int32(288), flip=False)     # one view
    write_table(tmp_path / "d0.parquet", d0, "detections")
    write_table(tmp_path / "d1.parquet", d1, "detections")
    args = ["--detections", str(tmp_path / "d0.parquet"), str(tmp_path / "d1.parquet"), "--reweight", "false",
            "--rows-per-shard", "200"]

    def run(name, *extra):
        out = tmp_path / f"{name}.parquet"
        assert ensemble_stage.main([*args, *extra, "--out", str(out)]) == 0
        return read_table(out, "detections")

    assert schema_default("ensemble", "merge_views") is True
    merged, pooled = run("merged"), run("pooled", "--merge-views", "false")
    frames = [read_table(tmp_path / f"d{i}.parquet", "detections") for i in range(2)]
    for got, mv in ((merged, True), (pooled, False)):
        want = top_per_image(naive_ensemble(frames, merge_views=mv,
                                            max_per_class=schema_default("postprocess", "max_per_class")),
                             max_per_image=schema_default("postprocess", "max_per_image"))
        pd.testing.assert_frame_equal(_key(got), _key(want), check_exact=False)
    assert not _key(merged).equals(_key(pooled))
    assert read_provenance(tmp_path / "merged.parquet")["merge_views"] is True
    capped = run("capped", "--max-per-class", "3", "--max-per-image", "0")
    assert capped.groupby(["image_id", "label"]).size().max() <= 3
