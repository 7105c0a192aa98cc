# Post-processing per model and split: gather the image shards, merge test scales with the configured NMS
# variant, add parent-class boxes (hierarchy expansion). Then merge models per split.


rule postprocess:
    input:
        dets=infer_shards,
        hierarchy=rules.ingest.output.hierarchy,
    output:
        dets="results/postprocess/{model}/{split}.parquet",
    log:
        "logs/postprocess/{model}/{split}.log",
    params:
        method=config["postprocess"]["method"],
        iou_thr=config["postprocess"]["iou_thr"],
        sigma=config["postprocess"]["sigma"],
        score_thr=config["postprocess"]["score_thr"],
        max_det=config["postprocess"]["max_per_image"],
        expand=lambda wc, input: f"--expand-hierarchy {input.hierarchy}"
        if config["postprocess"]["expand_hierarchy"]
        else "",
    conda:
        ENV
    shell:
        "python -m stages.postprocess --detections {input.dets:q} --method {params.method}"
        " --iou-thr {params.iou_thr} --sigma {params.sigma} --score-thr {params.score_thr}"
        " --max-per-image {params.max_det} {params.expand} --out {output.dets:q} > {log:q} 2>&1"


rule merge:
    input:
        dets=expand("results/postprocess/{model}/{{split}}.parquet", model=SUBMIT_MODELS),
    output:
        dets="results/merge/{split}.parquet",
    log:
        "logs/merge/{split}.log",
    params:
        iou_thr=config["submit"]["merge_iou_thr"],
        max_det=config["postprocess"]["max_per_image"],
    conda:
        ENV
    shell:
        "python -m stages.postprocess --detections {input.dets:q} --method nms --iou-thr {params.iou_thr}"
        " --max-per-image {params.max_det} --out {output.dets:q} > {log:q} 2>&1"
