# Validation of the config, the path table, wildcard constraints and input functions. The only place that
# knows where files live.
import json
import os
import sys

sys.path.insert(0, workflow.basedir)
from stages.config import validate_config  # noqa: E402

validate_config(config, source="config")

ENV = "../../envs/orchard.yaml"
# jobs run `python -m stages.<step>` from any working directory (-d), locally or in a cluster job
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
DATA = config["dataset"]["dir"]
MODELS = sorted(config["models"])
VAL_SPLITS = ["val_a", "val_b"]
SPLITS = VAL_SPLITS + ["test"]
SHARDS = config["infer"]["shards"]
SUBMIT_MODELS = config["submit"].get("models") or MODELS


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


def model_json(wildcards):
    return json.dumps(model_cfg(wildcards.model), sort_keys=True)


def infer_shards(wildcards):
    return expand(
        "results/infer/{model}/{split}/shard{shard}.parquet",
        model=wildcards.model,
        split=wildcards.split,
        shard=range(SHARDS),
    )


def images_for(wildcards):
    """Test images come from their own table; validation images from the labelled one (selected by split)."""
    if wildcards.split == "test":
        return rules.ingest.output.test_images
    return rules.ingest.output.images
