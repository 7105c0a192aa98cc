"""Training and inference throughput (images/s) of whole detectors built by ``build_detector``, on random
images with random boxes, every figure measured in one run against a baseline measured in the same run.

CPU (default): the models of configs/default.yaml (or --config) at their own training size, a few iterations
each; the ratio column is against the first model (the plain sibling-head baseline).

    python benchmarks/train_infer.py                       # CPU, default-config models
    python benchmarks/train_infer.py --device cuda --quick # GPU: R50-FPN + TSD at 800 px, fp32 vs AMP+CL,
                                                           # against torchvision fasterrcnn_resnet50_fpn fp32
    python benchmarks/train_infer.py --detector-cost       # CPU: whole-detector eval cost, TSD vs sibling head
    python benchmarks/train_infer.py --loader              # CPU: the training loop, 0 vs 2 DataLoader workers
    python benchmarks/train_infer.py --loader --device cuda   # the same with the SGD steps on a GPU
    python benchmarks/train_infer.py --backbones seresnext101_32x4d efficientnet_b3 timm:resnet18
                                                           # CPU: backbones side by side vs resnet50
    python benchmarks/train_infer.py --wsddn               # CPU: joint WSDDN model vs the plain detector

``--backbones NAME ...`` builds the same small Faster R-CNN (--fpn-channels FPN, sibling head, frozen_bn,
trainable_layers 3, random weights) on torchvision resnet50 (the first row, the baseline of the ratio columns)
and on each named backbone (any ``backbone`` value of the config schema: the timm zoo, ``timm:<name>``), and
prints training and inference images/s at --backbone-size px, --batch-size (default 2) images, --iters
iterations after one warm-up.

``--detector-cost`` builds ResNet-50-FPN with the sibling head and with TSD (same backbone, random init, eval,
--size px images, 1000 post-NMS proposals, --classes classes), times inference per image best-of --repeats in
the same run and prints ms/image, the ratio TSD/sibling for the whole detector and the RoI heads' share of it
(the issue's "DH head costing <= 25% over the sibling head", measured on the whole detector rather than on the
head alone as benchmarks/roi_heads.py does).

``--loader`` runs the real training path of ``stages.train`` (the epoch plan's batch sampler, JPEG decoding,
augmentation, SGD steps of the first --models entry, default frcnn_small) on a dataset written by
``stages.generate`` at the built-in size (--loader-images images, 256-320 px) and ingested, once with the
decoding and augmentation in the training process (workers=0) and once in --workers DataLoader processes, the
same iterations after the same warm-up; it alternates the two --repeats times (the load of a shared machine
drifts) and prints training images/s and the ratio, for ``augment: basic`` and ``augment: elaborate``, plus
the images/s of the data path alone (no step) as the share it could hide. The SGD steps run on ``--device``
(``cuda``: on a GPU, where the data path is a larger share of a step than on this CPU).

``--wsddn`` times training steps of each --models entry (default frcnn_small) and of the same model with
``wsddn: true`` side by side: same seed, same images, the batch's last round(image_level_share x batch) images
image-level-only for the joint model (boxes removed, image-level labels: the box classes present plus two
verified-absent classes) with pseudo-box mining on at pseudo_thr 0 (a pseudo box for every positive class, so
the second RoI-head pass always runs: the costliest case), the others with their image-level labels; the two are
alternated --wsddn-repeats times (best of each) and the ratio joint / plain is printed (issue 15's target:
>= 0.8x). Both are timed on this process's CPU time (time.process_time), which other jobs on a shared machine do
not inflate: images per CPU second, the same as images/s on one otherwise idle thread.

On CUDA the rows are: torchvision ``fasterrcnn_resnet50_fpn`` (eager, fp32: the baseline), our R50-FPN with the
sibling head and with TSD, each fp32 and AMP + channels-last. The issue's targets: TSD AMP+CL inference >= 2x
the baseline, and TSD <= 1.25x the cost of the sibling head at the same precision.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.core.config import load_config, validate_config  # noqa: E402
from stages.models.detector import build_detector  # noqa: E402

NUM_CLASSES = 20


def batch(n: int, height: int, width: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, height, width, generator=g).to(device))
        k = 4
        xy = torch.rand(k, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        wh = (torch.rand(k, 2, generator=g) * 0.3 + 0.05) * torch.tensor([width, height])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, NUM_CLASSES + 1, (k,), generator=g).to(device)})
    return images, targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], *, iters: int, warmup: int, device: torch.device,
          clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of ``fn`` (after ``warmup`` calls) on ``clock`` (wall time by default)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t = clock()
    for _ in range(iters):
        fn()
    _sync(device)
    return (clock() - t) / iters


def throughput(model: torch.nn.Module, *, images, targets, device: torch.device, amp: bool, iters: int,
               warmup: int, train: bool, clock: Callable[[], float] = time.perf_counter) -> float:
    """Images/s of training steps (forward + backward + SGD step) or of inference."""
    dtype = torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
    if train:
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

        def step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = sum(model(images, targets).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        @torch.inference_mode()
        def step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                model(images)
    return len(images) / timed(step, iters=iters, warmup=warmup, device=device, clock=clock)


def cpu_rows(models: dict[str, dict], *, iters: int, batch_size: int) -> list[tuple]:
    device = torch.device("cpu")
    rows = []
    for name, cfg in models.items():
        torch.manual_seed(0)
        model = build_detector(cfg, num_classes=NUM_CLASSES)
        h, w = cfg["min_size"], cfg["max_size"]
        images, targets = batch(batch_size, h, w, device)
        tr = throughput(model, images=images, targets=targets, device=device, amp=False, iters=iters, warmup=1,
                        train=True)
        inf = throughput(model, images=images, targets=targets, device=device, amp=False, iters=iters,
                         warmup=1, train=False)
        rows.append((name, f"{h}x{w}", tr, inf))
        print(f"  {name:28s} {h}x{w}  train {tr:7.2f} img/s  infer {inf:7.2f} img/s", flush=True)
    return rows


def backbone_configs(names: list[str], *, size: int, fpn_channels: int) -> dict[str, dict]:
    """One small detector config per backbone, torchvision resnet50 first (the baseline row)."""
    names = ["resnet50"] + [n for n in names if n != "resnet50"]
    out = {}
    for name in names:
        model = {"backbone": name, "fpn_channels": fpn_channels, "representation_size": 256, "min_size": size,
                 "max_size": size, "norm": "frozen_bn", "trainable_layers": 3}
        out[name] = validate_config({"models": {"m": model}}, cross_refs=False)["models"]["m"]
    return out


def r50_rows(*, device: torch.device, size: int, iters: int, batch_size: int) -> list[tuple]:
    """The R50-FPN comparison (meant for CUDA; ``--r50`` runs it on the CPU too, e.g. at a small --size)."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    h, w = size, int(size * 4 / 3)
    images, targets = batch(batch_size, h, w, device)
    r50 = {"backbone": "resnet50", "fpn_channels": 256, "norm": "frozen_bn", "trainable_layers": 3,
           "min_size": size, "max_size": int(size * 1333 / 800), "representation_size": 1024}
    variants: list[tuple[str, Callable[[], torch.nn.Module], bool, bool]] = [
        ("torchvision frcnn R50-FPN fp32", lambda: fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1, min_size=size,
            max_size=int(size * 1333 / 800)), False, False),
        ("R50-FPN sibling fp32", lambda: build_detector(r50, num_classes=NUM_CLASSES), False, False),
        ("R50-FPN sibling AMP+CL", lambda: build_detector(r50, num_classes=NUM_CLASSES), True, True),
        ("R50-FPN TSD fp32", lambda: build_detector({**r50, "head": "tsd"}, num_classes=NUM_CLASSES), False,
         False),
        ("R50-FPN TSD AMP+CL", lambda: build_detector({**r50, "head": "tsd"}, num_classes=NUM_CLASSES), True,
         True),
    ]
    rows = []
    for name, make, amp, cl in variants:
        torch.manual_seed(0)
        model = make().to(device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        tr = throughput(model, images=images, targets=targets, device=device, amp=amp, iters=iters, warmup=2,
                        train=True)
        inf = throughput(model, images=images, targets=targets, device=device, amp=amp, iters=iters, warmup=2,
                         train=False)
        rows.append((name, f"{h}x{w}", tr, inf))
        print(f"  {name:32s} train {tr:7.2f} img/s  infer {inf:7.2f} img/s", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def detector_cost(*, device: torch.device, size: int, classes: int, proposals: int, repeats: int,
                  warmup: int, decoupled: bool = False) -> dict[str, dict[str, float]]:
    """Eval time per image (best of ``repeats``) of R50-FPN with the sibling head and with TSD, the same backbone
    weights in both, and the time spent in the RoI heads (a forward pre-hook/hook pair around ``roi_heads``).
    ``decoupled`` adds TSD with the decoupled backbone (its shared part and regression branch get the same
    weights; the classification copies start from them too)."""
    h, w = size, int(size * 4 / 3)
    images, _ = batch(1, h, w, device)
    r50 = {"backbone": "resnet50", "fpn_channels": 256, "norm": "frozen_bn", "trainable_layers": 3,
           "min_size": size, "max_size": int(size * 1333 / 800), "representation_size": 1024}
    backbone_state = None
    out: dict[str, dict[str, float]] = {}
    variants = [("sibling", {"head": "sibling"}), ("TSD", {"head": "tsd"})]
    if decoupled:
        variants.append(("TSD+DB", {"head": "tsd", "decoupled_backbone": True}))
    for name, extra in variants:
        torch.manual_seed(0)
        model = build_detector({**r50, **extra}, num_classes=classes).to(device).eval()
        if backbone_state is None:
            backbone_state = model.backbone.state_dict()
        else:
            model.backbone.load_state_dict(backbone_state, strict=not extra.get("decoupled_backbone"))
        model.rpn._pre_nms_top_n["testing"] = proposals
        model.rpn._post_nms_top_n["testing"] = proposals
        marks: dict[str, float] = {}
        n_props: list[int] = []

        def pre(_m, args, marks=marks, n_props=n_props):
            _sync(device)
            n_props.append(sum(len(p) for p in args[1]))
            marks["start"] = time.perf_counter()

        def post(_m, _args, _out, marks=marks):
            _sync(device)
            marks["head"] = time.perf_counter() - marks["start"]

        model.roi_heads.register_forward_pre_hook(pre)
        model.roi_heads.register_forward_hook(post)
        best, best_head = float("inf"), float("inf")
        with torch.inference_mode():
            for i in range(warmup + repeats):
                _sync(device)
                t = time.perf_counter()
                model(images)
                _sync(device)
                t = time.perf_counter() - t
                if i >= warmup:
                    best, best_head = min(best, t), min(best_head, marks["head"])
        out[name] = {"total": best, "head": best_head, "proposals": n_props[-1]}
        print(f"  R50-FPN {name:8s} {h}x{w}  {1000 * best:9.1f} ms/image  RoI heads {1000 * best_head:8.1f} ms "
              f"({100 * best_head / best:4.1f}%), {n_props[-1]} proposals", flush=True)
        del model
    return out


def loader_dataset(root: Path, *, n_images: int, seed: int = 0):
    """A dataset as the built-in config makes it (stages.generate at 256-320 px, then ingest): (images, boxes,
    class-aware sampling weights)."""
    from stages import generate as gen
    from stages.ingest import ingest
    from stages.sample import sampling_weights

    gen.generate(out_dir=root, n_train_images=n_images, n_test_images=0, image_size=(256, 320), seed=seed)
    t = ingest(boxes_csv=root / gen.BBOX_CSV, labels_csv=root / gen.LABELS_CSV,
               classes_csv=root / gen.CLASSES_CSV, hierarchy_json=root / gen.HIERARCHY_JSON,
               images_dir=root / gen.IMAGES_DIR)
    weights = sampling_weights(boxes=t.boxes, image_ids=t.images["image_id"], method="class_aware")
    return t.images, t.boxes, weights


def loader_throughput(cfg: dict, *, images, boxes, weights, workers: int, iters: int, warmup: int,
                      step_model: bool = True, device: str = "cpu") -> float:
    """Training images/s of ``iters`` iterations (after ``warmup``) of the stages.train loop with ``workers``
    DataLoader processes, the SGD steps on ``device``; ``step_model=False``: the data path alone (batches
    drawn, decoded, augmented)."""
    from stages import train

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tcfg = train.model_part(cfg, "train")
    labels = sorted(boxes.loc[boxes["image_id"].isin(images["image_id"]), "label"].unique())
    data = train.training_data(cfg=tcfg, images=images, boxes=boxes, weights=weights, labels=labels,
                               iters=warmup + iters)
    trainer = train.build(tcfg, num_classes=len(labels), anchors=None, device=device)
    trainer.model.train()
    loader = data.loader(workers=workers)
    data.sampler.set_epoch(0)
    t = 0.0
    for k, (imgs, tgts) in enumerate(loader):
        if k == warmup:
            sync()
            t = time.perf_counter()
        if step_model:
            imgs, tgts = train.to_device(imgs, tgts, device)
            train.step(trainer, imgs, tgts, lr=train.lr_at(k, 0, tcfg), clip_grad_norm=tcfg["clip_grad_norm"],
                       world=1, where=f"iteration {k + 1}")
    sync()
    dt = time.perf_counter() - t
    del loader
    return iters * tcfg["batch_size"] / dt


def loader_report(cfg: dict, *, name: str, n_images: int, workers: int, iters: int, warmup: int,
                  repeats: int, device: str = "cpu") -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        images, boxes, weights = loader_dataset(Path(tmp) / "data", n_images=n_images)
        print(f"dataset: {len(images)} images, {len(boxes)} boxes (generated + ingested in "
              f"{time.perf_counter() - t0:.1f} s); model {name}, batch {cfg['batch_size']}, "
              f"{cfg['min_size']}-{cfg['max_size']} px, {iters} timed iterations after {warmup}", flush=True)
        print(f"\n{'augment':10s} {'repeat':>6s} {'data path alone':>16s} {'workers=0':>10s} "
              f"{f'workers={workers}':>10s} {'x':>6s}   (images/s)")
        for augment in ("basic", "elaborate"):
            c = {**cfg, "augment": augment}
            ratios, bounds = [], []
            for r in range(repeats):
                kw = {"images": images, "boxes": boxes, "weights": weights, "iters": iters, "warmup": warmup,
                      "device": device}
                alone = loader_throughput(c, workers=0, step_model=False, **kw)
                base = loader_throughput(c, workers=0, **kw)
                par = loader_throughput(c, workers=workers, **kw)
                ratios.append(par / base)
                bounds.append(1 / max(1 - base / alone, 1e-9))
                print(f"{augment:10s} {r + 1:6d} {alone:16.1f} {base:10.2f} {par:10.2f} {par / base:6.2f}",
                      flush=True)
            print(f"{augment:10s} median workers={workers} / workers=0: {statistics.median(ratios):.2f}x (issue "
                  f"target >= 1.3x on CPU with 2 workers); hiding the whole data path could give at most "
                  f"{statistics.median(bounds):.2f}x here")


def weak_batch(images, targets, *, share: float, seed: int = 0):
    """The joint model's targets for ``targets``: image-level labels on every image (box classes present, two
    other classes verified absent), the last round(share x batch) images image-level-only (no boxes)."""
    g = torch.Generator().manual_seed(seed)
    w = round(share * len(targets))
    out = []
    for k, t in enumerate(targets):
        labels = torch.full((NUM_CLASSES,), -1, dtype=torch.int8)
        absent = torch.randperm(NUM_CLASSES, generator=g)[:2]
        labels[absent] = 0
        labels[t["labels"] - 1] = 1
        weak = k >= len(targets) - w
        out.append({"boxes": t["boxes"][:0] if weak else t["boxes"],
                    "labels": t["labels"][:0] if weak else t["labels"],
                    "image_labels": labels, "box_annotated": torch.tensor(not weak)})
    return images, out


def wsddn_rows(models: dict[str, dict], *, iters: int, batch_size: int, repeats: int) -> list[tuple]:
    """Training images per CPU second of this process (``time.process_time``: other jobs on a shared machine do
    not count) of each model and of its joint WSDDN version, alternated ``repeats`` times (best of each)."""
    from stages.models.wsddn import set_pseudo_mining

    device = torch.device("cpu")
    rows = []
    for name, cfg in models.items():
        h, w = cfg["min_size"], cfg["max_size"]
        images, targets = batch(batch_size, h, w, device)
        joint_cfg = {**cfg, "wsddn": True, "pseudo_thr": 0.0}   # a pseudo box for every positive class
        _, weak_targets = weak_batch(images, targets, share=float(joint_cfg.get("image_level_share", 0.25)))
        n_weak = sum(not bool(t["box_annotated"]) for t in weak_targets)
        torch.manual_seed(0)
        plain = build_detector(cfg, num_classes=NUM_CLASSES)
        torch.manual_seed(0)
        joint = build_detector(joint_cfg, num_classes=NUM_CLASSES)
        set_pseudo_mining(joint, True)
        best = {"plain": 0.0, "joint": 0.0}
        for r in range(repeats):
            for key, model, tg in (("plain", plain, targets), ("joint", joint, weak_targets)):
                torch.manual_seed(r)
                ips = throughput(model, images=images, targets=tg, device=device, amp=False, iters=iters,
                                 warmup=1, train=True, clock=time.process_time)
                best[key] = max(best[key], ips)
                label = name + (" + wsddn" if key == "joint" else "")
                print(f"  repeat {r + 1} {label:36s} train {ips:7.2f} img/s", flush=True)
        rows.append((name, f"{h}x{w}", best["plain"], best["joint"], n_weak))
    return rows


def report(rows: list[tuple], title: str) -> None:
    base_tr, base_inf = rows[0][2], rows[0][3]
    print(f"\n{title} (ratios vs the first row, measured in this run)")
    print(f"{'model':34s} {'size':>9s} {'train img/s':>12s} {'x':>6s} {'infer img/s':>12s} {'x':>6s}")
    for name, size, tr, inf in rows:
        print(f"{name:34s} {size:>9s} {tr:12.2f} {tr / base_tr:6.2f} {inf:12.2f} {inf / base_inf:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml"))
    ap.add_argument("--models", nargs="*", help="model names from --config (default: all)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per figure")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--size", type=int, default=800, help="CUDA: shorter image side")
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--r50", action="store_true", help="run the R50-FPN comparison (the CUDA default) on this "
                    "device")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--detector-cost", action="store_true",
                    help="whole-detector eval cost of TSD vs the sibling head (R50-FPN, --size px)")
    ap.add_argument("--classes", type=int, default=500, help="--detector-cost: foreground classes")
    ap.add_argument("--proposals", type=int, default=1000, help="--detector-cost: post-NMS proposals at test")
    ap.add_argument("--repeats", type=int, default=2, help="--detector-cost: timed repeats (best of)")
    ap.add_argument("--warmup", type=int, default=1, help="--detector-cost: warm-up runs")
    ap.add_argument("--decoupled-backbone", action="store_true",
                    help="--detector-cost: also time TSD with the decoupled backbone")
    ap.add_argument("--loader", action="store_true",
                    help="CPU: the stages.train loop with 0 vs --workers DataLoader workers, built-in-style data")
    ap.add_argument("--workers", type=int, default=2, help="--loader: DataLoader workers against 0")
    ap.add_argument("--loader-images", type=int, default=64, help="--loader: generated images")
    ap.add_argument("--loader-repeats", type=int, default=2, help="--loader: alternations of the two loops")
    ap.add_argument("--backbones", nargs="+", help="CPU: these backbones side by side against resnet50 (the first "
                    "row) in one small detector")
    ap.add_argument("--backbone-size", type=int, default=320, help="--backbones: image side (px)")
    ap.add_argument("--fpn-channels", type=int, default=64, help="--backbones: FPN channels")
    ap.add_argument("--json", type=Path, help="CUDA / --r50: write the rows and the two goal ratios as JSON")
    ap.add_argument("--wsddn", action="store_true",
                    help="CPU: training images/s of the joint WSDDN model beside the plain detector (--models)")
    ap.add_argument("--wsddn-repeats", type=int, default=3, help="--wsddn: alternations of the two models")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if a.detector_cost:
        dev = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
        print(f"device: {dev} (torch {torch.__version__}); {a.classes} classes, {a.proposals} proposals, "
              f"best of {a.repeats} after {a.warmup} warm-up")
        res = detector_cost(device=torch.device(device), size=a.size, classes=a.classes, proposals=a.proposals,
                            repeats=a.repeats, warmup=a.warmup, decoupled=a.decoupled_backbone)
        sib, tsd = res["sibling"], res["TSD"]
        print(f"\nwhole detector TSD/sibling: {tsd['total'] / sib['total']:.3f}x (goal <= 1.25x); "
              f"RoI heads alone TSD/sibling: {tsd['head'] / sib['head']:.2f}x; "
              f"RoI-head share of the time: sibling {100 * sib['head'] / sib['total']:.1f}%, "
              f"TSD {100 * tsd['head'] / tsd['total']:.1f}%")
        if "TSD+DB" in res:
            print(f"TSD + decoupled backbone / sibling: {res['TSD+DB']['total'] / sib['total']:.3f}x")
        return
    if a.loader:
        cfg = load_config(a.config)
        name = (a.models or list(cfg["models"]))[0]
        model = validate_config({"models": {name: cfg["models"][name]}}, cross_refs=False)["models"][name]
        if a.batch_size:
            model["batch_size"] = a.batch_size
        dev = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
        print(f"device: {dev} for the SGD steps ({torch.get_num_threads()} thread(s) in the training process, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__})")
        loader_report(model, name=name, n_images=a.loader_images, workers=a.workers, iters=a.iters or 12,
                      warmup=2, repeats=a.loader_repeats, device=device)
        return
    if a.backbones:
        print(f"device: cpu ({torch.get_num_threads()} thread(s), torch {torch.__version__})")
        models = backbone_configs(a.backbones, size=a.backbone_size, fpn_channels=a.fpn_channels)
        iters = a.iters or (1 if a.quick else 3)
        bs = a.batch_size or 2
        rows = cpu_rows(models, iters=iters, batch_size=bs)
        report(rows, f"CPU, backbones at {a.backbone_size} px, FPN {a.fpn_channels}, batch {bs}, {iters} "
                     "iteration(s), frozen_bn, trainable_layers 3")
        return
    if a.wsddn:
        cfg = load_config(a.config)
        names = a.models or ["frcnn_small"]
        models = {n: validate_config({"models": {n: cfg["models"][n]}}, cross_refs=False)["models"][n]
                  for n in names}
        bs = a.batch_size or 4
        iters = a.iters or 3
        print(f"device: cpu ({torch.get_num_threads()} thread(s), torch {torch.__version__}); batch {bs}, "
              f"{iters} timed iterations after 1, best of {a.wsddn_repeats}")
        rows = wsddn_rows(models, iters=iters, batch_size=bs, repeats=a.wsddn_repeats)
        print(f"\n(images per CPU second)\n{'model':24s} {'size':>9s} {'plain img/s':>12s} {'+wsddn img/s':>13s} "
              f"{'x':>6s}  image-level-only")
        for name, size, base, joint, n_weak in rows:
            print(f"{name:24s} {size:>9s} {base:12.2f} {joint:13.2f} {joint / base:6.2f}  {n_weak}/{bs} per batch")
        print("issue 15 target: joint / plain >= 0.8x on CPU")
        return
    if device == "cuda" or a.r50:
        if device == "cuda":
            torch.backends.cudnn.benchmark = True
            print(f"device: {torch.cuda.get_device_name(0)} (torch {torch.__version__})")
        else:
            print(f"device: cpu ({torch.get_num_threads()} thread(s), torch {torch.__version__})")
        iters = a.iters or (5 if a.quick else 20)
        bs = a.batch_size or 4
        rows = r50_rows(device=torch.device(device), size=a.size, iters=iters, batch_size=bs)
        report(rows, f"{device}, {a.size} px, batch {bs}, {iters} iterations")
        tsd_amp, base, sib_amp = rows[4][3], rows[0][3], rows[2][3]
        print(f"\nTSD AMP+CL inference vs torchvision fp32: {tsd_amp / base:.2f}x (goal >= 2x); "
              f"TSD cost over sibling (AMP+CL): {sib_amp / tsd_amp:.2f}x (goal <= 1.25x)")
        if a.json:
            import json

            a.json.write_text(json.dumps({
                "device": device, "size": a.size, "batch": bs, "iters": iters,
                "rows": [{"name": n, "size": sz, "train_img_s": tr, "infer_img_s": inf} for n, sz, tr, inf in rows],
                "tsd_amp_vs_torchvision_infer": tsd_amp / base, "tsd_cost_over_sibling_amp": sib_amp / tsd_amp},
                indent=1))
        return
    print(f"device: cpu ({torch.get_num_threads()} thread(s), torch {torch.__version__})")
    cfg = load_config(a.config)
    names = a.models or list(cfg["models"])
    models = {n: validate_config({"models": {n: cfg["models"][n]}}, cross_refs=False)["models"][n] for n in names}
    iters = a.iters or (1 if a.quick else 3)
    rows = cpu_rows(models, iters=iters, batch_size=a.batch_size or 2)
    report(rows, f"CPU, batch {a.batch_size or 2}, {iters} iteration(s)")


if __name__ == "__main__":
    main()
