import math

import pytest
import torch

from stages.models.losses import margin_cls_loss, margin_reg_loss, paired_iou, true_class_probability


def test_true_class_probability_hand_values():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(9.0), 0.0]])
    p = true_class_probability(logits, torch.tensor([1, 1]))
    assert torch.allclose(p, torch.tensor([0.75, 0.1]))


def test_margin_cls_loss_hand_computed():
    # row 0: S = 0.5, S_o = 0.75, m = 0.2 -> 0.45; row 1: S = 0.9, S_o = 0.5 -> 0 (clamped);
    # row 2: S = 0.5, S_o = 0.9, m clipped to 1 - 0.9 = 0.1 -> 0.5
    logits = torch.tensor([[0.0, 0.0], [math.log(9.0), 0.0], [0.0, 0.0]])
    sibling = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [math.log(9.0), 0.0]])
    labels = torch.tensor([1, 0, 0])
    loss = margin_cls_loss(logits, sibling, labels, margin=0.2)
    assert loss.item() == pytest.approx((0.45 + 0.0 + 0.5) / 3, abs=1e-6)
    assert margin_cls_loss(logits, sibling, labels, margin=0.0).item() == pytest.approx((0.25 + 0 + 0.4) / 3,
                                                                                         abs=1e-6)


def test_margin_reg_loss_hand_computed():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(3, 1)
    sibling = torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 9.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 8.0], [0.0, 0.0, 10.0, 4.0], [0.0, 0.0, 10.0, 6.0]])
    assert torch.allclose(paired_iou(boxes, gt), torch.tensor([0.8, 0.4, 0.6]))
    # 0.5-0.8+0.2 < 0 -> 0 ; 0.5-0.4+0.2 = 0.3 ; margin clipped to 0.1: 0.9-0.6+0.1 = 0.4
    loss = margin_reg_loss(boxes, sibling, gt, margin=0.2)
    assert loss.item() == pytest.approx((0.0 + 0.3 + 0.4) / 3, abs=1e-6)


def test_margin_losses_do_not_reach_sibling_head():
    torch.manual_seed(0)
    feats = torch.randn(8, 5)
    decoupled = torch.nn.Linear(5, 3)
    sibling = torch.nn.Linear(5, 3)
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 1, 1])
    loss = margin_cls_loss(decoupled(feats), sibling(feats), labels, margin=0.5)
    assert loss.item() > 0
    loss.backward()
    assert sibling.weight.grad is None and sibling.bias.grad is None
    assert decoupled.weight.grad is not None and decoupled.weight.grad.abs().sum() > 0

    reg_d = torch.nn.Linear(5, 4)
    reg_s = torch.nn.Linear(5, 4)
    base = torch.tensor([0.0, 0.0, 10.0, 10.0])
    gt = base.repeat(8, 1)
    loss_r = margin_reg_loss(base + reg_d(feats), base + reg_s(feats), gt, margin=0.5)
    assert loss_r.item() > 0
    loss_r.backward()
    assert reg_s.weight.grad is None
    assert reg_d.weight.grad.abs().sum() > 0


def test_margin_cls_gradient_sign_raises_true_class():
    logits = torch.zeros(1, 2, requires_grad=True)
    sibling = torch.tensor([[0.0, 1.0]])
    margin_cls_loss(logits, sibling, torch.tensor([1])).backward()
    # descending the loss must raise the true-class logit relative to the other
    assert logits.grad[0, 1] < 0 < logits.grad[0, 0]


def test_empty_inputs_give_zero_and_bad_margin_rejected():
    z = torch.zeros(0, 3, requires_grad=True)
    assert margin_cls_loss(z, z.detach(), torch.zeros(0, dtype=torch.int64)).item() == 0.0
    b = torch.zeros(0, 4)
    assert margin_reg_loss(b, b, b).item() == 0.0
    with pytest.raises(ValueError):
        margin_cls_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), margin=1.5)
