# The naive ensemble (paper §4.1): PFDet per-class AP re-weighting + top-k voting + adj-NMS over the
# gathered (expanded, not yet suppressed) detections of each group's models. The AP weights of a split come
# from the *other* validation split (val_a <- val_b, val_b <- val_a, test <- val_a), so neither validation
# score is tuned on itself.


rule ensemble:
    input:
        unpack(lambda wc: ensemble_inputs(config["ensemble"]["groups"][wc.group], wc.split)),
    output:
        dets="results/ensemble/{group}/{split}.parquet",
    log:
        "logs/ensemble/{group}/{split}.log",
    params:
        flags=ensemble_flags({}),
        aps=lambda wc, input: f"--ap-metrics {' '.join(input.aps)}" if config["ensemble"]["reweight"] else "",
    conda:
        ENV
    shell:
        "python -m stages.ensemble --detections {input.dets:q} {params.aps} {params.flags}"
        " --out {output.dets:q} > {log:q} 2>&1"


rule ablation_ensemble:
    input:
        unpack(lambda wc: ensemble_inputs(ABLATION_GROUP, wc.split)),
    output:
        dets="results/ablation_ensemble/{variant}/{split}.parquet",
    log:
        "logs/ablation_ensemble/{variant}/{split}.log",
    params:
        flags=lambda wc: ensemble_flags(config["ablation"]["ensemble"][wc.variant]),
        aps=lambda wc, input: (
            f"--ap-metrics {' '.join(input.aps)}"
            if config["ablation"]["ensemble"][wc.variant].get("reweight", config["ensemble"]["reweight"])
            else ""
        ),
    conda:
        ENV
    shell:
        "python -m stages.ensemble --detections {input.dets:q} {params.aps} {params.flags}"
        " --out {output.dets:q} > {log:q} 2>&1"
