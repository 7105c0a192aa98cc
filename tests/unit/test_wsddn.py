"""The WSDDN branch (stages.models.wsddn): image scores by hand, gradients, losses on hand-worked cases, the
vectorised pseudo-box miner against its slow reference, a toy problem where the pseudo boxes must find the
object, and the joint model against the plain detector."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou, roi_align

from stages.models.detector import build_detector
from stages.models.wsddn import (WSDDNBranch, WSDDNFasterRCNN, box_constraint_loss, image_label_loss,
                                 image_level_targets, mine_pseudo_boxes, mine_pseudo_boxes_reference, rpn_forward,
                                 segment_softmax, set_pseudo_mining)

torch.set_num_threads(1)

TINY = {"backbone": "resnet_small", "width": 8, "fpn_channels": 16, "representation_size": 32, "min_size": 64,
        "max_size": 96, "box_batch_size_per_image": 32, "rpn_post_nms_top_n_train": 64}
VARIANTS = [{}, {"head": "tsd"}, {"cascade": True}, {"cascade": True, "head": "tsd"},
            {"head": "tsd", "decoupled_backbone": True}]
IDS = ["sibling", "tsd", "cascade", "cascade_tsd", "tsd_decoupled_backbone"]


def test_image_scores_are_the_sum_of_products_by_hand():
    br = WSDDNBranch(2, 2)
    with torch.no_grad():
        br.cls_fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        br.cls_fc.bias.zero_()
        br.det_fc.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, -1.0]]))
        br.det_fc.bias.zero_()
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
    index = torch.tensor([0, 0, 0, 1, 1])
    out = br(feats, index, 2)
    # by hand: σcls row-wise over the classes, σdet column-wise over the proposals of one image
    expected = torch.zeros(2, 2)
    for b, rows in ((0, [0, 1, 2]), (1, [3, 4])):
        for c in range(2):
            det_logit = [2.0 * feats[r, 0].item() if c == 0 else -feats[r, 1].item() for r in rows]
            z = sum(math.exp(v) for v in det_logit)
            for r, v in zip(rows, det_logit):
                f = feats[r]
                cls = math.exp(f[c].item()) / (math.exp(f[0].item()) + math.exp(f[1].item()))
                expected[b, c] += cls * math.exp(v) / z
                assert out.region[r, c].item() == pytest.approx(cls * math.exp(v) / z, abs=1e-6)
    assert torch.allclose(out.image, expected, atol=1e-6)
    assert ((out.image >= 0) & (out.image <= 1)).all()
    # σdet sums to 1 per image and class
    assert torch.allclose(torch.zeros(2, 2).index_add(0, index, out.det), torch.ones(2, 2), atol=1e-6)


def test_segment_softmax_is_a_softmax_per_segment_and_survives_large_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 3, generator=g) * 50
    index = torch.tensor([2, 0, 0, 2, 2, 0, 1])
    out = segment_softmax(logits, index, 4)
    assert torch.isfinite(out).all()
    for s in range(3):
        rows = index == s
        assert torch.allclose(out[rows], torch.softmax(logits[rows], 0), atol=1e-6)


def test_gradients_reach_both_streams_and_the_features():
    torch.manual_seed(0)
    br = WSDDNBranch(8, 3)
    feats = torch.randn(10, 8, requires_grad=True)
    index = torch.tensor([0] * 6 + [1] * 4)
    out = br(feats, index, 2)
    loss = image_label_loss(out.image, torch.tensor([[1, 0, -1], [0, 1, 1]], dtype=torch.int8))
    loss.backward()
    for p in (br.cls_fc.weight, br.det_fc.weight, feats):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_image_label_loss_by_hand_and_unknown_labels_ignored():
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.3, 0.6, 0.7]])
    labels = torch.tensor([[1, 0, -1], [-1, -1, 1]], dtype=torch.int8)
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.7)) / 3
    assert image_label_loss(scores, labels).item() == pytest.approx(expected, rel=1e-5)
    moved = scores.clone()
    moved[0, 2], moved[1, 0] = 0.01, 0.99                      # unknown entries change nothing
    assert image_label_loss(moved, labels).item() == pytest.approx(expected, rel=1e-5)
    assert image_label_loss(scores, torch.full((2, 3), -1, dtype=torch.int8)).item() == 0.0


def test_box_constraint_loss_by_hand():
    # image 0: proposals 0 (on the box of class 1), 1 (IoU 0.5 exactly with it), 2 (away); image 1: 3, 4
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [50.0, 50.0, 60.0, 60.0],
                              [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    index = torch.tensor([0, 0, 0, 1, 1])
    det = torch.tensor([[0.1, 0.5], [0.2, 0.3], [0.7, 0.2], [0.6, 0.9], [0.4, 0.1]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [100.0, 100.0, 110.0, 110.0]])
    gt_labels = torch.tensor([1, 0, 0])
    gt_index = torch.tensor([0, 1, 0])   # the last box (class 0 in image 0) overlaps no proposal: no pair
    loss = box_constraint_loss(det, index, proposals, gt, gt_labels, gt_index, 2)
    expected = (-math.log(0.5 + 0.3) - math.log(0.4)) / 2        # (image 0, class 1), (image 1, class 0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert box_constraint_loss(det, index, proposals, gt[:0], gt_labels[:0], gt_index[:0], 2).item() == 0.0


def random_mining_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    b, c = 4, 5
    counts = [int(v) for v in torch.randint(0, 7, (b,), generator=g)]
    index = torch.cat([torch.full((k,), i, dtype=torch.int64) for i, k in enumerate(counts)])
    n = len(index)
    perm = torch.randperm(n, generator=g)           # rows of the images interleaved
    index = index[perm]
    region = torch.randint(0, 6, (n, c), generator=g).float() / 10      # coarse values: ties happen
    proposals = torch.rand(n, 4, generator=g) * 50
    positives = torch.rand(b, c, generator=g) < 0.5
    return region, index, proposals, positives


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("thr", [0.0, 0.25, 0.5])
def test_mining_matches_the_slow_reference(seed, thr):
    region, index, proposals, positives = random_mining_case(seed)
    fast = mine_pseudo_boxes(region, index, proposals, positives, thr=thr)
    slow = mine_pseudo_boxes_reference(region, index, proposals, positives, thr=thr)
    assert torch.equal(fast.image, slow.image) and torch.equal(fast.labels, slow.labels)
    assert torch.equal(fast.boxes, slow.boxes) and torch.equal(fast.scores, slow.scores)


def test_mining_takes_the_first_of_tied_proposals_and_respects_the_threshold():
    region = torch.tensor([[0.2, 0.1], [0.4, 0.1], [0.4, 0.05]])
    proposals = torch.arange(12, dtype=torch.float32).view(3, 4)
    out = mine_pseudo_boxes(region, torch.zeros(3, dtype=torch.int64), proposals, torch.tensor([[True, True]]),
                            thr=0.3)
    assert out.labels.tolist() == [0] and torch.equal(out.boxes, proposals[1:2])   # class 1 (0.1) is below


# ---------- a toy problem: one bright square per image, one class with image-level labels only ----------

def toy_problem(n_images: int = 8, size: int = 48, obj: int = 12, seed: int = 0):
    """Images with a bright square (class 0: red, class 1: green) on dark noise; sliding-window proposals of
    sides 10..24 (stride 3); fixed features: 4x4 RoIAlign of the window and of the window with its context."""
    g = torch.Generator().manual_seed(seed)
    imgs, gts, cls = [], [], []
    for i in range(n_images):
        c = i % 2
        img = torch.rand(3, size, size, generator=g) * 0.2
        x, y = torch.randint(0, size - obj + 1, (2,), generator=g).tolist()
        img[c, y:y + obj, x:x + obj] = 1.0
        imgs.append(img)
        gts.append(torch.tensor([x, y, x + obj, y + obj], dtype=torch.float32))
        cls.append(c)
    windows = [[x, y, x + s, y + s] for s in (10, 12, 16, 20, 24)
               for y in range(0, size - s + 1, 3) for x in range(0, size - s + 1, 3)]
    props = torch.tensor(windows, dtype=torch.float32)
    half = (props[:, 2:] - props[:, :2]) / 2
    context = torch.cat([props[:, :2] - half, props[:, 2:] + half], 1)
    images = torch.stack(imgs)

    def pool(boxes):
        rois = torch.cat([torch.cat([torch.full((len(boxes), 1), float(i)), boxes], 1) for i in range(n_images)])
        return roi_align(images, rois, output_size=4, sampling_ratio=2, aligned=True).flatten(1)

    feats = torch.cat([pool(props), pool(context)], 1)
    index = torch.arange(n_images).repeat_interleave(len(props))
    return feats, index, props.repeat(n_images, 1), gts, cls


def test_toy_pseudo_boxes_land_on_the_object():
    feats, index, proposals, gts, cls = toy_problem()
    n = len(gts)
    labels = torch.zeros(n, 2, dtype=torch.int8)
    labels[torch.arange(n), torch.tensor(cls)] = 1
    boxed = [i for i in range(n) if cls[i] == 0]           # class 0 has boxes, class 1 image-level labels only
    gt_boxes = torch.stack([gts[i] for i in boxed])
    gt_index = torch.tensor(boxed)
    gt_labels = torch.zeros(len(boxed), dtype=torch.int64)
    torch.manual_seed(0)
    br = WSDDNBranch(feats.shape[1], 2)
    opt = torch.optim.Adam(br.parameters(), lr=0.05)
    for _ in range(150):
        out = br(feats, index, n)
        loss = image_label_loss(out.image, labels) + box_constraint_loss(out.det, index, proposals, gt_boxes,
                                                                         gt_labels, gt_index, n)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = br(feats, index, n)
    weak = torch.zeros_like(labels, dtype=torch.bool)
    weak[:, 1] = labels[:, 1] == 1                          # mine the image-level-only class
    mined = mine_pseudo_boxes(out.region, index, proposals, weak, thr=0.2)
    assert mined.image.tolist() == [i for i in range(n) if cls[i] == 1]
    for i, box in zip(mined.image.tolist(), mined.boxes):
        assert box_iou(box[None], gts[i][None]).item() > 0.5, i
    # and the image scores say which class is in which image
    assert ((out.image > 0.5) == (labels == 1)).all()


# ---------- the joint model ----------

def batch(weak: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.rand(3, 64, 80, generator=g) for _ in range(3)]
    tgts = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1]),
             "image_labels": torch.tensor([1, 0, -1], dtype=torch.int8), "box_annotated": torch.tensor(True)},
            {"boxes": torch.tensor([[10.0, 10.0, 50.0, 30.0], [40.0, 30.0, 70.0, 60.0]]),
             "labels": torch.tensor([2, 3]), "image_labels": torch.tensor([-1, -1, -1], dtype=torch.int8),
             "box_annotated": torch.tensor(True)},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "image_labels": torch.tensor([0, -1, 1], dtype=torch.int8), "box_annotated": torch.tensor(not weak)}]
    return imgs, tgts


def test_image_level_targets_add_the_box_classes():
    _, tgts = batch()
    assert image_level_targets(tgts[1], 3).tolist() == [-1, 1, 1]
    assert image_level_targets({"boxes": tgts[0]["boxes"], "labels": tgts[0]["labels"]}, 3).tolist() == [1, -1, -1]


@pytest.mark.parametrize("extra", VARIANTS, ids=IDS)
def test_joint_model_equals_the_plain_detector_on_box_annotated_images(extra):
    torch.manual_seed(0)
    plain = build_detector({**TINY, **extra}, num_classes=3)
    torch.manual_seed(0)
    joint = build_detector({**TINY, **extra, "wsddn": True}, num_classes=3)
    assert isinstance(joint, WSDDNFasterRCNN) and not isinstance(plain, WSDDNFasterRCNN)
    ps, js = plain.state_dict(), joint.state_dict()
    assert set(js) - set(ps) == {"wsddn.cls_fc.weight", "wsddn.cls_fc.bias", "wsddn.det_fc.weight",
                                 "wsddn.det_fc.bias"}
    assert all(torch.equal(ps[k], js[k]) for k in ps)      # the same detector for the same seed
    imgs, tgts = batch(weak=False)
    plain.train()
    joint.train()
    torch.manual_seed(3)
    pl = plain(imgs, [{"boxes": t["boxes"], "labels": t["labels"]} for t in tgts])
    torch.manual_seed(3)
    jl = joint(imgs, tgts)
    assert set(jl) - set(pl) == {"loss_wsddn", "loss_wsddn_box"}
    for k, v in pl.items():
        assert torch.equal(v, jl[k]), k
    # eval: the branch plays no part in detection
    plain.eval()
    joint.eval()
    with torch.no_grad():
        for a, b in zip(plain(imgs), joint(imgs)):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_rpn_forward_equals_torchvision_with_every_image_annotated():
    model = build_detector({**TINY, "wsddn": True}, num_classes=3).train()
    imgs, tgts = batch(weak=False)
    images, targets = model.transform(imgs, tgts)
    feats = model.backbone(images.tensors)
    torch.manual_seed(1)
    props, losses = model.rpn(images, feats, targets)
    torch.manual_seed(1)
    props2, losses2 = rpn_forward(model.rpn, images, feats, targets, [True] * 3)
    assert all(torch.equal(a, b) for a, b in zip(props, props2))
    assert all(torch.equal(losses[k], losses2[k]) for k in losses)
    # no annotated image: zero losses that still reach the RPN head (nothing unused)
    _, zero = rpn_forward(model.rpn, images, feats, targets, [False] * 3)
    assert all(v.item() == 0.0 and v.requires_grad for v in zero.values())


@pytest.mark.parametrize("extra", VARIANTS, ids=IDS)
def test_an_image_level_only_image_moves_no_detector_loss_before_mining(extra):
    """The weak image's content changes the branch's loss but none of the RPN / box losses (frozen BN: no batch
    statistics shared between images); with mining on, its pseudo boxes add the *_pseudo losses."""
    cfg = {**TINY, **extra, "wsddn": True, "norm": "frozen_bn", "pseudo_thr": 0.0}
    model = build_detector(cfg, num_classes=3).train()
    imgs, tgts = batch()
    other = [imgs[0], imgs[1], torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(9))]
    torch.manual_seed(0)
    a = model(imgs, tgts)
    torch.manual_seed(0)
    b = model(other, tgts)
    for k in a:
        if k == "loss_wsddn":
            assert not torch.equal(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k
    assert not any(k.endswith("_pseudo") for k in a)
    set_pseudo_mining(model, True)
    losses = model(imgs, tgts)
    pseudo = [k for k in losses if k.endswith("_pseudo")]
    assert pseudo and all(torch.isfinite(losses[k]) for k in pseudo)
    sum(losses.values()).backward()
    assert model.wsddn.cls_fc.weight.grad.abs().sum() > 0 and model.wsddn.det_fc.weight.grad.abs().sum() > 0
