# Validation of the config, the path table, wildcard constraints and input functions. The only place that
# knows where files live.
import json
import os
import re
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
ABLATIONS = ["models", "postprocess", "ensemble"]
# Variants of the post-processing chain and of the ensemble: "default" is the configured section, each ablation
# variant (config["ablation"]) changes some of its keys. The postprocess and ensemble rules run any of them.
POSTPROCESS = {"default": config["postprocess"]} | {
    name: config["postprocess"] | spec for name, spec in config["ablation"]["postprocess"].items()
}
ENSEMBLE = {"default": config["ensemble"]} | {
    name: config["ensemble"] | spec for name, spec in config["ablation"]["ensemble"].items()
}
# the run whose variants the ablation tables compare: a model (postprocess), an ensemble group (ensemble)
ABLATION_RUN = {"postprocess": config["ablation"]["model"], "ensemble": config["ablation"]["group"]}
# stages that run per image shard; `gather` joins their shards, `evaluate` scores the gathered file
SHARDED_STAGES = ["postprocess", "ensemble"]


def one_of(names):
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    model=one_of(MODELS),
    group=one_of(ENSEMBLE_GROUPS),
    split=one_of(SPLITS),
    shard=r"\d+",
    stage=one_of(SHARDED_STAGES),
    variant=one_of(POSTPROCESS | ENSEMBLE),


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


def variant_key(variants, key):
    """`key` of the job's variant in `variants` (POSTPROCESS or ENSEMBLE), for params and input conditions: the
    value itself when every variant has the same (a function per job costs DAG-building time at 10^4 jobs)."""
    values = [v[key] for v in variants.values()]
    if all(v == values[0] for v in values):
        return values[0]
    return lambda wildcards: variants[wildcards.variant][key]


def model_metrics(models, splits):
    """Metric files of models after the configured post-processing (their AP for re-weighting and mining)."""
    return expand(rules.evaluate.output.json, stage="postprocess", variant="default", name=models, split=splits)


def ensemble_inputs(wildcards):
    """Shard `wildcards.shard` of each of the group's models' raw detections, the hierarchy when detections are
    expanded, and, when the variant re-weights, each model's AP on the other validation split."""
    models = config["ensemble"]["groups"][wildcards.group]
    reweight = ENSEMBLE[wildcards.variant]["reweight"]
    return {
        "dets": expand(rules.infer.output.dets, model=models, split=wildcards.split, shard=wildcards.shard),
        "hierarchy": rules.ingest.output.hierarchy if config["postprocess"]["expand_hierarchy"] else [],
        "aps": model_metrics(models, AP_SOURCE[wildcards.split]) if reweight else [],
    }


def ablation_metrics(wildcards):
    """Metric files of one ablation table: the model ladder, or the post-processing / ensemble variants."""
    if wildcards.kind == "models":
        return model_metrics(config["ablation"]["models"], VAL_SPLITS)
    return expand(
        rules.evaluate.output.json,
        stage=wildcards.kind,
        variant=config["ablation"][wildcards.kind],
        name=ABLATION_RUN[wildcards.kind],
        split=VAL_SPLITS,
    )
