"""The tiny DAG configuration: a few images, one short epoch per model, every track of the pipeline switched on.
tests/workflow/test_dag.py runs it end to end; benchmarks/gpu.sh runs it with device cpu and cuda."""

from __future__ import annotations

import yaml

TINY = {
    "dataset": {"n_images": 30, "n_test": 4, "min_size": 128, "max_size": 160, "seed": 1, "external_images": 4},
    "split": {"fractions": [0.6, 0.2, 0.2], "mining_iters": 100},
    "models": {
        m: {"backbone": "resnet_small", "width": 8, "fpn_channels": 16, "sampling": s, "epochs": 1,
            "lr_steps": [1], "iters_per_epoch": 2, "batch_size": 2, "warmup_iters": 1, "min_size": 128,
            "max_size": 160, "test_scales": [128]}
        for m, s in (("tiny_a", "class_aware"), ("tiny_b", "uniform"))
    },
    "infer": {"shards": 2},
    "autoensemble": {"max_candidates": 24, "node_trials": 4},
}
TINY["models"]["tiny_a"]["test_flip"] = True   # auto-ensemble leaves: tiny_a@128, tiny_a@128flip, tiny_b@128


def tiny_with_experts() -> dict:
    """TINY plus an expert mined from tiny_a and an expert of the generator's external COCO-format dataset, both
    in the naive group `all` (`global` without them); the auto ensemble keeps TINY's leaves."""
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    base = {k: v for k, v in cfg["models"]["tiny_a"].items() if k != "test_flip"}
    cfg["models"]["tiny_x"] = {**base, "expert": True, "expert_of": "tiny_a", "expert_n_lowest": 2}
    cfg["models"]["tiny_e"] = {**base, "train_data": "ext", "sampling": "uniform"}
    cfg["external"] = {"ext": {"instances": "external/instances.json", "images_dir": "external/images",
                               "label_map": "external/label_map.csv"}}
    cfg["ensemble"] = {"groups": {"global": ["tiny_a", "tiny_b"], "all": ["tiny_a", "tiny_b", "tiny_x", "tiny_e"]}}
    cfg["autoensemble"]["leaves"] = {"models": ["tiny_a", "tiny_b"]}
    cfg["ablation"] = {"models": ["tiny_a", "tiny_b"], "experts_baseline": "global"}
    # the segmentation track: two tiny HRNets (one with a flipped view) on the refined boxes of tiny_a's refiner
    mask = {"train_scales": [32, 32], "test_scale": 32, "epochs": 1, "batch_size": 4, "warmup_iters": 1,
            "head_channels": 8}
    cfg["segmentation"] = {"enabled": True, "top_n": 5, "map_size": 8,
                           "models": {"m_a": {**mask, "test_flip": True}, "m_b": {**mask, "seed": 1}}}
    cfg["refiner"] = {"detector": "tiny_a", "epochs": 1, "batch_size": 2, "warmup_iters": 1,
                      "representation_size": 32, "det_rpn_top_n": 20}
    # the weak labels (issue 15): image-level-only and plain images, the confusing pair, group-of masks; two
    # variants fine-tuned from tiny_a (WSDDN + plain boxes; mask-derived boxes + class mixing) in the model table
    cfg["dataset"].update({"image_level_images": 6, "plain_images": 2, "confusing_pair": True,
                           "group_of_masks": True})
    ft = {**base, "init_from": "tiny_a", "lr_steps": []}
    cfg["models"]["tiny_w"] = {**ft, "wsddn": True, "plain_box": True, "pseudo_thr": 0.0, "image_level_share": 0.5}
    cfg["models"]["tiny_m"] = {**ft, "mask_boxes": True, "confusing_groups": [["Digit one", "Digit seven"]]}
    cfg["ablation"]["models"] = ["tiny_a", "tiny_b", "tiny_w", "tiny_m"]
    return cfg
