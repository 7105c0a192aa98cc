# The OpenImages Challenge metric on val_a and val_b after every model and after the merge.


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
        stage="postprocess",
    conda:
        ENV
    shell:
        "python -m stages.evaluate --boxes {input.boxes:q} --image-labels {input.labels:q}"
        " --hierarchy {input.hierarchy:q} --classes {input.classes:q} --predictions {input.dets:q}"
        " --split-ids {input.splits:q} --split {wildcards.val} --out {output.json:q} > {log:q} 2>&1"


use rule evaluate as evaluate_merge with:
    input:
        dets="results/merge/{val}.parquet",
        boxes=rules.ingest.output.boxes,
        labels=rules.ingest.output.image_labels,
        hierarchy=rules.ingest.output.hierarchy,
        classes=rules.ingest.output.classes,
        splits=rules.split.output.splits,
    output:
        json="results/evaluate/merge/{val}.json",
    log:
        "logs/evaluate/merge/{val}.log",


rule metrics_table:
    input:
        models=expand("results/evaluate/postprocess/{model}/{val}.json", model=MODELS, val=VAL_SPLITS),
        merged=expand(rules.evaluate_merge.output.json, val=VAL_SPLITS),
    output:
        json="results/metrics.json",
        md="results/metrics.md",
    log:
        "logs/metrics_table.log",
    conda:
        ENV
    shell:
        "python -m stages.report --metrics {input.models:q} {input.merged:q} --out-json {output.json:q}"
        " --out-md {output.md:q} > {log:q} 2>&1"
