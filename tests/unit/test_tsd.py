import math

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from stages.models.tsd import TSDRoIHeads, TSDSettings, deformable_roi_pool, pool_rois, translated_roi_pool
from tests.unit.detector_fixtures import NUM_CLASSES, tiny_batch, tiny_faster_rcnn

LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_classifier_sibling", "loss_box_reg_sibling",
             "loss_margin_cls", "loss_margin_reg", "loss_objectness", "loss_rpn_box_reg"}


def _rois():
    return torch.tensor([[0, 3.0, 5.0, 20.0, 17.0], [1, 10.5, 2.0, 40.0, 30.0], [0, 8.0, 8.0, 12.0, 28.0]])


@pytest.mark.parametrize("method", ["grid", "bins"])
def test_zero_offsets_equal_roi_align(method):
    torch.manual_seed(0)
    feat = torch.randn(2, 4, 16, 16)
    rois = _rois()
    levels = torch.zeros(3, dtype=torch.int64)
    out = deformable_roi_pool([feat], [0.25], levels, rois, torch.zeros(3, 7, 7, 2), output_size=7,
                              sampling_ratio=2, method=method)
    ref = roi_align(feat, rois, output_size=7, spatial_scale=0.25, sampling_ratio=2)
    assert out.shape == (3, 4, 7, 7)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("method", ["grid", "bins"])
def test_constant_offset_equals_translated_roi_and_per_bin_offset_moves_one_bin(method):
    torch.manual_seed(0)
    feat = torch.randn(2, 4, 16, 16)
    rois = _rois()
    levels = torch.zeros(3, dtype=torch.int64)
    shift = torch.tensor([3.0, -2.0])
    out = deformable_roi_pool([feat], [0.25], levels, rois, shift.expand(3, 7, 7, 2).clone(), output_size=7,
                              method=method)
    moved = rois.clone()
    moved[:, 1:] += shift.repeat(2)
    assert torch.allclose(out, roi_align(feat, moved, 7, 0.25, 2), atol=1e-5)
    off = torch.zeros(3, 7, 7, 2)
    off[0, 2, 3] = torch.tensor([5.0, 5.0])
    out2 = deformable_roi_pool([feat], [0.25], levels, rois, off, output_size=7, method=method)
    base = roi_align(feat, rois, 7, 0.25, 2)
    changed = (out2 - base).abs().amax(1) > 1e-4
    assert changed[0, 2, 3] and changed.sum() == 1


def test_multi_level_uses_the_level_mapper():
    torch.manual_seed(0)
    feats = {"0": torch.randn(1, 4, 64, 64), "1": torch.randn(1, 4, 32, 32)}
    pool = MultiScaleRoIAlign(["0", "1"], 7, 2, canonical_scale=32, canonical_level=3)
    boxes = [torch.tensor([[2.0, 2.0, 20.0, 20.0], [10.0, 10.0, 120.0, 100.0]])]
    ref = pool(feats, boxes, [(256, 256)])
    levels = pool.map_levels(boxes)
    assert levels.tolist() == [0, 1]
    rois = torch.cat([torch.zeros(2, 1), boxes[0]], 1)
    out = deformable_roi_pool(list(feats.values()), pool.scales, levels, rois, torch.zeros(2, 7, 7, 2),
                              output_size=7)
    assert torch.allclose(out, ref, atol=1e-5)


def _two_level_case():
    """Two maps (strides 4 and 8) and five RoIs over both batch images: tiny, wide, partly outside the map."""
    torch.manual_seed(0)
    feats = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    rois = torch.tensor([[0, 3.0, 5.0, 20.0, 17.0], [1, 10.5, 2.0, 40.0, 30.0], [0, 8.0, 8.0, 9.5, 9.0],
                         [1, 0.0, 0.0, 6.0, 60.0], [0, 50.0, 50.0, 64.0, 64.0]])
    return feats, rois, torch.tensor([0, 1, 0, 1, 0])


def test_grid_and_bins_agree_on_random_offsets_tiny_rois_and_outside_samples():
    feats, rois, levels = _two_level_case()
    offsets = torch.randn(5, 7, 7, 2) * 6.0  # some samples land beyond the map, some within 1 px of it
    grid = deformable_roi_pool(feats, [0.25, 0.125], levels, rois, offsets, output_size=7, method="grid")
    bins = deformable_roi_pool(feats, [0.25, 0.125], levels, rois, offsets, output_size=7, method="bins")
    assert torch.allclose(grid, bins, atol=1e-5)
    offsets.requires_grad_(True)
    out = deformable_roi_pool(feats, [0.25, 0.125], levels, rois, offsets, output_size=7)  # auto -> grid
    out.square().sum().backward()
    assert offsets.grad.abs().sum() > 0


def _tsd_model(**kw):
    model = tiny_faster_rcnn()
    model.roi_heads = TSDRoIHeads.from_roi_heads(model.roi_heads, num_classes=NUM_CLASSES,
                                                 tsd=TSDSettings(offset_hidden=32, **kw))
    return model


def test_train_mode_losses_and_gradient_flow():
    model = _tsd_model()
    assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES
    model.train()
    images, targets = tiny_batch()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    rh = model.roi_heads
    dec = rh.decoupled
    for name, p in [("offset_cls", dec.offset_cls[-1].weight), ("offset_reg", dec.offset_reg[-1].weight),
                    ("cls_score", dec.cls_score.weight), ("bbox_pred", dec.bbox_pred.weight),
                    ("sibling", rh.box_predictor.cls_score.weight),
                    ("backbone", model.backbone.fpn.inner_blocks[0][0].weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_margin_losses_do_not_reach_the_sibling_head():
    model = _tsd_model(margin_cls=0.5, margin_reg=0.5)
    model.train()
    losses = model(*tiny_batch())
    assert losses["loss_margin_cls"] > 0
    (losses["loss_margin_cls"] + losses["loss_margin_reg"]).backward()
    rh = model.roi_heads
    for p in list(rh.box_head.parameters()) + list(rh.box_predictor.parameters()):
        assert p.grad is None or p.grad.abs().sum() == 0
    assert rh.decoupled.cls_score.weight.grad.abs().sum() > 0


def test_two_sgd_iterations_stay_finite():
    model = _tsd_model()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images, targets = tiny_batch()
    for _ in range(2):
        losses = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()


def test_eval_outputs_and_sibling_not_run():
    model = _tsd_model()
    model.eval()
    calls = []
    model.roi_heads.box_head.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model(tiny_batch()[0])
    assert not calls
    assert len(out) == 2
    for det in out:
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].shape == (n,)
        assert n > 0 and det["labels"].min() >= 1 and det["labels"].max() < NUM_CLASSES


def _direct_heads(expert_mode=False, **tsd):
    torch.manual_seed(0)
    pool = MultiScaleRoIAlign(["0"], 7, 2)
    heads = TSDRoIHeads(pool, in_channels=4, num_classes=3, representation_size=16, score_thresh=0.0,
                        nms_thresh=1.0, tsd=TSDSettings(offset_hidden=8, **tsd), expert_mode=expert_mode)
    heads.eval()
    feats = {"0": torch.randn(1, 4, 16, 16)}
    proposals = [torch.tensor([[8.0, 8.0, 28.0, 48.0], [30.0, 10.0, 50.0, 20.0]])]
    return heads, feats, proposals


def test_regression_is_relative_to_the_translated_proposal():
    heads, feats, proposals = _direct_heads(gamma=0.1)
    with torch.no_grad():
        heads.decoupled.offset_reg[-1].bias.copy_(torch.tensor([1.0, -2.0]))  # ΔR = 0.1 * (1, -2) * (w, h)
        heads.decoupled.bbox_pred.weight.zero_()
        heads.decoupled.bbox_pred.bias.zero_()
        heads.decoupled.cls_score.weight.zero_()
        heads.decoupled.cls_score.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    (det,), losses = heads(feats, proposals, [(64, 64)])
    assert losses == {}
    p = proposals[0]
    w, h = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    expected = p + torch.stack([0.1 * w, -0.2 * h, 0.1 * w, -0.2 * h], 1)
    got = det["boxes"][det["labels"] == 1]
    assert got.shape == (2, 4)
    assert torch.allclose(got[got[:, 0].argsort()], expected[expected[:, 0].argsort()], atol=1e-4)


def test_expert_mode_drops_background_rois_before_regression():
    heads, feats, proposals = _direct_heads(expert_mode=True)
    calls = []
    heads.decoupled.reg_head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        heads.decoupled.cls_score.weight.zero_()
        heads.decoupled.cls_score.bias.copy_(torch.tensor([3.0, 0.0, 0.0]))  # background wins everywhere
        (det,), _ = heads(feats, proposals, [(64, 64)])
        assert det["boxes"].shape == (0, 4) and calls == [0]
        heads.expert_mode = False
        (det,), _ = heads(feats, proposals, [(64, 64)])
        assert det["boxes"].shape[0] == 4 and calls[-1] == 2  # 2 RoIs x 2 foreground classes
        heads.expert_mode = True
        heads.decoupled.cls_score.bias.copy_(torch.tensor([0.0, math.log(4.0), 0.0]))
        heads(feats, proposals, [(64, 64)])
        assert calls[-1] == 2


def test_bad_configuration_rejected():
    with pytest.raises(ValueError):
        TSDRoIHeads(MultiScaleRoIAlign(["0"], (7, 5), 2), in_channels=4, num_classes=3)
    with pytest.raises(ValueError):
        TSDRoIHeads(MultiScaleRoIAlign(["0"], 7, 2), in_channels=4, num_classes=1)


def test_box_regression_loss_matches_torchvision():
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    from stages.models.tsd import box_regression_loss

    torch.manual_seed(0)
    logits, deltas, targets = torch.randn(6, 3), torch.randn(6, 12), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 2, 0, 1])
    _, ref = fastrcnn_loss(logits, deltas, [labels], [targets])
    assert torch.allclose(box_regression_loss(deltas, targets, labels), ref)
    agnostic = box_regression_loss(deltas[:, :4], targets, labels)
    pos = labels > 0
    ref_agn = torch.nn.functional.smooth_l1_loss(deltas[pos, :4], targets[pos], beta=1 / 9, reduction="sum") / 6
    assert torch.allclose(agnostic, ref_agn)


def test_bf16_autocast_trains_and_returns_fp32_boxes():
    model = _tsd_model()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(*tiny_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tiny_batch()[0])
    assert all(d["boxes"].dtype == torch.float32 and len(d["boxes"]) > 0 for d in out)


def test_translated_roi_pool_equals_constant_offset_pooling_on_every_level():
    feats, rois, levels = _two_level_case()
    shift = torch.randn(5, 2) * 4.0
    ref = deformable_roi_pool(feats, [0.25, 0.125], levels, rois, shift[:, None, None].expand(5, 7, 7, 2),
                              output_size=7, method="bins")
    moved = rois.clone()
    moved[:, 1:] += shift.repeat(1, 2)
    out = translated_roi_pool(feats, [0.25, 0.125], levels, moved, output_size=7)
    assert out.shape == (5, 3, 7, 7)
    assert torch.allclose(out, ref, atol=1e-5)
    assert translated_roi_pool(feats, [0.25, 0.125], levels[:0], moved[:0], output_size=7).shape == (0, 3, 7, 7)


def test_eval_regression_pooling_matches_the_differentiable_path():
    heads, feats, proposals = _direct_heads()
    with torch.no_grad():
        heads.decoupled.offset_reg[-1].bias.copy_(torch.tensor([0.7, -0.4]))
    pooled = pool_rois(heads.box_roi_pool, feats, proposals, [(64, 64)])
    with torch.no_grad():
        fast, rois_fast = heads.decoupled.regress(pooled)
    slow, rois_slow = heads.decoupled.regress(pooled)  # grad enabled: grid sampling
    assert torch.allclose(rois_fast, rois_slow) and torch.allclose(fast, slow, atol=1e-5)
