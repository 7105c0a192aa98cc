# Post-processing per model, split and image shard: add parent-class boxes (hierarchy expansion), the
# configured suppression (NMS / soft-NMS / adj-NMS) and optional relationship rescoring. `gather` joins the
# shards of any per-shard stage before evaluation and submission.


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
        dets=rules.infer.output.dets,
        hierarchy=rules.ingest.output.hierarchy,
        relations=branch(config["postprocess"]["relations"], then=rules.relations.output.stats),
    output:
        dets="results/postprocess/{model}/{split}/shard{shard}.parquet",
    log:
        "logs/postprocess/{model}/{split}/shard{shard}.log",
    params:
        flags=postprocess_flags({}),
        expand=lambda wc, input: expand_flag(input.hierarchy),
        relations=lambda wc, input: f"--relations {input.relations}" if input.relations else "",
    conda:
        ENV
    shell:
        "python -m stages.postprocess --detections {input.dets:q} {params.expand} {params.flags}"
        " {params.relations} --out {output.dets:q} > {log:q} 2>&1"


rule ablation_postprocess:
    input:
        dets=lambda wc: expand(rules.infer.output.dets, model=ABLATION_MODEL, split=wc.split, shard=wc.shard),
        hierarchy=rules.ingest.output.hierarchy,
        relations=rules.relations.output.stats,
    output:
        dets="results/ablation_postprocess/{variant}/{split}/shard{shard}.parquet",
    log:
        "logs/ablation_postprocess/{variant}/{split}/shard{shard}.log",
    params:
        flags=lambda wc: postprocess_flags(config["ablation"]["postprocess"][wc.variant]),
        expand=lambda wc, input: expand_flag(input.hierarchy),
        relations=lambda wc, input: (
            f"--relations {input.relations}"
            if config["ablation"]["postprocess"][wc.variant].get("relations")
            else ""
        ),
    conda:
        ENV
    shell:
        "python -m stages.postprocess --detections {input.dets:q} {params.expand} {params.flags}"
        " {params.relations} --out {output.dets:q} > {log:q} 2>&1"


rule gather:
    input:
        shards=lambda wc: expand(
            "results/{stage}/{name}/{split}/shard{shard}.parquet",
            stage=wc.stage,
            name=wc.name,
            split=wc.split,
            shard=range(SHARDS),
        ),
    output:
        dets="results/{stage}/{name}/{split}.parquet",
    log:
        "logs/gather/{stage}/{name}/{split}.log",
    wildcard_constraints:
        stage="|".join(SHARDED_STAGES),
        name=r"[^/]+",
    conda:
        ENV
    shell:
        "python -m stages.postprocess --detections {input.shards:q} --method none --out {output.dets:q}"
        " > {log:q} 2>&1"
