import math

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from stages.models.cascade import CascadeRoIHeads
from stages.models.tsd import TSDSettings
from tests.unit.detector_fixtures import NUM_CLASSES, tiny_batch, tiny_faster_rcnn


def _cascade_model(**kw):
    model = tiny_faster_rcnn()
    model.roi_heads = CascadeRoIHeads.from_roi_heads(model.roi_heads, num_classes=NUM_CLASSES,
                                                     in_channels=model.backbone.out_channels,
                                                     representation_size=64, **kw)
    return model


def test_defaults_are_the_papers_modified_cascade():
    rh = _cascade_model().roi_heads
    assert rh.stage_iou_thresholds == [0.5, 0.5, 0.6, 0.7]
    assert rh.stage_loss_weights == [0.75, 1.0, 0.25, 0.25]
    assert [m.high_threshold for m in rh._matchers] == [0.5, 0.5, 0.6, 0.7]
    assert [c.weights for c in rh._coders][2] == (20.0, 20.0, 10.0, 10.0)
    with rh._stage(3):
        assert rh.proposal_matcher.high_threshold == 0.7
    assert rh.proposal_matcher.high_threshold == 0.5


def test_train_losses_finite_and_every_stage_learns():
    model = _cascade_model()
    model.train()
    losses = model(*tiny_batch())
    expected = {f"loss_{k}_s{t}" for t in range(4) for k in ("classifier", "box_reg")}
    assert expected <= set(losses) and len(losses) == 10
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for t in range(4):
        assert model.roi_heads.box_predictor[t].cls_score.weight.grad.abs().sum() > 0
        assert model.roi_heads.box_head[t].fc6.weight.grad.abs().sum() > 0


def test_stage_loss_weighting():
    model = _cascade_model(stage_loss_weights=(0.75, 1.0, 0.25, 0.0))
    model.train()
    batch = tiny_batch()
    torch.manual_seed(5)
    weighted = model(*batch)
    model.roi_heads.stage_loss_weights = [1.0, 1.0, 1.0, 1.0]
    torch.manual_seed(5)
    plain = model(*batch)
    for t, w in enumerate((0.75, 1.0, 0.25, 0.0)):
        for k in ("classifier", "box_reg"):
            assert torch.allclose(weighted[f"loss_{k}_s{t}"], w * plain[f"loss_{k}_s{t}"])
    assert plain["loss_classifier_s3"] > 0
    sum(weighted.values()).backward()
    # a zero-weight stage receives no gradient
    assert model.roi_heads.box_predictor[3].cls_score.weight.grad.abs().sum() == 0
    assert model.roi_heads.box_predictor[2].cls_score.weight.grad.abs().sum() > 0


def _direct(stages=2):
    torch.manual_seed(0)
    heads = CascadeRoIHeads(MultiScaleRoIAlign(["0"], 7, 2), in_channels=4, num_classes=3, representation_size=8,
                            stage_iou_thresholds=(0.5, 0.6)[:stages], stage_loss_weights=(1.0, 1.0)[:stages],
                            score_thresh=0.0, nms_thresh=1.0)
    heads.eval()
    with torch.no_grad():
        for p in heads.box_predictor:
            p.cls_score.weight.zero_()
            p.cls_score.bias.zero_()
            p.bbox_pred.weight.zero_()
            p.bbox_pred.bias.zero_()
    feats = {"0": torch.randn(1, 4, 16, 16)}
    proposals = [torch.tensor([[8.0, 8.0, 28.0, 48.0]])]
    return heads, feats, proposals


def test_test_score_is_the_mean_of_stage_scores_on_final_boxes():
    heads, feats, proposals = _direct()
    with torch.no_grad():
        heads.box_predictor[0].cls_score.bias.copy_(torch.tensor([0.0, math.log(3.0), 0.0]))  # 0.2, 0.6, 0.2
    (det,), losses = heads(feats, proposals, [(64, 64)])
    assert losses == {}
    by_label = dict(zip(det["labels"].tolist(), det["scores"].tolist()))
    assert by_label[1] == pytest.approx((0.6 + 1 / 3) / 2, abs=1e-5)
    assert by_label[2] == pytest.approx((0.2 + 1 / 3) / 2, abs=1e-5)
    assert torch.allclose(det["boxes"], proposals[0].expand(2, 4))


def test_boxes_are_refined_stage_by_stage():
    heads, feats, proposals = _direct()
    with torch.no_grad():
        heads.box_predictor[0].bbox_pred.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # dx/10 -> +0.1 w
        heads.box_predictor[1].bbox_pred.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))  # dx/20 -> +0.1 w
    (det,), _ = heads(feats, proposals, [(64, 64)])
    expected = proposals[0] + torch.tensor([4.0, 0.0, 4.0, 0.0])  # w = 20, shifted 2 + 2
    assert torch.allclose(det["boxes"], expected.expand(2, 4), atol=1e-4)


def test_tiny_model_eval_outputs():
    model = _cascade_model()
    model.eval()
    with torch.no_grad():
        out = model(tiny_batch()[0])
    assert len(out) == 2
    for det in out:
        n = det["boxes"].shape[0]
        assert n > 0 and det["scores"].shape == (n,) and det["labels"].shape == (n,)
        assert (det["scores"] <= 1).all() and det["labels"].min() >= 1


def test_bad_configuration_rejected():
    pool = MultiScaleRoIAlign(["0"], 7, 2)
    with pytest.raises(ValueError, match="weights"):
        CascadeRoIHeads(pool, in_channels=4, num_classes=3, stage_iou_thresholds=(0.5, 0.6),
                        stage_loss_weights=(1.0,))
    with pytest.raises(ValueError):
        CascadeRoIHeads(pool, in_channels=4, num_classes=3, stage_iou_thresholds=(1.5,), stage_loss_weights=(1,))


def test_decoupled_cascade_trains_and_detects():
    model = _cascade_model(decoupled=TSDSettings(offset_hidden=16), stage_iou_thresholds=(0.5, 0.6),
                           stage_loss_weights=(1.0, 0.5))
    model.train()
    torch.manual_seed(1)
    losses = model(*tiny_batch())
    keys = {f"loss_{k}_s{t}" for t in range(2) for k in ("classifier", "box_reg", "classifier_sibling",
                                                          "box_reg_sibling", "margin_cls", "margin_reg")}
    assert keys <= set(losses) and len(losses) == len(keys) + 2
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    rh = model.roi_heads
    for t in range(2):
        assert rh.decoupled[t].offset_cls[-1].weight.grad.abs().sum() > 0
        assert rh.decoupled[t].bbox_pred.weight.grad.abs().sum() > 0
        assert rh.box_predictor[t].cls_score.weight.grad.abs().sum() > 0  # sibling trained by its own losses
    model.eval()
    calls = []
    rh.box_head[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model(tiny_batch()[0])
    assert not calls  # siblings do not run at test time
    assert len(out) == 2 and all(d["boxes"].shape[1] == 4 for d in out)


def test_decoupled_cascade_mean_score_and_expert_mode():
    torch.manual_seed(0)
    heads = CascadeRoIHeads(MultiScaleRoIAlign(["0"], 7, 2), in_channels=4, num_classes=3, representation_size=8,
                            stage_iou_thresholds=(0.5, 0.6), stage_loss_weights=(1.0, 1.0), score_thresh=0.0,
                            nms_thresh=1.0, decoupled=TSDSettings(offset_hidden=8))
    heads.eval()
    with torch.no_grad():
        for h in heads.decoupled:
            h.cls_score.weight.zero_()
            h.bbox_pred.weight.zero_()
            h.bbox_pred.bias.zero_()
        heads.decoupled[0].cls_score.bias.copy_(torch.tensor([0.0, math.log(3.0), 0.0]))
        heads.decoupled[1].cls_score.bias.zero_()
    feats = {"0": torch.randn(1, 4, 16, 16)}
    proposals = [torch.tensor([[8.0, 8.0, 28.0, 48.0]])]
    with torch.no_grad():
        (det,), _ = heads(feats, proposals, [(64, 64)])
        by_label = dict(zip(det["labels"].tolist(), det["scores"].tolist()))
        assert by_label[1] == pytest.approx((0.6 + 1 / 3) / 2, abs=1e-5)
        assert torch.allclose(det["boxes"], proposals[0].expand(2, 4), atol=1e-4)
        heads.expert_mode = True
        for h in heads.decoupled:
            h.cls_score.bias.copy_(torch.tensor([2.0, 0.0, 0.0]))
        (det,), _ = heads(feats, proposals, [(64, 64)])
    assert det["boxes"].shape == (0, 4)
