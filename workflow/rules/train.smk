# Train one detector per entry of config["models"] (the per-model fan-out).


rule train:
    input:
        images=rules.ingest.output.images,
        boxes=rules.ingest.output.boxes,
        splits=rules.split.output.splits,
        sampling=lambda wc: expand(rules.sample.output.weights, method=model_cfg(wc.model)["sampling"]),
    output:
        model="results/train/{model}/model.pt",
    log:
        "logs/train/{model}.log",
    benchmark:
        "benchmarks/train/{model}.tsv"
    params:
        cfg=model_json,
        ckpt=lambda wc: f"results/train/{wc.model}/ckpt",
        metrics=lambda wc: f"results/train/{wc.model}/metrics.jsonl",
        device=config["device"],
    threads: lambda wc: model_cfg(wc.model)["threads"]
    resources:
        mem_mb=lambda wc: model_cfg(wc.model)["mem_mb"],
        runtime=lambda wc: model_cfg(wc.model)["runtime_min"],
        gpu=lambda wc: model_cfg(wc.model)["gpus"],
    conda:
        ENV
    shell:
        "python -m stages.train --config {params.cfg:q} --images {input.images:q} --boxes {input.boxes:q}"
        " --splits {input.splits:q} --sampling {input.sampling:q} --device {params.device}"
        " --ckpt-dir {params.ckpt:q} --metrics {params.metrics:q} --out {output.model:q} > {log:q} 2>&1"
