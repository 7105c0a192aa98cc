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
        # the model's inference keys (x-reads: infer), applied to the trained model
        scales=lambda wc: " ".join(str(s) for s in model_cfg(wc.model)["test_scales"]),
        flip=lambda wc: "--flip" if model_cfg(wc.model)["test_flip"] else "",
        expert=lambda wc: "--expert" if model_cfg(wc.model)["expert"] else "",
        test_max_size_ratio=model_key("test_max_size_ratio"),
        rpn_pre_nms_top_n_test=model_key("rpn_pre_nms_top_n_test"),
        rpn_post_nms_top_n_test=model_key("rpn_post_nms_top_n_test"),
        box_nms_thresh=model_key("box_nms_thresh"),
        shards=SHARDS,
        score_thr=config["infer"]["score_thr"],
        max_det=config["infer"]["max_per_image"],
        batch=config["infer"]["batch_size"],
        device=config["device"],
    priority: expert_first
    threads: 1
    resources:
        gpu=lambda wc: min(1, model_cfg(wc.model)["gpus"]),
    conda:
        ENV
    shell:
        "python -m stages.infer --model {input.model:q} --model-name {wildcards.model} --images {input.images:q}"
        " --splits {input.splits:q} {params.select} --scales {params.scales} {params.flip} {params.expert}"
        " --test-max-size-ratio {params.test_max_size_ratio} --box-nms-thresh {params.box_nms_thresh}"
        " --rpn-pre-nms-top-n-test {params.rpn_pre_nms_top_n_test}"
        " --rpn-post-nms-top-n-test {params.rpn_post_nms_top_n_test}"
        " --shard {wildcards.shard} --shards {params.shards} --score-thr {params.score_thr}"
        " --max-per-image {params.max_det} --batch-size {params.batch} --device {params.device}"
        " --threads {threads} --out {output.dets:q} > {log:q} 2>&1"
