# Validation of the config, the path table, wildcard constraints and input functions. The only place that
# knows where files live.
import json
import os
import sys

sys.path.insert(0, workflow.basedir)
from stages.core.config import model_part, validate_config  # noqa: E402

validate_config(config, source="config")

ENV = "../../envs/orchard.yaml"
# jobs run `python -m stages.<step>` from any working directory (-d), locally or in a cluster job
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
DATA = config["dataset"]["dir"]
MODELS = sorted(config["models"])
VAL_SPLITS = ["val_a", "val_b"]
SPLITS = VAL_SPLITS + ["test"]
SHARDS = config["infer"]["shards"]
ENSEMBLE_GROUPS = sorted(config["ensemble"]["groups"])
# PFDet re-weighting of a split uses each model's AP on the other validation split
AP_SOURCE = {"val_a": "val_b", "val_b": "val_a", "test": "val_a"}
ABLATION_MODEL = config["ablation"]["model"]
ABLATION_GROUP = config["ensemble"]["groups"][config["ablation"]["group"]]
ABLATIONS = ["models", "postprocess", "ensemble"]
# stages that run per image shard; `gather` joins their shards
SHARDED_STAGES = ["postprocess", "ensemble", "ablation_postprocess", "ablation_ensemble"]


wildcard_constraints:
    model="|".join(MODELS),
    split="|".join(SPLITS),
    val="|".join(VAL_SPLITS),
    shard=r"\d+",


def raw(key):
    """Path of one of the dataset's OpenImages files."""
    return f"{DATA}/{config['dataset'][key]}"


def model_cfg(model):
    return config["models"][model]


def model_key(key):
    """The value of one key of the job's model (for params)."""
    return lambda wildcards: model_cfg(wildcards.model)[key]


def expert_base(model):
    """The base model of an expert model."""
    base = model_cfg(model)["expert_of"]
    if base is None:
        raise ValueError(f"model {model!r} is not an expert model (expert_of is not set)")
    return base


def expert_classes(wildcards):
    """The experts JSON (class subset) of an expert model; nothing for other models."""
    if model_cfg(wildcards.model)["expert_of"] is None:
        return []
    return expand(rules.experts.output.experts, model=wildcards.model)


def train_json(wildcards):
    """What training reads of a model's section (its `x-reads: train` keys) as JSON: the train rule's parameter,
    so a change of any other key (inference, experts, resources) retrains nothing."""
    return json.dumps(model_part(model_cfg(wildcards.model), "train"), sort_keys=True)


def images_for(wildcards):
    """Test images come from their own table; validation images from the labelled one (selected by split)."""
    if wildcards.split == "test":
        return rules.ingest.output.test_images
    return rules.ingest.output.images


def postprocess_flags(spec):
    """Suppression flags of a post-processing spec (the `postprocess` section, or an ablation variant)."""
    s = {**config["postprocess"], **spec}
    return (
        f"--method {s['method']} --iou-thr {s['iou_thr']} --sigma {s['sigma']}"
        f" --score-thr {s['score_thr']} --max-per-image {s['max_per_image']}"
    )


def ensemble_inputs(models, wildcards):
    """Shard `wildcards.shard` of each model's raw detections, and each model's AP on the other val split."""
    return {
        "dets": expand(rules.infer.output.dets, model=models, split=wildcards.split, shard=wildcards.shard),
        "hierarchy": rules.ingest.output.hierarchy,
        "aps": expand(
            "results/evaluate/postprocess/{model}/{val}.json", model=models, val=AP_SOURCE[wildcards.split]
        ),
    }


def expand_flag(hierarchy):
    return f"--expand-hierarchy {hierarchy}" if config["postprocess"]["expand_hierarchy"] else ""


def ensemble_flags(spec):
    s = {**config["ensemble"], **spec}
    flags = [postprocess_flags({"method": s["method"]})]
    flags.append("--no-reweight" if not s["reweight"] else "")
    flags.append("--no-vote" if not s["vote"] else "")
    flags.append(f"--k {s['k']} --score-weight {s['score_weight']} --box-weight {s['box_weight']}")
    return " ".join(f for f in flags if f)


def ablation_metrics(wildcards):
    """Metric files of one ablation table: the model ladder, or the post-processing / ensemble variants."""
    if wildcards.kind == "models":
        return expand(
            "results/evaluate/postprocess/{model}/{val}.json", model=config["ablation"]["models"], val=VAL_SPLITS
        )
    return expand(
        "results/evaluate/ablation_{kind}/{variant}/{val}.json",
        kind=wildcards.kind,
        variant=config["ablation"][wildcards.kind],
        val=VAL_SPLITS,
    )
