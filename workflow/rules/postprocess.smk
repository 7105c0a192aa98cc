# Post-processing per model and split: gather the image shards and add parent-class boxes (hierarchy
# expansion), then the configured suppression (NMS / soft-NMS / adj-NMS) and optional relationship rescoring.


rule gather:
    input:
        dets=infer_shards,
        hierarchy=rules.ingest.output.hierarchy,
    output:
        dets="results/gather/{model}/{split}.parquet",
    log:
        "logs/gather/{model}/{split}.log",
    params:
        expand=lambda wc, input: (
            f"--expand-hierarchy {input.hierarchy}" if config["postprocess"]["expand_hierarchy"] else ""
        ),
    conda:
        ENV
    shell:
        "python -m stages.postprocess --detections {input.dets:q} --method none {params.expand}"
        " --out {output.dets:q} > {log:q} 2>&1"


rule relations:
    input:
        boxes=rules.ingest.output.boxes,
        splits=rules.split.output.splits,
    output:
        stats="results/relations/stats.json",
    log:
        "logs/relations.log",
    conda:
        ENV
    shell:
        "python -m stages.relations --boxes {input.boxes:q} --splits {input.splits:q} --split train"
        " --out {output.stats:q} > {log:q} 2>&1"


rule postprocess:
    input:
        dets=rules.gather.output.dets,
        relations=branch(config["postprocess"]["relations"], then=rules.relations.output.stats),
    output:
        dets="results/postprocess/{model}/{split}.parquet",
    log:
        "logs/postprocess/{model}/{split}.log",
    params:
        flags=postprocess_flags({}),
        relations=lambda wc, input: f"--relations {input.relations}" if input.relations else "",
    conda:
        ENV
    shell:
        "python -m stages.postprocess --detections {input.dets:q} {params.flags} {params.relations}"
        " --out {output.dets:q} > {log:q} 2>&1"


rule ablation_postprocess:
    input:
        dets=lambda wc: expand(rules.gather.output.dets, model=ABLATION_MODEL, split=wc.split),
        relations=rules.relations.output.stats,
    output:
        dets="results/ablation_postprocess/{variant}/{split}.parquet",
    log:
        "logs/ablation_postprocess/{variant}/{split}.log",
    params:
        flags=lambda wc: postprocess_flags(config["ablation"]["postprocess"][wc.variant]),
        relations=lambda wc, input: (
            f"--relations {input.relations}"
            if config["ablation"]["postprocess"][wc.variant].get("relations")
            else ""
        ),
    conda:
        ENV
    shell:
        "python -m stages.postprocess --detections {input.dets:q} {params.flags} {params.relations}"
        " --out {output.dets:q} > {log:q} 2>&1"
