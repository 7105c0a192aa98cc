# Validation of the config, the path table, wildcard constraints and input functions. The only place that
# knows where files live.
import gc
import inspect
import json
import os
import re
import shlex
import sys

sys.path.insert(0, workflow.basedir)
from snakemake.common import overwrite_function_params  # noqa: E402
from stages.core.config import model_part, validate_config  # noqa: E402

validate_config(config, source="config")

# Building the DAG of the challenge config (15k jobs) allocates millions of objects that live until the end; at
# Python's default thresholds (700, 10, 10) the cyclic collector keeps re-scanning them and takes ~12% of a
# dry run (30.7 -> 27.0 s, measured side by side). Collect less often; jobs run in their own processes.
gc.set_threshold(100_000, 50, 100)

ENV = "../../envs/orchard.yaml"
# jobs run `python -m stages.<step>` from any working directory (-d), locally or in a cluster job
shell.prefix(f"export PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
DATA = config["dataset"]["dir"]
MODELS = sorted(config["models"])
# expert models: mined from a base model (expert_of) or trained on an external dataset (train_data)
MINED = [m for m in MODELS if config["models"][m]["expert_of"] is not None]
EXTERNAL = config["external"]
FOREIGN = [m for m in MODELS if config["models"][m]["train_data"] is not None]
EXPERTS = MINED + FOREIGN
VAL_SPLITS = ["val_a", "val_b"]
SPLITS = VAL_SPLITS + ["test"]
SHARDS = config["infer"]["shards"]
ENSEMBLE_GROUPS = sorted(config["ensemble"]["groups"])
# PFDet re-weighting of a split uses each model's AP on the other validation split
AP_SOURCE = {"val_a": "val_b", "val_b": "val_a", "test": "val_a"}
ABLATIONS = ["models", "postprocess", "ensemble"]
# The auto ensemble (autoensemble.smk): leaves of these models (and naive groups); two searches, each named after
# its search split, confirmed on the other; the tree searched on val_a makes the test detections
AUTO = config["autoensemble"]
AUTO_MODELS = MODELS if AUTO["leaves"]["models"] is None else sorted(AUTO["leaves"]["models"])
SEARCHES = {f"search_{s}": (s, t) for s, t in zip(VAL_SPLITS, reversed(VAL_SPLITS))}
SUBMIT_SEARCH = "search_val_a"


def views(model):
    """A model's test-time views, {leaf suffix: (scale, flip)}: e.g. {"288": (288, False), "288flip": (288, True)}."""
    cfg = config["models"][model]
    flips = [False, True] if cfg["test_flip"] else [False]
    return {f"{s}{'flip' if f else ''}": (s, f) for s in cfg["test_scales"] for f in flips}


# Variants of the post-processing chain and of the ensemble: "default" is the configured section, each ablation
# variant (config["ablation"]) changes some of its keys. The postprocess and ensemble rules run any of them.
# A view variant ("view288flip") is the configured chain on the rows of one test-time view only (scale, flip):
# the auto ensemble's leaves when autoensemble.leaves.views is on.
VIEWS = {f"view{v}": sf for m in AUTO_MODELS for v, sf in views(m).items()} if AUTO["leaves"]["views"] else {}
ALL_VIEWS = {"scale": "", "flip": ""}
POSTPROCESS = (
    {"default": ALL_VIEWS | config["postprocess"]}
    | {name: ALL_VIEWS | config["postprocess"] | spec for name, spec in config["ablation"]["postprocess"].items()}
    | {name: config["postprocess"] | {"scale": s, "flip": f} for name, (s, f) in VIEWS.items()}
)
if set(VIEWS) & set(config["ablation"]["postprocess"]):
    raise ValueError(f"ablation.postprocess: the variant names {sorted(VIEWS)} are taken by the test-time views")
ENSEMBLE = {"default": config["ensemble"]} | {
    name: config["ensemble"] | spec for name, spec in config["ablation"]["ensemble"].items()
}
# the run whose variants the ablation tables compare: a model (postprocess), an ensemble group (ensemble)
ABLATION_RUN = {"postprocess": config["ablation"]["model"], "ensemble": config["ablation"]["group"]}
# stages that run per image shard; `gather` joins their shards, `evaluate` scores the gathered file
SHARDED_STAGES = ["postprocess", "ensemble", "autoensemble"]


# The segmentation track (segment.smk): HRNet mask models, the models voted, the boxes that get masks (the
# refined ones, or the ensemble's own), and the refiner
SEG = config["segmentation"]
MASK_MODELS = sorted(SEG["models"])
SEG_ENSEMBLE = sorted(SEG["ensemble"] or MASK_MODELS)
SEG_SOURCE = "refined" if SEG["refine"] else "raw"
# the track is in the default target (and the report) when enabled and given mask models
SEG_ON = bool(SEG["enabled"] and MASK_MODELS)
# the mask mAP of the track on a validation split: a row "segment/masks" of results/metrics.md
SEG_METRICS = "results/evaluate/segment/default/masks/{split}.json"
# the boxes masks are predicted on: the refined final detections, the final detections, the ground truth (oracle)
MASK_SOURCES = ["refined", "raw", "gt"]
REFINER = config["refiner"]


RES = config["resources"]


def job_fn(fn):
    """Marks an input, params or resources function: Snakemake then takes its parameters from here instead of
    inspecting its signature on every call (400k calls, a few seconds, when the challenge DAG is built)."""
    overwrite_function_params(fn, inspect.signature(fn).parameters)
    return fn


def rule_mem(rule):
    """The memory a CPU-side rule asks for (config `resources`); a retry asks for twice as much."""
    return job_fn(lambda wildcards, attempt: RES[rule]["mem_mb"] * attempt)


def rule_runtime(rule):
    """The minutes a CPU-side rule asks for (config `resources`); a retry asks for twice as much."""
    return job_fn(lambda wildcards, attempt: RES[rule]["runtime"] * attempt)


def cli_options(values, keys):
    """`--key value ...` of a stage CLI for the `keys` of the dict `values`: `_` becomes `-` in the option, the
    value is shell-quoted (a list gives one word per item), an empty string or None leaves the option out. One
    params string per job instead of a params entry and a shell field per option: Snakemake evaluates each of
    those for each of the 10^4 jobs of the challenge DAG."""
    words = []
    for key in keys:
        value = values[key]
        if value is None or value == "":
            continue
        words.append(f"--{key.replace('_', '-')}")
        words.extend(shlex.quote(str(v)) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return " ".join(words)


def option(flag, files):
    """`flag file...` (quoted) for an optional input (a path, or a possibly empty list); "" when there is none."""
    files = [files] if isinstance(files, str) else list(files)
    return f"{flag} {' '.join(shlex.quote(str(f)) for f in files)}" if files else ""


def one_of(names):
    return "|".join(re.escape(n) for n in names)


wildcard_constraints:
    model=one_of(MODELS),
    group=one_of(ENSEMBLE_GROUPS),
    ext=one_of(EXTERNAL) if EXTERNAL else "$^",
    split=one_of(SPLITS),
    shard=r"\d+",
    stage=one_of(SHARDED_STAGES),
    variant=one_of(POSTPROCESS | ENSEMBLE),
    search=one_of(SEARCHES),
    mask_model=one_of(MASK_MODELS) if MASK_MODELS else "$^",
    source=one_of(MASK_SOURCES),


def raw(key):
    """Path of one of the dataset's OpenImages files."""
    return f"{DATA}/{config['dataset'][key]}"


def external_path(name, key):
    """A path of an external dataset's entry: `{repo}` stands for this checkout (the label maps shipped in
    configs/labelmaps/), an absolute path is kept, any other is relative to dataset.dir."""
    path = EXTERNAL[name][key].replace("{repo}", workflow.basedir)
    return path if os.path.isabs(path) else f"{DATA}/{path}"


def model_cfg(model):
    return config["models"][model]


def per_entry(table, wildcard, fn):
    """`fn` of the job's section of `table` (config models, mask models, post-processing or ensemble variants,
    named by `wildcard`), for params, inputs and resources: the value itself when every section gives the same
    (0 for an empty table; a function per job costs DAG-building time at 10^4 jobs), else a dictionary lookup
    per job."""
    values = {name: fn(cfg) for name, cfg in table.items()}
    first = next(iter(values.values()), 0)
    if all(v == first for v in values.values()):
        return first
    return job_fn(lambda wildcards: values[getattr(wildcards, wildcard)])


def expert_base(model):
    """The base model of an expert model."""
    base = model_cfg(model)["expert_of"]
    if base is None:
        raise ValueError(f"model {model!r} is not an expert model (expert_of is not set)")
    return base


def infer_options(model):
    """The options of a model's inference (its test-time keys) for stages.infer."""
    cfg = model_cfg(model)
    flags = ["--flip"] * cfg["test_flip"] + ["--expert"] * cfg["expert"]
    keys = ["test_max_size_ratio", "box_nms_thresh", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test"]
    return " ".join([cli_options({"scales": cfg["test_scales"]}, ["scales"]), *flags, cli_options(cfg, keys)])


INFER_OPTIONS = {m: infer_options(m) for m in MODELS}


def split_option(split):
    """`--split` of a stage that reads a split's images: none for test (the test table is read whole)."""
    return "" if split == "test" else f"--split {split}"


@job_fn
def infer_select(wildcards):
    """The images an inference job reads (test: all of the test table; else its split's) and the model's
    inference keys (x-reads: infer)."""
    return f"{split_option(wildcards.split)} {INFER_OPTIONS[wildcards.model]}"


@job_fn
def expert_classes(wildcards):
    """The experts JSON (class subset) of an expert model; nothing for other models."""
    model = wildcards.model if hasattr(wildcards, "model") else wildcards.name
    if model_cfg(model)["expert_of"] is None:
        return []
    return expand(rules.experts.output.experts, model=model)


@job_fn
def expert_confusion_inputs(wildcards):
    """What an expert model with `expert_confusion` matrix mines from besides the checkpoint: its base model's
    post-processed val_a detections, the ground-truth boxes and the splits (in this order); nothing otherwise."""
    if model_cfg(wildcards.model)["expert_confusion"] != "matrix":
        return []
    base = expert_base(wildcards.model)
    dets = expand(rules.gather.output.dets, stage="postprocess", variant="default", name=base, split="val_a")
    return [*dets, rules.ingest.output.boxes, rules.split.output.splits]


@job_fn
def train_json(wildcards):
    """What training reads of a model's section (its `x-reads: train` keys) as JSON: the train rule's parameter,
    so a change of any other key (inference, experts, resources) retrains nothing. `init_from: <model>` becomes
    `weights`: that model's trained checkpoint (an input of the train rule)."""
    cfg = model_part(model_cfg(wildcards.model), "train")
    if cfg.get("init_from"):
        cfg["weights"] = expand(rules.train.output.model, model=cfg["init_from"])[0]
    return json.dumps(cfg, sort_keys=True)


@job_fn
def card_json(wildcards):
    """The model's section without its resource keys (the card reads its training and test-time settings)."""
    cfg = model_cfg(wildcards.model)
    return json.dumps({k: v for k, v in cfg.items() if k not in model_part(cfg, "resources")}, sort_keys=True)


@job_fn
def init_weights(wildcards):
    """The checkpoint a model starts from (`init_from`), or nothing."""
    init = model_cfg(wildcards.model)["init_from"]
    return expand(rules.train.output.model, model=init) if init else []


@job_fn
def images_for(wildcards):
    """Test images come from their own table; validation images from the labelled one (selected by split)."""
    if wildcards.split == "test":
        return rules.ingest.output.test_images
    return rules.ingest.output.images


def variant_key(variants, key):
    """`key` of the job's variant in `variants` (POSTPROCESS or ENSEMBLE), for params and input conditions."""
    return per_entry(variants, "variant", lambda v: v[key])


def variant_options(variants, keys):
    """The CLI options (cli_options) of `keys` of the job's variant in `variants`."""
    return per_entry(variants, "variant", lambda v: cli_options(v, keys))


def model_metrics(models, splits):
    """Metric files of models after the configured post-processing (their AP for re-weighting and mining)."""
    return expand(rules.evaluate.output.json, stage="postprocess", variant="default", name=models, split=splits)


@job_fn
def ensemble_inputs(wildcards):
    """Shard `wildcards.shard` of each of the group's models' raw detections, the hierarchy when detections are
    expanded, and, when the variant re-weights, each model's AP on the other validation split."""
    models = config["ensemble"]["groups"][wildcards.group]
    reweight = ENSEMBLE[wildcards.variant]["reweight"]
    return {
        "dets": expand(rules.infer.output.dets, model=models, split=wildcards.split, shard=wildcards.shard),
        "hierarchy": rules.ingest.output.hierarchy if config["postprocess"]["expand_hierarchy"] else [],
        "aps": model_metrics(models, AP_SOURCE[wildcards.split]) if reweight else [],
        "filters": [expert_file(m) for m in models if expert_file(m)],
    }


def expert_file(model):
    """The classes an expert model contributes, in the mined-set format: its mined set (expert_of), or the
    label map's classes of its external dataset (train_data); None for a global model."""
    if model_cfg(model)["train_data"] is not None:
        return expand(rules.ingest_external.output.targets, ext=model_cfg(model)["train_data"])[0]
    if model_cfg(model)["expert_of"] is None:
        return None
    return expand(rules.experts.output.experts, model=model)[0]


@job_fn
def training_tables(wildcards):
    """The tables a model trains on: the ingested dataset's train split, or all of an external dataset (no
    split, uniform sampling)."""
    data = model_cfg(wildcards.model)["train_data"]
    if data is not None:
        return {k: expand(getattr(rules.ingest_external.output, k), ext=data)[0] for k in ("images", "boxes")}
    cfg = model_cfg(wildcards.model)
    tables = {
        "images": rules.ingest.output.images,
        # mask_boxes: with the instance boxes derived from the masks of mostly group-of classes (paper 5.9)
        "boxes": rules.mask_boxes.output.boxes if cfg["mask_boxes"] else rules.ingest.output.boxes,
        "splits": rules.split.output.splits,
        "sampling": expand(rules.sample.output.weights, method=cfg["sampling"])[0],
    }
    if cfg["wsddn"] or cfg["plain_box"]:  # the image-level labels (WSDDN's targets, the plain images' boxes)
        tables["image_labels"] = rules.ingest.output.image_labels
    return tables


@job_fn
def class_filters(wildcards):
    """`--class-filters` of the naive ensemble: per model of the group its mined set if it is an expert (it
    contributes its targets only), else `-`; "" when the group has no expert."""
    files = [expert_file(m) for m in config["ensemble"]["groups"][wildcards.group]]
    if not any(files):
        return ""
    return "--class-filters " + " ".join(shlex.quote(f) if f else "-" for f in files)


def auto_metrics():
    """Metric files of the auto ensemble's two searches on both validation splits."""
    return expand(rules.evaluate.output.json, stage="autoensemble", variant="default", name=SEARCHES, split=VAL_SPLITS)


@job_fn
def ablation_metrics(wildcards):
    """Metric files of one ablation table: the model ladder, or the post-processing / ensemble variants (the
    ensemble's with the configured naive ensemble of the group and the auto ensemble's searches)."""
    if wildcards.kind == "models":
        return model_metrics(config["ablation"]["models"], VAL_SPLITS)
    variants = config["ablation"][wildcards.kind]
    if wildcards.kind == "ensemble":
        variants = [*variants, "default"]
    runs = expand(
        rules.evaluate.output.json,
        stage=wildcards.kind,
        variant=variants,
        name=ABLATION_RUN[wildcards.kind],
        split=VAL_SPLITS,
    )
    return runs + auto_metrics() if wildcards.kind == "ensemble" else runs


def leaf_runs():
    """{leaf name: (stage, variant, name)} of the auto ensemble's leaves: each model's test-time views
    (`<model>@<view>`) or its post-processed detections (`<model>`), and the naive groups (`<group>.naive`)."""
    out = {}
    for m in AUTO_MODELS:
        if AUTO["leaves"]["views"]:
            out |= {f"{m}@{v}": ("postprocess", f"view{v}", m) for v in views(m)}
        else:
            out[m] = ("postprocess", "default", m)
    return out | {f"{g}.naive": ("ensemble", "default", g) for g in AUTO["leaves"]["groups"]}


LEAVES = leaf_runs()


def auto_leaves(split, shard=None):
    """{leaf name: detections file} on `split`: gathered (for the search) or one image shard (to apply a tree)."""

    def one(stage, variant, name):
        if shard is None:
            path = rules.gather.output.dets
        else:
            path = {"postprocess": rules.postprocess.output.dets, "ensemble": rules.ensemble.output.dets}[stage]
        return expand(path, stage=stage, variant=variant, name=name, model=name, group=name, split=split, shard=shard)[0]

    return {leaf: one(*run) for leaf, run in LEAVES.items()}


def named(leaves):
    """`NAME=PATH` arguments of the autoensemble CLI."""
    return " ".join(f"{n}={p}" for n, p in leaves.items())


def expert_leaves():
    """{leaf name: experts JSON} of the leaves of expert models: their class filter in the trees."""
    return {
        leaf: expert_file(name)
        for leaf, (stage, _, name) in LEAVES.items()
        if stage == "postprocess" and expert_file(name)
    }


def final_dets(splits):
    """The gathered detections that make submission.csv (ensemble.mode: the auto ensemble's tree searched on
    val_a, or the naive ensemble of the group submit.ensemble) on `splits`."""
    if config["ensemble"]["mode"] == "auto":
        return expand(rules.gather.output.dets, stage="autoensemble", variant="default", name=SUBMIT_SEARCH, split=splits)
    return expand(
        rules.gather.output.dets, stage="ensemble", variant="default", name=config["submit"]["ensemble"], split=splits
    )



def mask_cfg(name):
    return SEG["models"][name]


# each mask model's test-time options for stages.infer_masks
MASK_OPTIONS = {m: cli_options({"scale": mask_cfg(m)["test_scale"], "flip": mask_cfg(m)["test_flip"]}, ["scale", "flip"])
                for m in MASK_MODELS}


@job_fn
def mask_select(wildcards, input):
    """What a mask-inference job reads: its boxes (the ground-truth boxes, the oracle, from the masks table; else
    detections), its split's images (a refined shard holds its images only; the gathered raw detections are cut
    to the shard's images), and the mask model's test-time keys."""
    boxes = shlex.quote(str(input.boxes))
    return " ".join([
        f"--masks {boxes}" if wildcards.source == "gt" else f"--dets {boxes}",
        split_option(wildcards.split),
        "" if wildcards.source == "refined" else f"--shard {wildcards.shard} --shards {SHARDS}",
        MASK_OPTIONS[wildcards.mask_model],
    ])


@job_fn
def mask_train_json(wildcards):
    """What training reads of a mask model's section (its `x-reads: train` keys) as JSON."""
    return json.dumps(model_part(mask_cfg(wildcards.mask_model), "train", defs="mask_model"), sort_keys=True)


@job_fn
def refiner_json(wildcards):
    """What training reads of the refiner section (its `x-reads: train` keys) as JSON."""
    return json.dumps(model_part(REFINER, "train", defs="refiner"), sort_keys=True)


@job_fn
def mask_boxes(wildcards):
    """The boxes a mask model segments on `split`: a shard of the refined final detections, the gathered final
    detections (the shard is cut by infer_masks), or the ground-truth masks' boxes (val splits only)."""
    if wildcards.source == "refined":
        return expand(rules.refine.output.dets, split=wildcards.split, shard=wildcards.shard)[0]
    if wildcards.source == "raw":
        return final_dets(wildcards.split)[0]
    if wildcards.split == "test":
        raise ValueError("the test split has no ground-truth masks")
    return rules.ingest_masks.output.masks


def seg_ablation_probs():
    """{"split:source:model": probs file} of every mask model on every box source of the validation splits
    (a key repeats once per image shard: the ablation joins them)."""
    sources = ["refined", "raw", "gt"] if SEG["refine"] else ["raw", "gt"]
    out = []
    for split in VAL_SPLITS:
        for source in sources:
            for m in MASK_MODELS:
                for shard in range(SHARDS):
                    out.append((f"{split}:{source}:{m}:{shard}",
                                expand(rules.infer_masks.output.probs, mask_model=m, source=source, split=split,
                                       shard=shard)[0]))
    return dict(out)


EXPERT_BASES = {config["models"][m]["expert_of"] for m in MINED}


def train_cost(model):
    """A rough relative cost of training a model (epochs x a head factor): the longest trainings start first."""
    cfg = model_cfg(model)
    return cfg["epochs"] * (2 if cfg["cascade"] or cfg["head"] == "tsd" else 1) * (0.5 if cfg["train_data"] else 1)


@job_fn
def expert_first(wildcards):
    """Scheduling priority. First (10): the jobs on the way to an expert model's training (its base model's
    training, its base's default-post-processed val_a detections and metrics, the mining), that training itself,
    and the training of the refiner's detector (the segmentation track waits for it), so these run beside the
    other models instead of after all of them (priority is not inherited by a job's inputs, hence one function
    for every rule of the chain). Then the other trainings, longest first (1-9)."""
    name = wildcards.get("model") or wildcards.get("name")
    training = "model" in wildcards.keys() and "split" not in wildcards.keys()
    if name in MINED or (training and SEG_ON and SEG["refine"] and name == REFINER["detector"]):
        return 10
    if name in EXPERT_BASES:
        chain = wildcards.get("split", "val_a") == "val_a" and wildcards.get("variant", "default") == "default"
        if chain and wildcards.get("stage", "postprocess") == "postprocess":
            return 10
    if training and name in MODELS:
        top = max(train_cost(m) for m in MODELS)
        return max(1, round(9 * train_cost(name) / top))
    return 0
