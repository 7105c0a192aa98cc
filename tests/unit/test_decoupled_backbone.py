import pytest
import torch

from stages.core.config import validate_config
from stages.core.errors import InputError
from stages.models.backbones import CLS_PREFIX, DecoupledBackbone, build_backbone
from stages.models.detector import build_detector
from tests.unit.detector_fixtures import tiny_batch

KEYS = ["0", "1", "2", "3", "pool"]
CFG = {"backbone": "resnet_tiny", "head": "tsd", "decoupled_backbone": True, "fpn_channels": 16,
       "representation_size": 32, "min_size": 64, "max_size": 64}


def _grads(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum(0.0 if g is None else float(g.abs().sum()) for g in grads)


def test_shapes_keys_and_what_is_shared():
    torch.manual_seed(0)
    bb = build_backbone("resnet_tiny", trainable_layers=5, out_channels=16, decoupled=True)
    assert isinstance(bb, DecoupledBackbone) and bb.out_channels == 16
    assert list(bb.cls_layers) == ["layer3", "layer4"]
    out = bb(torch.rand(2, 3, 64, 64))
    assert list(out) == KEYS + [CLS_PREFIX + k for k in KEYS]
    sizes = [16, 8, 4, 2, 1]
    for k, s in zip(KEYS, sizes):
        assert out[k].shape == out[CLS_PREFIX + k].shape == (2, 16, s, s)
    # the copies start from the same weights: equal pyramids; changing the cls layer4 changes only cls maps
    assert all(torch.equal(out[k], out[CLS_PREFIX + k]) for k in KEYS)
    with torch.no_grad():
        bb.cls_layers["layer4"][0].conv1.weight.mul_(2.0)
        out2 = bb(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
        ref = bb(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(out2["0"], ref["0"])
    assert not torch.allclose(out2[CLS_PREFIX + "3"], out2["3"])
    assert not torch.allclose(out2[CLS_PREFIX + "0"], out2["0"])  # FPN top-down reaches the fine levels


def test_local_trunk_weights_load_into_the_shared_part_and_both_branches(tmp_path):
    torch.manual_seed(1)
    src = build_backbone("resnet_tiny", trainable_layers=5, out_channels=16)
    path = tmp_path / "trunk.pt"
    torch.save(src.body.state_dict(), path)
    bb = build_backbone("resnet_tiny", trainable_layers=3, out_channels=16, decoupled=True, weights_path=path)
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv1.weight", "layer3.0.conv1.weight"):
        assert torch.equal(bb.body.state_dict()[key], src.body.state_dict()[key]), key
    assert torch.equal(bb.cls_layers["layer3"][0].conv1.weight, src.body.layer3[0].conv1.weight)
    assert not bb.body.layer1[0].conv1.weight.requires_grad  # freezing applies to the shared part
    assert bb.cls_layers["layer4"][0].conv1.weight.requires_grad


def test_each_branch_learns_from_its_own_loss():
    torch.manual_seed(0)
    model = build_detector(CFG, num_classes=2)
    model.train()
    losses = model(*tiny_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    bb = model.backbone
    cls_branch = list(bb.cls_layers.parameters()) + list(bb.cls_fpn.parameters())
    reg_branch = list(bb.body.layer3.parameters()) + list(bb.body.layer4.parameters()) + list(bb.fpn.parameters())
    shared = list(bb.body.layer1.parameters())
    assert _grads(losses["loss_classifier"], cls_branch) > 0
    assert _grads(losses["loss_box_reg"], reg_branch) > 0
    assert _grads(losses["loss_box_reg"], cls_branch) == 0  # regression never reads the cls pyramid
    assert _grads(losses["loss_objectness"], cls_branch) == 0  # nor does the RPN
    assert _grads(losses["loss_classifier"], shared) > 0 and _grads(losses["loss_box_reg"], shared) > 0


@pytest.mark.parametrize("cascade", [False, True])
def test_train_step_then_eval_on_cpu(cascade):
    torch.manual_seed(0)
    model = build_detector({**CFG, "cascade": cascade}, num_classes=2)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images, targets = tiny_batch()
    before = model.backbone.cls_layers["layer4"][0].conv1.weight.detach().clone()
    loss = sum(model(images, targets).values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.backbone.cls_layers["layer4"][0].conv1.weight)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det in out:
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].shape == (n,)


def test_config_validation():
    cfg = validate_config({"models": {"m": {"head": "tsd"}}}, cross_refs=False)
    assert cfg["models"]["m"]["decoupled_backbone"] is False
    cfg = validate_config({"models": {"m": {"head": "tsd", "decoupled_backbone": True}}}, cross_refs=False)
    assert cfg["models"]["m"]["decoupled_backbone"] is True
    with pytest.raises(InputError, match="decoupled_backbone"):
        validate_config({"models": {"m": {"head": "tsd", "decoupled_backbone": "yes"}}}, cross_refs=False)
    with pytest.raises(InputError, match="needs head: tsd"):
        validate_config({"models": {"m": {"decoupled_backbone": True}}}, cross_refs=False)
    with pytest.raises(ValueError, match="needs head: tsd"):
        build_detector({**CFG, "head": "sibling"}, num_classes=2)
