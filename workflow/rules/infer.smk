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
        select=lambda wc: "" if wc.split == "test" else f"--split {wc.split}",
        flip=lambda wc: "--flip" if model_cfg(wc.model)["test_flip"] else "",
        scales=lambda wc: " ".join(str(s) for s in model_cfg(wc.model)["test_scales"]),
        shards=SHARDS,
        score_thr=config["infer"]["score_thr"],
        max_det=config["infer"]["max_per_image"],
        batch=config["infer"]["batch_size"],
        device=config["device"],
    threads: 1
    resources:
        gpu=lambda wc: min(1, model_cfg(wc.model)["gpus"]),
    conda:
        ENV
    shell:
        "python -m stages.infer --model {input.model:q} --model-name {wildcards.model} --images {input.images:q}"
        " --splits {input.splits:q} {params.select} --scales {params.scales} {params.flip} --shard {wildcards.shard}"
        " --shards {params.shards} --score-thr {params.score_thr} --max-per-image {params.max_det}"
        " --batch-size {params.batch} --device {params.device} --threads {threads}"
        " --out {output.dets:q} > {log:q} 2>&1"
