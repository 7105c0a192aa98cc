# Post-processing per variant, model, split and image shard: add parent-class boxes (hierarchy expansion), the
# suppression (NMS / soft-NMS / adj-NMS) and optional relationship rescoring, as configured (variant `default`)
# or as an ablation variant changes it, or as configured on the rows of one test-time view (`view<scale>[flip]`). `gather` joins the shards of any per-shard stage before evaluation and
# submission.


rule relations:
    input:
        boxes=rules.ingest.output.boxes,
        splits=rules.split.output.splits,
    output:
        stats="results/relations/stats.json",
    log:
        "logs/relations.log",
    benchmark:
        "benchmarks/relations/relations.tsv"
    params:
        ioa_thr=config["postprocess"]["ioa_thr"],
    threads: RES["relations"]["threads"]
    resources:
        mem_mb=rule_mem("relations"),
        runtime=rule_runtime("relations"),
    conda:
        ENV
    shell:
        "python -m stages.relations --boxes {input.boxes:q} --splits {input.splits:q} --split train"
        " --ioa-thr {params.ioa_thr} --out {output.stats:q} > {log:q} 2>&1"


rule postprocess:
    input:
        dets=rules.infer.output.dets,
        # the hierarchy / relation statistics when the variant expands / rescores (none otherwise)
        hierarchy=branch(variant_key(POSTPROCESS, "expand_hierarchy"), then=rules.ingest.output.hierarchy),
        relations=branch(variant_key(POSTPROCESS, "relations"), then=rules.relations.output.stats),
    output:
        dets="results/postprocess/{variant}/{model}/{split}/shard{shard}.parquet",
    log:
        "logs/postprocess/{variant}/{model}/{split}/shard{shard}.log",
    benchmark:
        "benchmarks/postprocess/{variant}/{model}/{split}/shard{shard}.tsv"
    wildcard_constraints:
        variant=one_of(POSTPROCESS),
    params:
        options=variant_options(POSTPROCESS, ["method", "iou_thr", "sigma", "score_thr", "max_per_image",
                                              "max_per_class", "conf_thr", "cooc_weight", "surround_thr",
                                              "min_support", "boost", "penalty", "scale", "flip"]),
    priority: expert_first
    threads: RES["postprocess"]["threads"]
    resources:
        mem_mb=rule_mem("postprocess"),
        runtime=rule_runtime("postprocess"),
    conda:
        ENV
    shell:
        "python -m stages.postprocess --detections {input.dets:q} --expand-hierarchy {input.hierarchy:q}"
        " --relations {input.relations:q} {params.options} --out {output.dets:q} > {log:q} 2>&1"


rule gather:
    input:
        shards=lambda wc: expand(
            "results/{stage}/{variant}/{name}/{split}/shard{shard}.parquet",
            stage=wc.stage,
            variant=wc.variant,
            name=wc.name,
            split=wc.split,
            shard=range(SHARDS),
        ),
    output:
        dets="results/{stage}/{variant}/{name}/{split}.parquet",
    log:
        "logs/gather/{stage}/{variant}/{name}/{split}.log",
    benchmark:
        "benchmarks/gather/{stage}/{variant}/{name}/{split}.tsv"
    wildcard_constraints:
        name=r"[^/]+",
    priority: expert_first
    threads: RES["gather"]["threads"]
    resources:
        mem_mb=rule_mem("gather"),
        runtime=rule_runtime("gather"),
    conda:
        ENV
    shell:
        # joins the shards only: no suppression, no score threshold, no cap
        "python -m stages.postprocess --detections {input.shards:q} --method none --score-thr 0"
        " --max-per-image 0 --out {output.dets:q} > {log:q} 2>&1"
