# The Kaggle detection submission from the test detections of the ensemble that ensemble.mode names: the auto
# ensemble (the tree searched on val_a) or the naive ensemble of the group submit.ensemble.


rule submit:
    input:
        dets=final_dets("test"),
        images=rules.ingest.output.test_images,
    output:
        csv="submission.csv",
    log:
        "logs/submit.log",
    threads: RES["submit"]["threads"]
    resources:
        mem_mb=rule_mem("submit"),
        runtime=rule_runtime("submit"),
    conda:
        ENV
    shell:
        "python -m stages.submit --detections {input.dets:q} --images {input.images:q} --out {output.csv:q}"
        " > {log:q} 2>&1"
