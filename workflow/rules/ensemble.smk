# The naive ensemble (paper §4.1), per image shard: PFDet per-class AP re-weighting + top-k voting + adj-NMS
# over each group's models' raw (hierarchy-expanded, not yet suppressed) detections. The AP weights of a split
# come from the *other* validation split (val_a <- val_b, val_b <- val_a, test <- val_a), so neither
# validation score is tuned on itself.


rule ensemble:
    input:
        unpack(lambda wc: ensemble_inputs(config["ensemble"]["groups"][wc.group], wc)),
    output:
        dets="results/ensemble/{group}/{split}/shard{shard}.parquet",
    log:
        "logs/ensemble/{group}/{split}/shard{shard}.log",
    params:
        flags=ensemble_flags({}),
        expand=lambda wc, input: expand_flag(input.hierarchy),
        aps=lambda wc, input: f"--ap-metrics {' '.join(input.aps)}" if config["ensemble"]["reweight"] else "",
    conda:
        ENV
    shell:
        "python -m stages.ensemble --detections {input.dets:q} {params.expand} {params.aps} {params.flags}"
        " --out {output.dets:q} > {log:q} 2>&1"


rule ablation_ensemble:
    input:
        unpack(lambda wc: ensemble_inputs(ABLATION_GROUP, wc)),
    output:
        dets="results/ablation_ensemble/{variant}/{split}/shard{shard}.parquet",
    log:
        "logs/ablation_ensemble/{variant}/{split}/shard{shard}.log",
    params:
        flags=lambda wc: ensemble_flags(config["ablation"]["ensemble"][wc.variant]),
        expand=lambda wc, input: expand_flag(input.hierarchy),
        aps=lambda wc, input: (
            f"--ap-metrics {' '.join(input.aps)}"
            if config["ablation"]["ensemble"][wc.variant].get("reweight", config["ensemble"]["reweight"])
            else ""
        ),
    conda:
        ENV
    shell:
        "python -m stages.ensemble --detections {input.dets:q} {params.expand} {params.aps} {params.flags}"
        " --out {output.dets:q} > {log:q} 2>&1"
