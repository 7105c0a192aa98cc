# The auto ensemble (paper §4.2): a binary tree of ensemble operators over the leaves (common.smk: leaf_runs) is
# searched on one validation split and confirmed on the other, then applied per split and image shard. Two
# searches: `search_val_a` (its tree makes the test detections and, with ensemble.mode: auto, submission.csv) and
# `search_val_b`, the roles swapped, so that each tree's score on the split it was not searched on shows the
# overfitting. The search log (JSONL) is updated in place: a search cut off resumes where it stopped; one of other
# settings or inputs is set aside (*.stale) and the search starts afresh.


rule autoensemble_search:
    input:
        search=lambda wc: list(auto_leaves(SEARCHES[wc.search][0]).values()),
        check=lambda wc: list(auto_leaves(SEARCHES[wc.search][1]).values()),
        experts=list(expert_leaves().values()),
        boxes=rules.ingest.output.boxes,
        labels=rules.ingest.output.image_labels,
        hierarchy=rules.ingest.output.hierarchy,
        classes=rules.ingest.output.classes,
        splits=rules.split.output.splits,
    output:
        tree="results/autoensemble/{search}/tree.json",
        scores="results/autoensemble/{search}/scores.json",
        log=update("results/autoensemble/{search}/search.jsonl"),
    log:
        "logs/autoensemble_search/{search}.log",
    benchmark:
        "benchmarks/autoensemble_search/{search}.tsv"
    params:
        search_split=lambda wc: SEARCHES[wc.search][0],
        check_split=lambda wc: SEARCHES[wc.search][1],
        search_leaves=lambda wc: named(auto_leaves(SEARCHES[wc.search][0])),
        check_leaves=lambda wc: named(auto_leaves(SEARCHES[wc.search][1])),
        leaf_classes=named(expert_leaves()),
        max_candidates=AUTO["max_candidates"],
        max_minutes=AUTO["max_minutes"],
        seed=AUTO["seed"],
        shape_share=AUTO["shape_share"],
        node_trials=AUTO["node_trials"],
        confirm_top=AUTO["confirm_top"],
        choice=AUTO["choice"],
        guard=AUTO["guard"],
        max_per_image=AUTO["max_per_image"],
        max_per_class=config["postprocess"]["max_per_class"],
    threads: RES["autoensemble_search"]["threads"]
    resources:
        mem_mb=rule_mem("autoensemble_search"),
        runtime=rule_runtime("autoensemble_search"),
    conda:
        ENV
    shell:
        "python -m stages.autoensemble search --search-leaves {params.search_leaves}"
        " --check-leaves {params.check_leaves} --leaf-classes {params.leaf_classes} --boxes {input.boxes:q}"
        " --image-labels {input.labels:q} --hierarchy {input.hierarchy:q} --classes {input.classes:q}"
        " --split-ids {input.splits:q} --search-split {params.search_split} --check-split {params.check_split}"
        " --max-candidates {params.max_candidates} --max-minutes {params.max_minutes} --seed {params.seed}"
        " --shape-share {params.shape_share} --node-trials {params.node_trials} --confirm-top {params.confirm_top}"
        " --choice {params.choice} --guard {params.guard} --max-per-image {params.max_per_image}"
        " --max-per-class {params.max_per_class}"
        " --stale-log restart --out-tree {output.tree:q} --log {output.log:q} --scores {output.scores:q}"
        " > {log:q} 2>&1"


rule autoensemble_apply:
    input:
        tree=rules.autoensemble_search.output.tree,
        leaves=job_fn(lambda wc: list(auto_leaves(wc.split, wc.shard).values())),
        classes=rules.ingest.output.classes,
    output:
        dets="results/autoensemble/default/{search}/{split}/shard{shard}.parquet",
    log:
        "logs/autoensemble_apply/{search}/{split}/shard{shard}.log",
    benchmark:
        "benchmarks/autoensemble_apply/{search}/{split}/shard{shard}.tsv"
    params:
        leaves=job_fn(lambda wc: named(auto_leaves(wc.split, wc.shard))),
        max_per_class=config["postprocess"]["max_per_class"],
    threads: RES["autoensemble_apply"]["threads"]
    resources:
        mem_mb=rule_mem("autoensemble_apply"),
        runtime=rule_runtime("autoensemble_apply"),
    conda:
        ENV
    shell:
        "python -m stages.autoensemble apply --tree {input.tree:q} --leaves {params.leaves}"
        " --classes {input.classes:q} --split {wildcards.split} --max-per-class {params.max_per_class}"
        " --out {output.dets:q} > {log:q} 2>&1"
