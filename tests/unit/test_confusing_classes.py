"""Confusing-class mixing (paper 5.9): target distributions and the soft-target loss against hand-worked values,
the option off is the plain cross-entropy bit for bit in every head, config errors name the key and the entry,
and a few CPU training steps run with it on."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from stages.core.config import validate_config
from stages.core.errors import InputError
from stages.models.detector import build_detector, set_class_mixing
from stages.models.losses import ClassMixing, classification_loss, mixing_targets, resolve_groups, soft_cross_entropy
from stages.models.tsd import decoupled_losses
from tests.unit.detector_fixtures import tiny_batch

TINY = {"backbone": "resnet_tiny", "fpn_channels": 16, "min_size": 64, "max_size": 64, "representation_size": 32,
        "rpn_pre_nms_top_n_train": 64, "rpn_post_nms_top_n_train": 32, "box_batch_size_per_image": 32}
HEADS = {"sibling": {}, "tsd": {"head": "tsd"}, "cascade": {"cascade": True},
         "cascade_tsd": {"cascade": True, "head": "tsd"}}


def test_soft_targets_hand_worked():
    m = ClassMixing(groups=((1, 2),), mode="soft", weight=0.5)
    t = mixing_targets(torch.tensor([2, 1, 3, 0]), 4, m, dtype=torch.float64)
    expect = torch.tensor([[0, 1 / 3, 2 / 3, 0], [0, 2 / 3, 1 / 3, 0], [0, 0, 0, 1], [1, 0, 0, 0]], dtype=torch.float64)
    assert torch.allclose(t, expect, atol=1e-15)
    full = mixing_targets(torch.tensor([2]), 4, ClassMixing(groups=((1, 2),), mode="full", weight=0.1))
    assert torch.equal(full, torch.tensor([[0.0, 0.5, 0.5, 0.0]]))
    three = mixing_targets(torch.tensor([1]), 5, ClassMixing(groups=((1, 2, 3),), weight=0.25), dtype=torch.float64)
    assert torch.allclose(three, torch.tensor([[0, 1, 0.25, 0.25, 0]], dtype=torch.float64) / 1.5, atol=1e-15)


def test_soft_loss_equals_the_hand_computed_value():
    logits = torch.log(torch.tensor([[1.0, 1.0, 2.0, 4.0]], dtype=torch.float64))      # softmax [1, 1, 2, 4] / 8
    m = ClassMixing(groups=((1, 2),), weight=0.5)
    # label 2: targets [0, 1/3, 2/3, 0] -> -(1/3 log 1/8 + 2/3 log 2/8)
    want = (1 / 3) * math.log(8) + (2 / 3) * math.log(4)
    assert classification_loss(logits, torch.tensor([2]), m).item() == pytest.approx(want, abs=1e-12)
    # full: -(1/2 log 1/8 + 1/2 log 2/8); label 3 (no group): -log 4/8
    assert classification_loss(logits, torch.tensor([2]), ClassMixing(groups=((1, 2),), mode="full")).item() == \
        pytest.approx(0.5 * math.log(8) + 0.5 * math.log(4), abs=1e-12)
    assert classification_loss(logits, torch.tensor([3]), m).item() == pytest.approx(math.log(2), abs=1e-12)


def test_off_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(40, 6, generator=g), torch.randint(0, 6, (40,), generator=g)
    assert torch.equal(classification_loss(logits, labels, None), F.cross_entropy(logits, labels))
    # soft targets that are one-hot (weight 0) give the cross-entropy up to rounding
    m = ClassMixing(groups=((1, 2, 3),), weight=0.0)
    assert torch.allclose(classification_loss(logits, labels, m), F.cross_entropy(logits, labels), atol=1e-6)
    assert soft_cross_entropy(logits[:0], torch.zeros(0, 6)).item() == 0.0


def test_bad_mixing_arguments():
    for kw, msg in (({"groups": ((1,),)}, "at least two"), ({"groups": ((0, 1),)}, "background"),
                    ({"groups": ((1, 2), (2, 3))}, "more than one group"), ({"groups": ((1, 2),), "mode": "x"},
                                                                             "mode"),
                    ({"groups": ((1, 2),), "weight": 2.0}, "weight")):
        with pytest.raises(ValueError, match=msg):
            ClassMixing(**kw)


def test_resolve_groups_by_mid_and_name():
    labels = ["/m/a", "/m/b", "/m/c"]
    names = {"/m/a": "Torch", "/m/b": "Flashlight", "/m/c": "Lamp", "/m/d": "Candle"}
    assert resolve_groups([["/m/a", "/m/c"]], labels) == ((1, 3),)
    assert resolve_groups([["Torch", "Flashlight"], ["Lamp", "Candle"]], labels, names=names) == ((1, 2),)
    with pytest.raises(KeyError, match="'Torch' is not a class MID"):
        resolve_groups([["Torch", "/m/b"]], labels)
    with pytest.raises(ValueError, match="given twice"):
        resolve_groups([["Torch", "/m/b"], ["/m/a", "/m/c"]], labels, names=names)


@pytest.mark.parametrize("groups, entry, what", [
    ([["Digit one", "Digit seven"], ["Digit seven", "Digit three"]], "'Digit seven'", "given twice"),
    ([["Digit one", "/m/orchard_d1"]], "'/m/orchard_d1'", "given twice"),
    ([["Digit one", "Torch"]], "'Torch'", "is not a class of the dataset"),
])
def test_config_errors_name_the_key_and_the_entry(groups, entry, what):
    with pytest.raises(InputError) as e:
        validate_config({"models": {"m": {"backbone": "resnet_small", "confusing_groups": groups}}})
    assert "field 'models/m/confusing_groups'" in str(e.value) and entry in str(e.value) and what in str(e.value)


def test_config_accepts_groups_and_fills_the_defaults():
    m = validate_config({"models": {"m": {"backbone": "resnet_small", "confusing_groups": [
        ["Digit three", "/m/orchard_d8"]]}}})["models"]["m"]
    assert m["confusing_mode"] == "soft" and m["confusing_weight"] == 0.5
    off = validate_config({"models": {"m": {"backbone": "resnet_small"}}})["models"]["m"]
    assert off["confusing_groups"] == []


def _losses(head: str, mixing: ClassMixing | None, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_detector({**TINY, **HEADS[head]}, num_classes=3).train()
    if mixing is not None:
        set_class_mixing(model, mixing)
    images, targets = tiny_batch()
    torch.manual_seed(1)   # the proposal/RoI sampling
    return model(images, targets)


@pytest.mark.parametrize("head", list(HEADS))
def test_heads_off_is_unchanged_and_on_changes_only_the_classification(head):
    plain = _losses(head, None)
    off = _losses(head, ClassMixing(groups=((1, 2),), weight=0.0))   # one-hot targets through the mixed path
    on = _losses(head, ClassMixing(groups=((1, 2),), mode="full"))
    assert set(plain) == set(off) == set(on)
    for k in plain:
        if "classifier" in k:
            assert torch.allclose(plain[k], off[k], atol=1e-6), k
            assert not torch.allclose(plain[k], on[k]), k          # labels 1 and 2 are both in the batch
        else:
            assert torch.equal(plain[k], off[k]) and torch.equal(plain[k], on[k]), k


def test_decoupled_losses_without_mixing_are_the_cross_entropy_bit_for_bit():
    from torchvision.models.detection._utils import BoxCoder

    from stages.models.tsd import TSDSettings

    g = torch.Generator().manual_seed(0)
    n = 12
    rois = torch.rand(n, 2, generator=g) * 20
    rois = torch.cat([rois, rois + 5 + torch.rand(n, 2, generator=g) * 10], 1)
    kw = dict(class_logits=torch.randn(n, 4, generator=g), deltas=torch.randn(n, 16, generator=g), rois_r=rois,
              sibling_logits=torch.randn(n, 4, generator=g), sibling_deltas=torch.randn(n, 16, generator=g),
              rois=rois, labels=torch.randint(0, 4, (n,), generator=g), matched_gt=rois + 1,
              box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)), settings=TSDSettings())
    parts = decoupled_losses(**kw)
    assert torch.equal(parts["classifier"], F.cross_entropy(kw["class_logits"], kw["labels"]))
    assert torch.equal(parts["classifier_sibling"], F.cross_entropy(kw["sibling_logits"], kw["labels"]))
    mixed = decoupled_losses(**kw, mixing=ClassMixing(groups=((1, 2, 3),), mode="full"))
    t = mixing_targets(kw["labels"], 4, ClassMixing(groups=((1, 2, 3),), mode="full"))
    want = -(t * F.log_softmax(kw["class_logits"], -1)).sum(-1).mean()
    assert torch.allclose(mixed["classifier"], want, atol=1e-6)
    assert torch.equal(mixed["margin_cls"], parts["margin_cls"]) and torch.equal(mixed["box_reg"], parts["box_reg"])


@pytest.mark.parametrize("head", ["sibling", "cascade_tsd"])
def test_a_few_training_steps_with_mixing(head):
    torch.manual_seed(0)
    model = build_detector({**TINY, **HEADS[head]}, num_classes=3).train()
    set_class_mixing(model, ClassMixing(groups=((1, 2),), weight=0.3))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images, targets = tiny_batch()
    before = [p.detach().clone() for p in model.roi_heads.parameters()]
    for _ in range(3):
        loss = sum(model(images, targets).values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.roi_heads.parameters()))


def test_train_stage_with_groups_by_name(tables, tmp_path):
    """stages.train on the tiny dataset: groups by display name through --class-names; an unknown name is an
    InputError naming confusing_groups and the entry (exit 2)."""
    from stages import train
    from tests.stages.test_train_infer import TINY_MODEL

    out, splits = tables
    cfg = {**TINY_MODEL, "epochs": 1, "lr_steps": [1], "iters_per_epoch": 1, "warmup_iters": 1,
           "confusing_groups": [["Cat", "Dog"]], "confusing_mode": "soft", "confusing_weight": 0.5}

    def run(name, c):
        return train.main(["--config", json.dumps(c), "--images", str(out / "images.parquet"), "--boxes",
                           str(out / "boxes.parquet"), "--splits", str(splits), "--device", "cpu",
                           "--class-names", str(out / "classes.parquet"), "--ckpt-dir", str(tmp_path / name / "ck"),
                           "--out", str(tmp_path / name / "model.pt")])

    assert run("ok", cfg) == 0
    ck = torch.load(tmp_path / "ok" / "model.pt", weights_only=False)
    assert ck["config"]["confusing_groups"] == [["Cat", "Dog"]]
    assert run("bad", {**cfg, "confusing_groups": [["Cat", "Torch"]]}) == 2
    assert not (tmp_path / "bad" / "model.pt").exists()


def test_class_mixing_of_a_config():
    from stages.train import class_mixing

    labels = ["/m/cat", "/m/dog", "/m/car"]
    assert class_mixing({"confusing_groups": []}, labels) is None
    m = class_mixing({"confusing_groups": [["/m/cat", "/m/dog"]], "confusing_mode": "full",
                      "confusing_weight": 0.5}, labels)
    assert m == ClassMixing(groups=((1, 2),), mode="full", weight=0.5)
    with pytest.raises(InputError, match="field 'confusing_groups'.*'Cat' is not a class MID"):
        class_mixing({"confusing_groups": [["Cat", "/m/dog"]]}, labels)
