# Post-processing per variant, model, split and image shard: add parent-class boxes (hierarchy expansion), the
# suppression (NMS / soft-NMS / adj-NMS) and optional relationship rescoring, as configured (variant `default`)
# or as an ablation variant changes it. `gather` joins the shards of any per-shard stage before evaluation and
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
    conda:
        ENV
    shell:
        "python -m stages.relations --boxes {input.boxes:q} --splits {input.splits:q} --split train"
        " --ioa-thr {params.ioa_thr} --out {output.stats:q} > {log:q} 2>&1"


rule postprocess:
    input:
        dets=rules.infer.output.dets,
        # the hierarchy / relation statistics when the variant expands / rescores (none otherwise)
        hierarchy=branch(
            lookup(dpath="{variant}/expand_hierarchy", within=POSTPROCESS), then=rules.ingest.output.hierarchy
        ),
        relations=branch(lookup(dpath="{variant}/relations", within=POSTPROCESS), then=rules.relations.output.stats),
    output:
        dets="results/postprocess/{variant}/{model}/{split}/shard{shard}.parquet",
    log:
        "logs/postprocess/{variant}/{model}/{split}/shard{shard}.log",
    benchmark:
        "benchmarks/postprocess/{variant}/{model}/{split}/shard{shard}.tsv"
    wildcard_constraints:
        variant=one_of(POSTPROCESS),
    params:
        method=lookup(dpath="{variant}/method", within=POSTPROCESS),
        iou_thr=lookup(dpath="{variant}/iou_thr", within=POSTPROCESS),
        sigma=lookup(dpath="{variant}/sigma", within=POSTPROCESS),
        score_thr=lookup(dpath="{variant}/score_thr", within=POSTPROCESS),
        max_per_image=lookup(dpath="{variant}/max_per_image", within=POSTPROCESS),
        conf_thr=lookup(dpath="{variant}/conf_thr", within=POSTPROCESS),
        cooc_weight=lookup(dpath="{variant}/cooc_weight", within=POSTPROCESS),
        surround_thr=lookup(dpath="{variant}/surround_thr", within=POSTPROCESS),
        min_support=lookup(dpath="{variant}/min_support", within=POSTPROCESS),
        boost=lookup(dpath="{variant}/boost", within=POSTPROCESS),
        penalty=lookup(dpath="{variant}/penalty", within=POSTPROCESS),
    conda:
        ENV
    shell:
        "python -m stages.postprocess --detections {input.dets:q} --expand-hierarchy {input.hierarchy:q}"
        " --method {params.method} --iou-thr {params.iou_thr} --sigma {params.sigma}"
        " --score-thr {params.score_thr} --max-per-image {params.max_per_image}"
        " --relations {input.relations:q} --conf-thr {params.conf_thr} --cooc-weight {params.cooc_weight}"
        " --surround-thr {params.surround_thr} --min-support {params.min_support} --boost {params.boost}"
        " --penalty {params.penalty} --out {output.dets:q} > {log:q} 2>&1"


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
    conda:
        ENV
    shell:
        # joins the shards only: no suppression, no score threshold, no cap
        "python -m stages.postprocess --detections {input.shards:q} --method none --score-thr 0"
        " --max-per-image 0 --out {output.dets:q} > {log:q} 2>&1"
