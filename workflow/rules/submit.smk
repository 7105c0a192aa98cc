# The Kaggle detection submission from the merged test detections.


rule submit:
    input:
        dets="results/merge/test.parquet",
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
