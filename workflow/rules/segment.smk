# The segmentation track (paper 8): ground-truth masks ingested; the refiner (a cascade box regressor on a trained
# detector's frozen features) moves the final ensemble's boxes; each HRNet mask model predicts a map per box and
# test-time view; the maps are voted per pixel into masks; val_a / val_b are scored, the test masks make
# segmentation.csv, and results/ablation/segmentation.md compares models, flip, the vote and the box sources.


rule ingest_masks:
    input:
        masks=raw("masks_csv"),
        seg_classes=raw("seg_classes_csv"),
        seg_hierarchy=raw("seg_hierarchy_json"),
        images=rules.ingest.output.images,
        classes=rules.ingest.output.classes,
    output:
        masks="results/ingest/gt_masks.parquet",
        classes="results/ingest/seg_classes.parquet",
        hierarchy="results/ingest/seg_hierarchy.parquet",
    log:
        "logs/ingest_masks.log",
    benchmark:
        "benchmarks/ingest_masks/ingest_masks.tsv"
    params:
        mask_dir=f"{DATA}/{config['dataset']['masks_dir']}",
        resize="--resize-masks" if config["dataset"]["resize_masks"] else "",
    threads: RES["ingest_masks"]["threads"]
    resources:
        mem_mb=rule_mem("ingest_masks"),
        runtime=rule_runtime("ingest_masks"),
    conda:
        ENV
    shell:
        "python -m stages.ingest_masks --masks-csv {input.masks:q} --mask-dir {params.mask_dir:q}"
        " --images {input.images:q} --classes {input.classes:q} --seg-classes {input.seg_classes:q}"
        " --seg-hierarchy {input.seg_hierarchy:q} {params.resize} --threads {threads} --out-masks {output.masks:q}"
        " --out-classes {output.classes:q} --out-hierarchy {output.hierarchy:q} > {log:q} 2>&1"


rule mask_boxes:
    """Paper 5.9 (insufficient labels): for classes whose boxes are mostly group-of and that have instance masks,
    the tight boxes of the masks' pixels join the train split's boxes as instances (stages.mask_boxes); the
    models with `mask_boxes: true` train on this table. The report says which classes and how many boxes."""
    input:
        boxes=rules.ingest.output.boxes,
        masks=rules.ingest_masks.output.masks,
        splits=rules.split.output.splits,
        classes=rules.ingest.output.classes,
    output:
        boxes="results/mask_boxes/boxes.parquet",
        report="results/mask_boxes/report.json",
    log:
        "logs/mask_boxes.log",
    params:
        classes=(
            " ".join(map(shlex.quote, config["dataset"]["mask_boxes"]["classes"]))
            if isinstance(config["dataset"]["mask_boxes"]["classes"], list)
            else "auto"
        ),
        share=config["dataset"]["mask_boxes"]["group_of_share"],
        dedupe=config["dataset"]["mask_boxes"]["dedupe_iou"],
    threads: RES["ingest"]["threads"]
    resources:
        mem_mb=rule_mem("ingest"),
        runtime=rule_runtime("ingest"),
    conda:
        ENV
    shell:
        "python -m stages.mask_boxes --boxes {input.boxes:q} --gt-masks {input.masks:q} --splits {input.splits:q}"
        " --known-classes {input.classes:q} --classes {params.classes} --group-of-share {params.share}"
        " --dedupe-iou {params.dedupe} --out {output.boxes:q} --report {output.report:q} > {log:q} 2>&1"


rule train_masks:
    input:
        images=rules.ingest.output.images,
        masks=rules.ingest_masks.output.masks,
        splits=rules.split.output.splits,
    output:
        model="results/train_masks/{mask_model}/model.pt",
    log:
        "logs/train_masks/{mask_model}.log",
    benchmark:
        "benchmarks/train_masks/{mask_model}.tsv"
    params:
        # only the keys training reads (x-reads: train)
        cfg=mask_train_json,
        ckpt=lambda wc: f"results/train_masks/{wc.mask_model}/ckpt",
        metrics=lambda wc: f"results/train_masks/{wc.mask_model}/metrics.jsonl",
        device=config["device"],
    threads: lambda wc: mask_cfg(wc.mask_model)["threads"]
    retries: 1
    resources:
        mem_mb=lambda wc, attempt: mask_cfg(wc.mask_model)["mem_mb"] * attempt,
        runtime=lambda wc, attempt: mask_cfg(wc.mask_model)["runtime_min"] * attempt,
        gpu=lambda wc: mask_cfg(wc.mask_model)["gpus"],
        workers=lambda wc: mask_cfg(wc.mask_model)["workers"],
    conda:
        ENV
    shell:
        "python -m stages.core.launch {resources.gpu} 1 -m stages.train_masks --config {params.cfg:q}"
        " --images {input.images:q} --masks {input.masks:q} --splits {input.splits:q} --split train"
        " --device {params.device} --threads {threads} --workers {resources.workers}"
        " --ckpt-dir {params.ckpt:q} --metrics {params.metrics:q} --out {output.model:q} > {log:q} 2>&1"


rule train_refiner:
    input:
        detector=expand(rules.train.output.model, model=REFINER["detector"]),
        images=rules.ingest.output.images,
        boxes=rules.ingest.output.boxes,
        splits=rules.split.output.splits,
    output:
        model="results/refiner/model.pt",
    log:
        "logs/train_refiner.log",
    benchmark:
        "benchmarks/train_refiner/train_refiner.tsv"
    params:
        cfg=refiner_json,
        ckpt="results/refiner/ckpt",
        metrics="results/refiner/metrics.jsonl",
        device=config["device"],
    threads: REFINER["threads"]
    retries: 1
    resources:
        mem_mb=lambda wc, attempt: REFINER["mem_mb"] * attempt,
        runtime=lambda wc, attempt: REFINER["runtime_min"] * attempt,
        gpu=REFINER["gpus"],
    conda:
        ENV
    shell:
        "python -m stages.core.launch {resources.gpu} 1 -m stages.train_refiner --detector {input.detector:q}"
        " --config {params.cfg:q} --images {input.images:q} --boxes {input.boxes:q} --splits {input.splits:q}"
        " --split train --device {params.device} --threads {threads} --ckpt-dir {params.ckpt:q}"
        " --metrics {params.metrics:q} --out {output.model:q} > {log:q} 2>&1"


rule refine:
    input:
        refiner=rules.train_refiner.output.model,
        dets=lambda wc: final_dets(wc.split),
        images=images_for,
    output:
        dets="results/refine/{split}/shard{shard}.parquet",
    log:
        "logs/refine/{split}/shard{shard}.log",
    benchmark:
        "benchmarks/refine/{split}/shard{shard}.tsv"
    params:
        shards=SHARDS,
        device=config["device"],
    threads: RES["refine"]["threads"]
    resources:
        mem_mb=rule_mem("refine"),
        runtime=rule_runtime("refine"),
        gpu=min(1, REFINER["gpus"]),
    conda:
        ENV
    shell:
        "python -m stages.refine --refiner {input.refiner:q} --detections {input.dets:q} --images {input.images:q}"
        " --shard {wildcards.shard} --shards {params.shards} --device {params.device} --threads {threads}"
        " --out {output.dets:q} > {log:q} 2>&1"


rule infer_masks:
    input:
        model=rules.train_masks.output.model,
        boxes=mask_boxes,
        images=images_for,
        splits=rules.split.output.splits,
        seg_classes=rules.ingest_masks.output.classes,
    output:
        probs="results/infer_masks/{mask_model}/{source}/{split}/shard{shard}.npz",
    log:
        "logs/infer_masks/{mask_model}/{source}/{split}/shard{shard}.log",
    benchmark:
        "benchmarks/infer_masks/{mask_model}/{source}/{split}/shard{shard}.tsv"
    params:
        select=mask_select,
        run=cli_options(SEG | {"device": config["device"]}, ["top_n", "map_size", "device"]),
    threads: RES["infer_masks"]["threads"]
    resources:
        mem_mb=rule_mem("infer_masks"),
        runtime=rule_runtime("infer_masks"),
        gpu=per_entry(SEG["models"], "mask_model", lambda cfg: min(1, cfg["gpus"])),
    conda:
        ENV
    shell:
        "python -m stages.infer_masks --model {input.model:q} --images {input.images:q}"
        " --splits {input.splits:q} {params.select} --classes {input.seg_classes:q} {params.run}"
        " --threads {threads} --out {output.probs:q} > {log:q} 2>&1"


rule segment:
    input:
        probs=lambda wc: expand(
            rules.infer_masks.output.probs, mask_model=SEG_ENSEMBLE, source=SEG_SOURCE, split=wc.split, shard=wc.shard
        ),
    output:
        masks="results/segment/{split}/shard{shard}.parquet",
    log:
        "logs/segment/{split}/shard{shard}.log",
    benchmark:
        "benchmarks/segment/{split}/shard{shard}.tsv"
    params:
        vote=SEG["vote"],
        thr=SEG["thr"],
    threads: RES["segment"]["threads"]
    resources:
        mem_mb=rule_mem("segment"),
        runtime=rule_runtime("segment"),
    conda:
        ENV
    shell:
        "python -m stages.segment --probs {input.probs:q} --vote {params.vote} --thr {params.thr}"
        " --out {output.masks:q} > {log:q} 2>&1"


rule evaluate_seg:
    input:
        masks=lambda wc: expand(rules.segment.output.masks, split=wc.split, shard=range(SHARDS)),
        gt_masks=rules.ingest_masks.output.masks,
        boxes=rules.ingest.output.boxes,
        labels=rules.ingest.output.image_labels,
        hierarchy=rules.ingest_masks.output.hierarchy,
        classes=rules.ingest_masks.output.classes,
        splits=rules.split.output.splits,
    output:
        json=SEG_METRICS,
    log:
        "logs/evaluate_seg/{split}.log",
    wildcard_constraints:
        split=one_of(VAL_SPLITS),
    threads: RES["evaluate_seg"]["threads"]
    resources:
        mem_mb=rule_mem("evaluate_seg"),
        runtime=rule_runtime("evaluate_seg"),
    conda:
        ENV
    shell:
        "python -m stages.evaluate --gt-masks {input.gt_masks:q} --boxes {input.boxes:q} --image-labels {input.labels:q}"
        " --hierarchy {input.hierarchy:q} --classes {input.classes:q} --predictions {input.masks:q}"
        " --split-ids {input.splits:q} --split {wildcards.split} --out {output.json:q} > {log:q} 2>&1"


rule submit_seg:
    input:
        masks=expand(rules.segment.output.masks, split="test", shard=range(SHARDS)),
        images=rules.ingest.output.test_images,
        seg_classes=rules.ingest_masks.output.classes,
    output:
        csv="segmentation.csv",
    log:
        "logs/submit_seg.log",
    threads: RES["submit_seg"]["threads"]
    resources:
        mem_mb=rule_mem("submit_seg"),
        runtime=rule_runtime("submit_seg"),
    conda:
        ENV
    shell:
        "python -m stages.submit_seg --masks {input.masks:q} --images {input.images:q}"
        " --seg-classes {input.seg_classes:q} --out {output.csv:q} > {log:q} 2>&1"


rule seg_ablation:
    """The paper's Table 5 in miniature, on val_a and val_b: each mask model alone (first view, then with its
    flip), the vote, the vote on unrefined and on ground-truth boxes; and the refiner's effect on the boxes."""
    input:
        probs=lambda wc: [p for p in seg_ablation_probs().values()],
        raw=final_dets(VAL_SPLITS),
        refined=expand(rules.refine.output.dets, split=VAL_SPLITS, shard=range(SHARDS)),
        gt_masks=rules.ingest_masks.output.masks,
        boxes=rules.ingest.output.boxes,
        labels=rules.ingest.output.image_labels,
        seg_hierarchy=rules.ingest_masks.output.hierarchy,
        seg_classes=rules.ingest_masks.output.classes,
        hierarchy=rules.ingest.output.hierarchy,
        classes=rules.ingest.output.classes,
        splits=rules.split.output.splits,
    output:
        json="results/ablation/segmentation.json",
        md="results/ablation/segmentation.md",
    log:
        "logs/ablation_table/segmentation.log",
    params:
        probs=lambda wc: " ".join(f"{k}={shlex.quote(p)}" for k, p in seg_ablation_probs().items()),
        raw=lambda wc: " ".join(f"{s}={shlex.quote(p)}" for s, p in zip(VAL_SPLITS, final_dets(VAL_SPLITS))),
        refined=lambda wc: " ".join(
            f"{s}={shlex.quote(p)}" for s in VAL_SPLITS for p in expand(rules.refine.output.dets, split=s, shard=range(SHARDS))
        ),
        models=" ".join(SEG_ENSEMBLE),
        vote=SEG["vote"],
        thr=SEG["thr"],
    threads: RES["seg_ablation"]["threads"]
    resources:
        mem_mb=rule_mem("seg_ablation"),
        runtime=rule_runtime("seg_ablation"),
    conda:
        ENV
    shell:
        "python -m stages.seg_ablation --probs {params.probs} --models {params.models} --raw {params.raw}"
        " --refined {params.refined} --gt-masks {input.gt_masks:q} --boxes {input.boxes:q}"
        " --image-labels {input.labels:q} --seg-hierarchy {input.seg_hierarchy:q} --seg-classes {input.seg_classes:q}"
        " --hierarchy {input.hierarchy:q} --classes {input.classes:q} --split-ids {input.splits:q}"
        " --vote {params.vote} --thr {params.thr} --out-json {output.json:q} --out-md {output.md:q} > {log:q} 2>&1"
