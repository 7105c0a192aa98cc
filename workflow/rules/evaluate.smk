# The OpenImages Challenge metric on val_a and val_b after every model, post-processing step and ensemble,
# and the tables that collect them.


rule evaluate:
    input:
        dets="results/{stage}/{name}/{val}.parquet",
        boxes=rules.ingest.output.boxes,
        labels=rules.ingest.output.image_labels,
        hierarchy=rules.ingest.output.hierarchy,
        classes=rules.ingest.output.classes,
        splits=rules.split.output.splits,
    output:
        json="results/evaluate/{stage}/{name}/{val}.json",
    log:
        "logs/evaluate/{stage}/{name}/{val}.log",
    wildcard_constraints:
        stage="postprocess|ensemble|ablation_postprocess|ablation_ensemble",
    conda:
        ENV
    shell:
        "python -m stages.evaluate --boxes {input.boxes:q} --image-labels {input.labels:q}"
        " --hierarchy {input.hierarchy:q} --classes {input.classes:q} --predictions {input.dets:q}"
        " --split-ids {input.splits:q} --split {wildcards.val} --out {output.json:q} > {log:q} 2>&1"


rule metrics_table:
    input:
        models=expand("results/evaluate/postprocess/{model}/{val}.json", model=MODELS, val=VAL_SPLITS),
        ensembles=expand("results/evaluate/ensemble/{group}/{val}.json", group=ENSEMBLE_GROUPS, val=VAL_SPLITS),
    output:
        json="results/metrics.json",
        md="results/metrics.md",
    log:
        "logs/metrics_table.log",
    conda:
        ENV
    shell:
        "python -m stages.report --metrics {input.models:q} {input.ensembles:q} --out-json {output.json:q}"
        " --out-md {output.md:q} > {log:q} 2>&1"


rule ablation_table:
    input:
        ablation_metrics,
    output:
        json="results/ablation/{kind}.json",
        md="results/ablation/{kind}.md",
    log:
        "logs/ablation_table/{kind}.log",
    wildcard_constraints:
        kind="|".join(ABLATIONS),
    conda:
        ENV
    shell:
        "python -m stages.report --metrics {input:q} --out-json {output.json:q} --out-md {output.md:q} > {log:q} 2>&1"
