# Inference per model x split x image shard, at the model's test scales.


rule infer:
    input:
        model=rules.train.output.model,
        images=images_for,
        splits=rules.split.output.splits,
    output:
        dets="results/infer/{model}/{split}/shard{shard}.parquet",
    log:
        "logs/infer/{model}/{split}/shard{shard}.log",
    benchmark:
        "benchmarks/infer/{model}/{split}/shard{shard}.tsv"
    params:
        select=infer_select,
        run=cli_options(config["infer"] | {"device": config["device"]},
                        ["shards", "score_thr", "max_per_image", "batch_size", "device"]),
    priority: expert_first
    threads: 1
    resources:
        gpu=per_entry(config["models"], "model", lambda cfg: min(1, cfg["gpus"])),
    conda:
        ENV
    shell:
        "python -m stages.infer --model {input.model:q} --model-name {wildcards.model} --images {input.images:q}"
        " --splits {input.splits:q} {params.select} --shard {wildcards.shard} {params.run}"
        " --threads {threads} --out {output.dets:q} > {log:q} 2>&1"
