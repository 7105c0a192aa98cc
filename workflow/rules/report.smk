# The HTML report: mAP per model and stage on val_a / val_b, per-class AP, sample images of the detections that
# make the submission (val_a with its ground truth dashed, and test), the ablation tables, the auto ensemble's
# trees drawn with each node's mAP, and the expert models' mined sets over their base models' FC-weight cosines.


rule report:
    input:
        metrics=rules.metrics_table.input,
        dets=final_dets(["val_a", "test"]),
        # the segmentation track's masks (val_a, test) drawn filled, and its ablation table
        masks=expand(rules.segment.output.masks, split=["val_a", "test"], shard=range(SHARDS)) if SEG_ON else [],
        trees=expand(rules.autoensemble_search.output.scores, search=SEARCHES),
        ablation=expand(rules.ablation_table.output.json, kind=ABLATIONS)
        + ([rules.experts_table.output.json] if EXPERTS and config["ablation"]["experts_baseline"] else [])
        + ([rules.seg_ablation.output.json] if SEG_ON else []),
        images=rules.ingest.output.images,
        test_images=rules.ingest.output.test_images,
        boxes=rules.ingest.output.boxes,
        classes=rules.ingest.output.classes,
        # expert models (expert_of set): their mined sets and base models (the FC-weight cosine heatmaps)
        experts=expand(rules.experts.output.experts, model=MINED),
        expert_models=[expand(rules.train.output.model, model=expert_base(m))[0] for m in MINED],
        cards=expand(rules.card.output.card, model=MODELS),
    output:
        html="results/report.html",
    log:
        "logs/report.log",
    params:
        experts=lambda wc, input: (
            f"--experts {' '.join(map(shlex.quote, input.experts))}"
            f" --expert-models {' '.join(map(shlex.quote, input.expert_models))}"
            if input.experts
            else ""
        ),
    threads: RES["report"]["threads"]
    resources:
        mem_mb=rule_mem("report"),
        runtime=rule_runtime("report"),
    conda:
        ENV
    shell:
        "python -m stages.report --metrics {input.metrics:q} --ablation {input.ablation:q} --detections {input.dets:q} {input.masks:q}"
        " --images {input.images:q} {input.test_images:q} --boxes {input.boxes:q} --classes {input.classes:q}"
        " --autoensemble {input.trees:q} {params.experts} --cards {input.cards:q} --out-html {output.html:q} > {log:q} 2>&1"
