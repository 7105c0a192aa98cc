# Anchors by k-means (per model: its image size and scales), the class subset of each expert model (mined
# from its base model), and one trained detector per entry of config["models"] (the per-model fan-out).


rule anchors:
    input:
        images=rules.ingest.output.images,
        boxes=rules.ingest.output.boxes,
        splits=rules.split.output.splits,
    output:
        anchors="results/anchors/{model}.json",
    log:
        "logs/anchors/{model}.log",
    params:
        k=lambda wc: model_cfg(wc.model)["anchor_k"],
        scales=lambda wc: " ".join(str(s) for s in model_cfg(wc.model)["anchor_scales"]),
        min_size=lambda wc: model_cfg(wc.model)["min_size"],
        max_size=lambda wc: model_cfg(wc.model)["max_size"],
        seed=lambda wc: model_cfg(wc.model)["seed"],
    threads: RES["anchors"]["threads"]
    resources:
        mem_mb=rule_mem("anchors"),
        runtime=rule_runtime("anchors"),
    conda:
        ENV
    shell:
        "python -m stages.anchors --boxes {input.boxes:q} --images {input.images:q} --splits {input.splits:q}"
        " --split train --k {params.k} --scales {params.scales} --min-size {params.min_size}"
        " --max-size {params.max_size} --seed {params.seed} --out {output.anchors:q} > {log:q} 2>&1"


rule experts:
    input:
        model=lambda wc: expand(rules.train.output.model, model=expert_base(wc.model)),
        # the base model's per-class AP on val_a (after post-processing)
        metrics=lambda wc: model_metrics(expert_base(wc.model), "val_a"),
        hierarchy=rules.ingest.output.hierarchy,
        classes=rules.ingest.output.classes,
        # expert_confusion: matrix reads the base model's post-processed val_a detections and the ground truth
        confusion=expert_confusion_inputs,
    output:
        experts="results/experts/{model}.json",
    log:
        "logs/experts/{model}.log",
    params:
        n_lowest=lambda wc: model_cfg(wc.model)["expert_n_lowest"],
        confusion=lambda wc: model_cfg(wc.model)["expert_confusion"],
        sim_thr=lambda wc: model_cfg(wc.model)["expert_sim_thr"],
        matrix=lambda wc, input: (
            f"--detections {shlex.quote(input.confusion[0])} --boxes {shlex.quote(input.confusion[1])}"
            f" --splits {shlex.quote(input.confusion[2])} --split val_a"
            f" --confusion-thr {model_cfg(wc.model)['expert_confusion_thr']}"
            f" --confusion-score-thr {model_cfg(wc.model)['expert_confusion_score_thr']}"
            if input.confusion
            else ""
        ),
    priority: expert_first
    conda:
        ENV
    shell:
        "python -m stages.experts --model {input.model:q} --metrics {input.metrics:q}"
        " --hierarchy {input.hierarchy:q} --classes {input.classes:q} --n-lowest {params.n_lowest}"
        " --confusion {params.confusion} --sim-thr {params.sim_thr} {params.matrix}"
        " --out {output.experts:q} > {log:q} 2>&1"


rule train:
    input:
        # images, boxes, splits and sampling weights: the dataset's train split, or an external dataset
        unpack(training_tables),
        # the k-means anchors file when the model asks for it (none otherwise)
        anchors=lambda wc: (
            expand(rules.anchors.output.anchors, model=wc.model)
            if model_cfg(wc.model)["anchors"] == "kmeans"
            else []
        ),
        # expert models: the class subset mined from the base model (none otherwise)
        classes=expert_classes,
        # init_from: the checkpoint this model starts from
        init=init_weights,
        # confusing_groups may name classes by their display names
        class_names=lambda wc: rules.ingest.output.classes if model_cfg(wc.model)["confusing_groups"] else [],
    output:
        model="results/train/{model}/model.pt",
    log:
        "logs/train/{model}.log",
    benchmark:
        "benchmarks/train/{model}.tsv"
    params:
        # only the keys training reads (x-reads: train); resources never are parameters
        cfg=train_json,
        ckpt=lambda wc: f"results/train/{wc.model}/ckpt",
        metrics=lambda wc: f"results/train/{wc.model}/metrics.jsonl",
        device=config["device"],
        anchors=lambda wc, input: f"--anchors {input.anchors}" if input.anchors else "",
        classes=lambda wc, input: option("--classes", input.classes),
        class_names=lambda wc, input: option("--class-names", input.class_names),
        image_labels=lambda wc, input: option("--image-labels", input.get("image_labels", [])),
        splits=lambda wc, input: option("--splits", input.get("splits", [])),
        sampling=lambda wc, input: option("--sampling", input.get("sampling", [])),
    priority: expert_first
    threads: lambda wc: model_cfg(wc.model)["threads"]
    retries: 1
    resources:
        # a retry (the job was likely killed for memory or time) asks for twice as much
        mem_mb=lambda wc, attempt: model_cfg(wc.model)["mem_mb"] * attempt,
        runtime=lambda wc, attempt: model_cfg(wc.model)["runtime_min"] * attempt,
        gpu=lambda wc: model_cfg(wc.model)["gpus"],
        gpu_model=lambda wc: model_cfg(wc.model)["gpu_model"] or "",
        cpus_per_gpu=lambda wc: model_cfg(wc.model)["cpus_per_gpu"] if model_cfg(wc.model)["gpus"] else 0,
        nodes=lambda wc: model_cfg(wc.model)["nodes"],
        tasks=lambda wc: model_cfg(wc.model)["nodes"],
        # DataLoader processes per training process (a resource: the result does not depend on it)
        workers=lambda wc: model_cfg(wc.model)["workers"],
    conda:
        ENV
    shell:
        # python, torchrun or srun + torchrun, from the resources (stages/core/launch.py)
        "python -m stages.core.launch {resources.gpu} {resources.nodes} -m stages.train --config {params.cfg:q}"
        " --images {input.images:q} --boxes {input.boxes:q} {params.splits}"
        " {params.sampling} {params.anchors} {params.classes} {params.class_names} {params.image_labels}"
        " --device {params.device} --threads {threads} --workers {resources.workers}"
        " --ckpt-dir {params.ckpt:q} --metrics {params.metrics:q}"
        " --out {output.model:q} > {log:q} 2>&1"


rule card:
    """The model card (stages.card): backbone, parameters, FLOPs at the training size, the images/s measured
    while training, epochs, averaging, data, val_a / val_b mAP; the report collects them."""
    input:
        model=rules.train.output.model,
        val=lambda wc: model_metrics(wc.model, VAL_SPLITS),
    output:
        card="results/train/{model}/card.json",
    log:
        "logs/card/{model}.log",
    params:
        cfg=card_json,
    threads: RES["card"]["threads"]
    resources:
        mem_mb=rule_mem("card"),
        runtime=rule_runtime("card"),
    conda:
        ENV
    shell:
        "python -m stages.card --model {wildcards.model} --config {params.cfg:q} --ckpt {input.model:q}"
        " --eval-val-a {input.val[0]:q} --eval-val-b {input.val[1]:q} --threads {threads}"
        " --out {output.card:q} > {log:q} 2>&1"
