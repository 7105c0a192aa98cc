# The naive ensemble (paper §4.1) per variant, group, split and image shard: PFDet per-class AP re-weighting +
# each model's test-time views merged per model (merge_views) + top-k voting + adj-NMS over each group's models'
# raw (hierarchy-expanded, not yet suppressed) detections, capped per image and class (max_per_class), as
# configured (variant `default`) or as an ablation variant changes it. The AP weights of a split come from the
# *other* validation split (val_a <- val_b, val_b <- val_a, test <- val_a), so neither validation score is tuned
# on itself.


rule ensemble:
    input:
        unpack(ensemble_inputs),
    output:
        dets="results/ensemble/{variant}/{group}/{split}/shard{shard}.parquet",
    log:
        "logs/ensemble/{variant}/{group}/{split}/shard{shard}.log",
    benchmark:
        "benchmarks/ensemble/{variant}/{group}/{split}/shard{shard}.tsv"
    wildcard_constraints:
        variant=one_of(ENSEMBLE),
    params:
        options=variant_options(ENSEMBLE, ["reweight", "merge_views", "vote", "k", "score_weight", "box_weight",
                                           "min_iou", "method"]),
        class_filters=class_filters,
        # the final suppression's thresholds and cap are the postprocess section's
        suppression=cli_options(config["postprocess"], ["iou_thr", "sigma", "score_thr", "max_per_image",
                                                        "max_per_class"]),
    threads: RES["ensemble"]["threads"]
    resources:
        mem_mb=rule_mem("ensemble"),
        runtime=rule_runtime("ensemble"),
    conda:
        ENV
    shell:
        "python -m stages.ensemble --detections {input.dets:q} --expand-hierarchy {input.hierarchy:q}"
        " --ap-metrics {input.aps:q} {params.options} {params.class_filters} {params.suppression}"
        " --out {output.dets:q} > {log:q} 2>&1"
