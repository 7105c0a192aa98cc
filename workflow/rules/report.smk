# The HTML report: mAP per model and stage on val_a / val_b, per-class AP, sample images of the merged
# detections (val_a with its ground truth dashed, and test), the ablation tables.


rule report:
    input:
        metrics=rules.metrics_table.input,
        dets=expand(
            rules.gather.output.dets,
            stage="ensemble",
            variant="default",
            name=config["submit"]["ensemble"],
            split=["val_a", "test"],
        ),
        ablation=expand(rules.ablation_table.output.json, kind=ABLATIONS),
        images=rules.ingest.output.images,
        test_images=rules.ingest.output.test_images,
        boxes=rules.ingest.output.boxes,
        classes=rules.ingest.output.classes,
    output:
        html="results/report.html",
    log:
        "logs/report.log",
    conda:
        ENV
    shell:
        "python -m stages.report --metrics {input.metrics:q} --ablation {input.ablation:q} --detections {input.dets:q}"
        " --images {input.images:q} {input.test_images:q} --boxes {input.boxes:q} --classes {input.classes:q}"
        " --out-html {output.html:q} > {log:q} 2>&1"
