# The Kaggle detection submission from the configured ensemble's test detections.


rule submit:
    input:
        dets=expand("results/ensemble/{group}/test.parquet", group=config["submit"]["ensemble"]),
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
