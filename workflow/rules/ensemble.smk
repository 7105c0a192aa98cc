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
        reweight=variant_key(ENSEMBLE, "reweight"),
        merge_views=variant_key(ENSEMBLE, "merge_views"),
        vote=variant_key(ENSEMBLE, "vote"),
        k=variant_key(ENSEMBLE, "k"),
        score_weight=variant_key(ENSEMBLE, "score_weight"),
        box_weight=variant_key(ENSEMBLE, "box_weight"),
        min_iou=variant_key(ENSEMBLE, "min_iou"),
        method=variant_key(ENSEMBLE, "method"),
        class_filters=class_filters,
        # the final suppression's thresholds and cap are the postprocess section's
        iou_thr=config["postprocess"]["iou_thr"],
        sigma=config["postprocess"]["sigma"],
        score_thr=config["postprocess"]["score_thr"],
        max_per_image=config["postprocess"]["max_per_image"],
        max_per_class=config["postprocess"]["max_per_class"],
    threads: RES["ensemble"]["threads"]
    resources:
        mem_mb=rule_mem("ensemble"),
        runtime=rule_runtime("ensemble"),
    conda:
        ENV
    shell:
        "python -m stages.ensemble --detections {input.dets:q} --expand-hierarchy {input.hierarchy:q}"
        " --reweight {params.reweight} --ap-metrics {input.aps:q} --vote {params.vote} --k {params.k}"
        " --score-weight {params.score_weight} --box-weight {params.box_weight} --min-iou {params.min_iou}"
        " --merge-views {params.merge_views}"
        " {params.class_filters} --method {params.method} --iou-thr {params.iou_thr} --sigma {params.sigma}"
        " --score-thr {params.score_thr} --max-per-image {params.max_per_image}"
        " --max-per-class {params.max_per_class} --out {output.dets:q}"
        " > {log:q} 2>&1"
