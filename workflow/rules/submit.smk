# The Kaggle detection submission from the configured ensemble's test detections.


rule submit:
    input:
        dets=expand(
            rules.gather.output.dets,
            stage="ensemble",
            variant="default",
            name=config["submit"]["ensemble"],
            split="test",
        ),
        images=rules.ingest.output.test_images,
    output:
        csv="submission.csv",
    log:
        "logs/submit.log",
    conda:
        ENV
    shell:
        "python -m stages.submit --detections {input.dets:q} --images {input.images:q} --out {output.csv:q}"
        " > {log:q} 2>&1"
