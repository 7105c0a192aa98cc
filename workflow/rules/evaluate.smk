# The OpenImages Challenge metric on val_a and val_b of every gathered post-processing and (naive or auto) ensemble
# output (any variant), and the tables that collect them.


rule evaluate:
    input:
        dets=rules.gather.output.dets,
        boxes=rules.ingest.output.boxes,
        labels=rules.ingest.output.image_labels,
        hierarchy=rules.ingest.output.hierarchy,
        classes=rules.ingest.output.classes,
        splits=rules.split.output.splits,
        # an expert model is scored on the classes it was trained on only (the others are left out, not AP 0)
        only=lambda wc: (expert_file(wc.name) or []) if wc.stage == "postprocess" and wc.name in MODELS else [],
    output:
        json="results/evaluate/{stage}/{variant}/{name}/{split}.json",
    log:
        "logs/evaluate/{stage}/{variant}/{name}/{split}.log",
    benchmark:
        "benchmarks/evaluate/{stage}/{variant}/{name}/{split}.tsv"
    wildcard_constraints:
        name=r"[^/]+",
        split=one_of(VAL_SPLITS),
    params:
        only=lambda wc, input: option("--only-classes", input.only),
    priority: expert_first
    threads: RES["evaluate"]["threads"]
    resources:
        mem_mb=rule_mem("evaluate"),
        runtime=rule_runtime("evaluate"),
    conda:
        ENV
    shell:
        "python -m stages.evaluate --boxes {input.boxes:q} --image-labels {input.labels:q}"
        " --hierarchy {input.hierarchy:q} --classes {input.classes:q} --predictions {input.dets:q}"
        " --split-ids {input.splits:q} --split {wildcards.split} {params.only} --out {output.json:q} > {log:q} 2>&1"


rule metrics_table:
    input:
        models=model_metrics(MODELS, VAL_SPLITS),
        ensembles=expand(
            rules.evaluate.output.json, stage="ensemble", variant="default", name=ENSEMBLE_GROUPS, split=VAL_SPLITS
        ),
        auto=auto_metrics(),
        masks=expand(SEG_METRICS, split=VAL_SPLITS) if SEG_ON else [],
    output:
        json="results/metrics.json",
        md="results/metrics.md",
    log:
        "logs/metrics_table.log",
    conda:
        ENV
    shell:
        "python -m stages.report --metrics {input.models:q} {input.ensembles:q} {input.auto:q} {input.masks:q} --out-json {output.json:q}"
        " --out-md {output.md:q} > {log:q} 2>&1"


rule ablation_table:
    input:
        metrics=ablation_metrics,
        # the ensemble table also tells how each auto-ensemble search went
        trees=lambda wc: expand(rules.autoensemble_search.output.scores, search=SEARCHES) if wc.kind == "ensemble" else [],
        # the model table also gives the mean AP of the tail classes (the third with the fewest training boxes)
        tail=lambda wc: [rules.ingest.output.boxes, rules.split.output.splits] if wc.kind == "models" else [],
    output:
        json="results/ablation/{kind}.json",
        md="results/ablation/{kind}.md",
    log:
        "logs/ablation_table/{kind}.log",
    params:
        tail=lambda wc, input: (f"--tail-boxes {shlex.quote(input.tail[0])} --tail-splits {shlex.quote(input.tail[1])}"
                                if input.tail else ""),
        # the classes of the ladder's confusing groups (paper 5.9): their AP with and without mixing
        show=lambda wc: (
            option("--show-classes", sorted({c for m in config["ablation"]["models"]
                                             for g in model_cfg(m)["confusing_groups"] for c in g}))
            if wc.kind == "models" else ""
        ),
    wildcard_constraints:
        kind="|".join(ABLATIONS),
    conda:
        ENV
    shell:
        "python -m stages.report --metrics {input.metrics:q} --autoensemble {input.trees:q} {params.tail} {params.show}"
        " --out-json {output.json:q} --out-md {output.md:q} > {log:q} 2>&1"


if EXPERTS and config["ablation"]["experts_baseline"]:

    rule experts_table:
        """The experts' target classes: AP of the base model, the expert, and the ensemble group without
        (ablation.experts_baseline) and with them (ablation.group)."""
        input:
            experts=[expert_file(m) for m in EXPERTS],
            base=[f for m in MINED for f in model_metrics(expert_base(m), VAL_SPLITS)],
            expert=model_metrics(EXPERTS, VAL_SPLITS),
            before=expand(rules.evaluate.output.json, stage="ensemble", variant="default",
                          name=config["ablation"]["experts_baseline"], split=VAL_SPLITS),
            after=expand(rules.evaluate.output.json, stage="ensemble", variant="default",
                         name=config["ablation"]["group"], split=VAL_SPLITS),
        output:
            json="results/ablation/experts.json",
            md="results/ablation/experts.md",
        log:
            "logs/ablation_table/experts.log",
        params:
            names=EXPERTS,
            # an expert of an external dataset has no base model
            no_base=" ".join("-" for m in FOREIGN for s in VAL_SPLITS),
        conda:
            ENV
        shell:
            "python -m stages.expert_gain --experts {input.experts:q} --names {params.names}"
            " --base {input.base:q} {params.no_base} --expert {input.expert:q} --before {input.before:q} --after {input.after:q}"
            " --out-json {output.json:q} --out-md {output.md:q} > {log:q} 2>&1"
