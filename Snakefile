# Orchard: the OpenImages Challenge 2019 winning pipeline (MMfruit) as one DAG.
# The table of contents; rules live in workflow/rules/, paths in common.smk, defaults in the schema.
import os

from snakemake.utils import min_version

min_version("9.0")


# the embedded default, unless a --configfile was given (then that config alone is used)
if not config:

    configfile: os.path.join(workflow.basedir, "configs", "default.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/postprocess.smk"
include: "workflow/rules/ensemble.smk"
include: "workflow/rules/autoensemble.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/submit.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.submit.output.csv,
        rules.metrics_table.output.json,
        rules.report.output.html,
        expand(rules.ablation_table.output.md, kind=ABLATIONS),
        rules.experts_table.output.md if EXPERTS and config["ablation"]["experts_baseline"] else [],
        # the segmentation track: segmentation.csv, its metrics on val_a / val_b and its ablation table
        [rules.submit_seg.output.csv, rules.seg_ablation.output.md]
        + expand(rules.evaluate_seg.output.json, split=VAL_SPLITS)
        if SEG_ON
        else [],
