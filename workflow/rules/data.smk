# Data: generate (built-in dataset) -> ingest + checks -> split -> sampling weights.

# the plain-background images' list (issue 15): a file the generator writes when it draws such images; OpenImages
# has none (a configured file that exists is read)
_plain = raw("plain_list_csv") if config["dataset"]["plain_list_csv"] else None
PLAIN_LIST = (
    _plain
    if _plain and (config["dataset"]["plain_images"] if config["dataset"]["generate"] else os.path.exists(_plain))
    else []
)


if config["dataset"]["generate"]:

    rule generate:
        output:
            boxes=raw("boxes_csv"),
            labels=raw("labels_csv"),
            classes=raw("classes_csv"),
            hierarchy=raw("hierarchy_json"),
            masks=raw("masks_csv"),
            # the segmentable classes and their hierarchy (every class but Frame)
            seg_classes=raw("seg_classes_csv"),
            seg_hierarchy=raw("seg_hierarchy_json"),
            test_list=raw("test_list_csv") if config["dataset"]["test_list_csv"] else f"{DATA}/test-images.csv",
            # the external COCO-format dataset (stages.ingest coco reads it), when dataset.external_images > 0
            external=f"{DATA}/external/instances.json" if config["dataset"]["external_images"] else [],
            external_label_map=f"{DATA}/external/label_map.csv" if config["dataset"]["external_images"] else [],
            plain=PLAIN_LIST,
        log:
            "logs/generate.log",
        benchmark:
            "benchmarks/generate/generate.tsv"
        params:
            out=lambda wc, output: os.path.dirname(output.boxes),
            n_images=config["dataset"]["n_images"],
            n_test=config["dataset"]["n_test"],
            min_size=config["dataset"]["min_size"],
            max_size=config["dataset"]["max_size"],
            seed=config["dataset"]["seed"],
            difficulty=config["dataset"]["difficulty"],
            external_images=config["dataset"]["external_images"],
            # the weak-label material (issue 15): image-level-only and plain-background images, the planted
            # confusing pair, group-of clusters with instance masks (all off: the files of the run before them)
            weak=(
                f"--image-level-images {config['dataset']['image_level_images']}"
                f" --plain-images {config['dataset']['plain_images']}"
                + (" --confusing-pair" if config["dataset"]["confusing_pair"] else "")
                + (" --group-of-masks" if config["dataset"]["group_of_masks"] else "")
            ),
        conda:
            ENV
        shell:
            "python -m stages.generate --out {params.out:q} --n-images {params.n_images} --n-test {params.n_test}"
            " --min-size {params.min_size} --max-size {params.max_size} --seed {params.seed}"
            " --difficulty {params.difficulty} --external-images {params.external_images} {params.weak}"
            " > {log:q} 2>&1"


rule ingest:
    input:
        boxes=raw("boxes_csv"),
        labels=raw("labels_csv"),
        classes=raw("classes_csv"),
        hierarchy=raw("hierarchy_json"),
        test_list=raw("test_list_csv") if config["dataset"]["test_list_csv"] else [],
        sample_submission=raw("sample_submission_csv") if config["dataset"]["sample_submission_csv"] else [],
        plain=PLAIN_LIST,
    output:
        boxes="results/ingest/boxes.parquet",
        image_labels="results/ingest/image_labels.parquet",
        images="results/ingest/images.parquet",
        test_images="results/ingest/test_images.parquet",
        classes="results/ingest/classes.parquet",
        hierarchy="results/ingest/hierarchy.parquet",
        summary="results/ingest/summary.json",
    log:
        "logs/ingest.log",
    params:
        images=lambda wc, input: os.path.join(os.path.dirname(input.boxes), config["dataset"]["images_dir"]),
        test=lambda wc, input: os.path.join(os.path.dirname(input.boxes), config["dataset"]["test_dir"]),
        out=lambda wc, output: os.path.dirname(output.boxes),
        # the test images: the listed ones, else the sample submission's, else every image in the test folder
        test_list=lambda wc, input: option("--test-list", input.test_list),
        sample_submission=lambda wc, input: option("--sample-submission", input.sample_submission),
        image_check=config["dataset"]["image_check"],
        image_level_only=config["dataset"]["image_level_only"],
        plain=lambda wc, input: option("--plain-list", input.plain),
    threads: RES["ingest"]["threads"]
    resources:
        mem_mb=rule_mem("ingest"),
        runtime=rule_runtime("ingest"),
    conda:
        ENV
    shell:
        "python -m stages.ingest --boxes-csv {input.boxes:q} --labels-csv {input.labels:q}"
        " --classes-csv {input.classes:q} --hierarchy-json {input.hierarchy:q} --images-dir {params.images:q}"
        " --test-dir {params.test:q} {params.test_list} {params.sample_submission}"
        " --image-level-only {params.image_level_only} {params.plain}"
        " --image-check {params.image_check} --workers {threads} --out-dir {params.out:q} > {log:q} 2>&1"


rule ingest_external:
    """An external dataset in COCO format through its label map (paper 7.3): the tables an expert of it trains
    on, and the classes it contributes (targets.json, in the mined-set format)."""
    input:
        instances=lambda wc: external_path(wc.ext, "instances"),
        label_map=lambda wc: external_path(wc.ext, "label_map"),
        classes=raw("classes_csv"),
    output:
        boxes="results/ingest_external/{ext}/boxes.parquet",
        images="results/ingest_external/{ext}/images.parquet",
        classes="results/ingest_external/{ext}/classes.parquet",
        targets="results/ingest_external/{ext}/targets.json",
        summary="results/ingest_external/{ext}/summary.json",
    log:
        "logs/ingest_external/{ext}.log",
    params:
        images=lambda wc: external_path(wc.ext, "images_dir"),
        image_check=lambda wc: EXTERNAL[wc.ext]["image_check"],
        missing=lambda wc: EXTERNAL[wc.ext]["missing_images"],
        out=lambda wc, output: os.path.dirname(output.boxes),
    threads: RES["ingest"]["threads"]
    resources:
        mem_mb=rule_mem("ingest"),
        runtime=rule_runtime("ingest"),
    conda:
        ENV
    shell:
        "python -m stages.ingest coco --instances {input.instances:q} --images-dir {params.images:q}"
        " --label-map {input.label_map:q} --classes-csv {input.classes:q} --image-check {params.image_check}"
        " --missing-images {params.missing} --workers {threads} --out-dir {params.out:q} > {log:q} 2>&1"


rule split:
    input:
        images=rules.ingest.output.images,
        boxes=rules.ingest.output.boxes,
    output:
        splits="results/split/splits.parquet",
        report="results/split/report.json",
    log:
        "logs/split.log",
    params:
        fractions=" ".join(str(f) for f in config["split"]["fractions"]),
        seed=config["split"]["seed"],
        iters=config["split"]["mining_iters"],
    threads: RES["split"]["threads"]
    resources:
        mem_mb=rule_mem("split"),
        runtime=rule_runtime("split"),
    conda:
        ENV
    shell:
        "python -m stages.split --images {input.images:q} --boxes {input.boxes:q} --fractions {params.fractions}"
        " --seed {params.seed} --mining-iters {params.iters} --out {output.splits:q}"
        " --report {output.report:q} > {log:q} 2>&1"


rule sample:
    input:
        boxes=rules.ingest.output.boxes,
        splits=rules.split.output.splits,
    output:
        weights="results/sample/{method}.parquet",
    log:
        "logs/sample/{method}.log",
    wildcard_constraints:
        method="class_aware|uniform",
    # every detector's training waits for its sampling draw: before anything else that is ready
    priority: 20
    threads: RES["sample"]["threads"]
    resources:
        mem_mb=rule_mem("sample"),
        runtime=rule_runtime("sample"),
    conda:
        ENV
    shell:
        "python -m stages.sample --boxes {input.boxes:q} --splits {input.splits:q} --method {wildcards.method}"
        " --out {output.weights:q} > {log:q} 2>&1"

