"""Every model key says which rule reads it (``x-reads`` in the schema); ``model_part`` splits a model section."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from stages.core.config import MODEL_PARTS, SCHEMA_PATH, model_part, schema_default, validate_config


def test_every_model_key_names_its_reader_and_jsonschema_ignores_the_annotation():
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    props = schema["$defs"]["model"]["properties"]
    assert {p["x-reads"] for p in props.values()} <= set(MODEL_PARTS)
    assert all("default" in p for p in props.values())
    # the annotation is no constraint: a config holding every kind of key validates
    cfg = validate_config({"models": {"m": {"gpus": 2, "test_flip": True, "lr": 0.1, "box_nms_thresh": 0.3}}})
    assert cfg["models"]["m"]["box_nms_thresh"] == 0.3


def test_model_part_splits_a_section_by_reader():
    m = validate_config({"models": {"m": {"gpus": 2, "test_scales": [300, 400], "lr": 0.1}}})["models"]["m"]
    parts = {p: model_part(m, p) for p in MODEL_PARTS}
    assert sorted(k for p in parts.values() for k in p) == sorted(m)          # a partition of the section
    assert set(parts["resources"]) == {"threads", "workers", "gpus", "gpu_model", "cpus_per_gpu", "nodes",
                                       "mem_mb", "runtime_min"}
    assert set(parts["experts"]) == {"expert_of", "expert_n_lowest", "expert_sim_thr", "expert_confusion",
                                     "expert_confusion_thr", "expert_confusion_score_thr"}
    assert {"test_scales", "test_flip", "expert", "box_nms_thresh", "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_test", "test_max_size_ratio"} == set(parts["infer"])
    assert parts["train"]["lr"] == 0.1 and "rpn_pre_nms_top_n_train" in parts["train"]
    with pytest.raises(ValueError):
        model_part(m, "evaluate")


def test_schema_default_reads_model_and_section_keys():
    assert schema_default("model", "box_nms_thresh") == 1.0
    assert schema_default("infer", "score_thr") == 0.01
    with pytest.raises(KeyError):
        schema_default("ablation", "model")
