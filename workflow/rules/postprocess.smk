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
        method=variant_key(POSTPROCESS, "method"),
        iou_thr=variant_key(POSTPROCESS, "iou_thr"),
        sigma=variant_key(POSTPROCESS, "sigma"),
        score_thr=variant_key(POSTPROCESS, "score_thr"),
        max_per_image=variant_key(POSTPROCESS, "max_per_image"),
        max_per_class=variant_key(POSTPROCESS, "max_per_class"),
        conf_thr=variant_key(POSTPROCESS, "conf_thr"),
        cooc_weight=variant_key(POSTPROCESS, "cooc_weight"),
        surround_thr=variant_key(POSTPROCESS, "surround_thr"),
        min_support=variant_key(POSTPROCESS, "min_support"),
        boost=variant_key(POSTPROCESS, "boost"),
        penalty=variant_key(POSTPROCESS, "penalty"),
        scale=variant_key(POSTPROCESS, "scale"),
        flip=variant_key(POSTPROCESS, "flip"),
    priority: expert_first
    threads: RES["postprocess"]["threads"]
    resources:
        mem_mb=rule_mem("postprocess"),
        runtime=rule_runtime("postprocess"),
    conda:
        ENV
    shell:
        "python -m stages.postprocess --detections {input.dets:q} --expand-hierarchy {input.hierarchy:q}"
        " --method {params.method} --iou-thr {params.iou_thr} --sigma {params.sigma}"
        " --score-thr {params.score_thr} --max-per-image {params.max_per_image}"
        " --max-per-class {params.max_per_class} --relations {input.relations:q} --conf-thr {params.conf_thr} --cooc-weight {params.cooc_weight}"
        " --surround-thr {params.surround_thr} --min-support {params.min_support} --boost {params.boost}"
        " --penalty {params.penalty} --scale {params.scale} --flip {params.flip} --out {output.dets:q} > {log:q} 2>&1"


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
