"""timm trunks behind build_backbone: the paper's zoo (SE-ResNeXt-101 32x4d, SENet-154, EfficientNet-B3..B7,
NASNet-A large) and timm:<name>, with random weights (never a download), small inputs."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import FrozenBatchNorm2d

from stages.core.config import validate_config
from stages.core.errors import InputError
from stages.models.backbones import CLS_PREFIX, DecoupledBackbone, DeformableConv3x3, build_backbone
from stages.models.detector import build_detector

torch.set_num_threads(1)

SMALL = {"fpn_channels": 16, "representation_size": 32, "min_size": 64, "max_size": 64, "norm": "frozen_bn",
         "trainable_layers": 3, "rpn_pre_nms_top_n_train": 50, "rpn_post_nms_top_n_train": 20,
         "box_batch_size_per_image": 16, "rpn_batch_size_per_image": 32}


def _targets(n=1):
    return [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])} for _ in range(n)]


def _levels(bb, size):
    bb.eval()
    with torch.no_grad():
        out = bb(torch.zeros(1, 3, size, size))
    return {k: tuple(v.shape) for k, v in out.items()}


def _expected(channels, size):
    return {str(i): (1, channels, size // s, size // s) for i, s in enumerate((4, 8, 16, 32))} | {
        "pool": (1, channels, size // 64 or 1, size // 64 or 1)}


def test_generic_timm_name_in_a_full_faster_rcnn_trains_and_detects():
    torch.manual_seed(0)
    model = build_detector({**SMALL, "backbone": "timm:resnet18", "trainable_layers": 5, "norm": "bn"},
                           num_classes=2)
    assert isinstance(model, FasterRCNN) and model.backbone.out_channels == 16
    # the FPN is fed strides 4..32 with timm's channels
    assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == [64, 128, 256, 512]
    model.train()
    losses = model([torch.rand(3, 64, 64)], _targets())
    sum(losses.values()).backward()
    assert model.backbone.body.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        (det,) = model([torch.rand(3, 64, 64)])
    assert set(det) == {"boxes", "labels", "scores"}


def test_seresnext101_dcn_frozen_stages_and_frozen_bn():
    bb = build_backbone("seresnext101_32x4d", trainable_layers=2, out_channels=16, dcn=True)
    body = bb.body
    assert bb.timm_model == "seresnext101_32x4d" and bb.family == "resnet"
    assert isinstance(body.layer3[0].conv2, DeformableConv3x3) and isinstance(body.layer4[2].conv2, DeformableConv3x3)
    assert isinstance(body.layer2[0].conv2, nn.Conv2d) and not isinstance(body.layer2[0].conv2, DeformableConv3x3)
    assert isinstance(body.bn1, FrozenBatchNorm2d) and not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert [b[0].in_channels for b in bb.fpn.inner_blocks] == [256, 512, 1024, 2048]
    # trainable_layers=2: layer4 and layer3 train (offset convs always), layer2, layer1 and the stem do not
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert all(p.requires_grad for n, p in body.named_parameters() if ".conv_offset." in n)
    out = bb(torch.rand(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == _expected(16, 64)
    sum(v.sum() for v in out.values()).backward()
    assert body.layer3[0].conv2.conv_offset.weight.grad is not None and body.layer2[0].conv1.weight.grad is None


def test_senet154_is_legacy_senet154_with_plain_3x3_convs_and_gn():
    bb = build_backbone("senet154", trainable_layers=1, out_channels=16, norm="gn", dcn=True)
    assert bb.timm_model == "legacy_senet154"
    assert isinstance(bb.body.layer4[0].conv2, DeformableConv3x3) and bb.body.layer4[0].conv2.groups == 64
    assert isinstance(bb.body.layer0.bn1, nn.GroupNorm) and bb.body.layer0.bn1.num_groups == 32
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.body.modules())
    assert [b[0].in_channels for b in bb.fpn.inner_blocks] == [256, 512, 1024, 2048]
    out = bb(torch.rand(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == _expected(16, 64)
    sum(v.sum() for v in out.values()).backward()
    assert bb.body.layer4[0].conv1.weight.grad is not None and not bb.body.layer3[0].conv1.weight.requires_grad


def test_efficientnet_b3_forward_backward_gn_and_no_dcn():
    bb = build_backbone("efficientnet_b3", trainable_layers=5, out_channels=16, norm="gn")
    # BatchNormAct2d -> GroupNormAct, the activation kept
    from timm.layers import GroupNormAct

    assert isinstance(bb.body.bn1, GroupNormAct) and isinstance(bb.body.bn1.act, nn.SiLU)
    assert [b[0].in_channels for b in bb.fpn.inner_blocks] == [32, 48, 136, 384]
    out = bb(torch.rand(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == _expected(16, 64)
    sum(v.sum() for v in out.values()).backward()
    assert bb.body.conv_stem.weight.grad is not None
    with pytest.raises(ValueError, match="dcn does not apply to efficientnet"):
        build_backbone("efficientnet_b3", dcn=True)


@pytest.mark.parametrize("name, channels", [("efficientnet_b4", [32, 56, 160, 448]),
                                            ("efficientnet_b5", [40, 64, 176, 512]),
                                            ("efficientnet_b6", [40, 72, 200, 576]),
                                            ("efficientnet_b7", [48, 80, 224, 640])])
def test_efficientnet_b4_to_b7_feature_info(name, channels):
    from stages.models.timm_trunks import feature_indices

    stem, levels = feature_indices(name, name)  # meta-device build: no weights, no forward
    with torch.device("meta"):
        info = timm.create_model(name, features_only=True, out_indices=tuple(levels)).feature_info
    assert info.reduction() == [4, 8, 16, 32] and info.channels() == channels and stem is not None


def test_nasnetalarge_feeds_the_fpn_freezes_by_cell_and_cannot_be_decoupled():
    bb = build_backbone("nasnetalarge", trainable_layers=1, out_channels=16)
    assert [b[0].in_channels for b in bb.fpn.inner_blocks] == [168, 1008, 2016, 4032]
    body = bb.body.net.body
    assert not any(p.requires_grad for p in body.cell_11.parameters())  # stage 3 (stride 16)
    assert all(p.requires_grad for p in body.cell_12.parameters())  # stage 4
    assert all(p.requires_grad for p in body.reduction_cell_1.parameters())  # taps stride 16 at its input
    assert not body.conv0.conv.weight.requires_grad
    out = bb(torch.rand(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == _expected(16, 64)
    sum(v.sum() for v in out.values()).backward()
    assert next(body.cell_17.parameters()).grad is not None
    with pytest.raises(ValueError, match="decoupled_backbone does not apply to timm family 'nasnet'"):
        build_backbone("nasnetalarge", decoupled=True)
    with pytest.raises(ValueError, match="dcn does not apply to nasnet"):
        build_backbone("nasnetalarge", dcn=True)


def test_timm_decoupled_backbone_splits_after_stride_8():
    torch.manual_seed(0)
    bb = build_backbone("timm:resnet18", trainable_layers=5, out_channels=16, decoupled=True)
    assert isinstance(bb, DecoupledBackbone) and bb.split_after == "layer2"
    assert list(bb.cls_layers) == ["layer3", "layer4"]
    out = bb(torch.rand(1, 3, 64, 64))
    assert list(out) == ["0", "1", "2", "3", "pool"] + [CLS_PREFIX + k for k in ("0", "1", "2", "3", "pool")]
    # EfficientNet (flattened blocks) decouples too
    eb = build_backbone("timm:mobilenetv3_small_100", out_channels=16, decoupled=True)
    assert eb.split_after == "blocks_1" and list(eb.cls_layers)[0] == "blocks_2"
    assert set(eb(torch.rand(1, 3, 64, 64))) == set(out)


@pytest.mark.parametrize("name, tname", [("timm:resnet18", "resnet18"),
                                         ("timm:mobilenetv3_small_100", "mobilenetv3_small_100")])
def test_imagenet_weights_round_trip_and_first_bad_key(tmp_path, name, tname):
    torch.manual_seed(1)
    cls_model = timm.create_model(tname, pretrained=False)
    with torch.no_grad():  # make BN statistics non-trivial so that loading them shows
        for m in cls_model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = cls_model.state_dict()  # classifier included
    path = tmp_path / "imagenet.pth"
    torch.save(sd, path)
    a = build_backbone(name, trainable_layers=0, out_channels=16, weights_path=path)
    torch.manual_seed(2)
    b = build_backbone(name, trainable_layers=0, out_channels=16, weights_path=path)
    b.fpn.load_state_dict(a.fpn.state_dict())
    x = torch.rand(1, 3, 64, 64)
    a.eval(), b.eval()
    with torch.no_grad():
        for (k, va), vb in zip(a(x).items(), b(x).values()):
            assert torch.equal(va, vb), k
    # the body's tensors are the file's (flattened names such as blocks_0 come from blocks.0)
    from stages.models.timm_trunks import source_key_map

    kmap = source_key_map(a.body, list(sd))
    assert sum(torch.equal(v, sd[kmap[k]]) for k, v in a.body.state_dict().items()) == len(a.body.state_dict())
    first_conv = "conv1.weight" if tname == "resnet18" else "conv_stem.weight"
    assert torch.equal(a.body.state_dict()[first_conv], sd[first_conv])
    keys = list(sd)
    first = next(k for k in keys if k.endswith(".weight") and sd[k].dim() == 4)
    bad = dict(sd)
    bad[first] = torch.zeros(1, 1, 1, 1)
    torch.save(bad, path)
    with pytest.raises(ValueError, match=rf"{name}.*first mismatching key '{first}' has shape \(1, 1, 1, 1\)"):
        build_backbone(name, weights_path=path)
    missing = dict(sd)
    del missing[first]
    torch.save(missing, path)
    with pytest.raises(ValueError, match=rf"first mismatching key '{first}' is missing"):
        build_backbone(name, weights_path=path)
    torch.save({**sd, "not_a_layer.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="first mismatching key 'not_a_layer.weight' is not a key"):
        build_backbone(name, weights_path=path)


def test_full_timm_backbone_state_dict_round_trip_and_torchvision_error(tmp_path):
    torch.manual_seed(0)
    a = build_backbone("timm:resnet18", out_channels=16, norm="bn")
    path = tmp_path / "bb.pth"
    torch.save(a.state_dict(), path)
    b = build_backbone("timm:resnet18", out_channels=16, norm="bn", weights_path=path)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    sd = a.state_dict()
    sd["fpn.layer_blocks.0.0.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(sd, path)
    with pytest.raises(ValueError, match="timm:resnet18.*'fpn.layer_blocks.0.0.weight' has shape"):
        build_backbone("timm:resnet18", out_channels=16, weights_path=path)
    # the torchvision trunks name the backbone and the first bad key too
    from torchvision.models import resnet

    tv = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1]).state_dict()
    tv["layer2.0.conv1.weight"] = torch.zeros(1)
    torch.save(tv, path)
    with pytest.raises(ValueError, match="does not fit backbone 'resnet_tiny'.*'layer2.0.conv1.weight' has shape"):
        build_backbone("resnet_tiny", weights_path=path)


def test_gn_and_syncbn_norms_on_torchvision_trunks():
    bb = build_backbone("resnet_tiny", out_channels=16, norm="gn", trainable_layers=5)
    assert isinstance(bb.body.bn1, nn.GroupNorm) and bb.body.bn1.num_groups == 32
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert _levels(bb, 64) == _expected(16, 64)
    from stages.models.backbones import group_norm

    assert group_norm(48).num_groups == 24 and group_norm(40).num_groups == 20 and group_norm(8).num_groups == 8
    sb = build_backbone("resnet_tiny", out_channels=16, norm="syncbn")
    assert isinstance(sb.body.bn1, nn.BatchNorm2d)  # stages.train converts it under DDP on CUDA


def test_config_validation_names_the_model_entry(monkeypatch):
    ok = validate_config({"models": {"m": {"backbone": "timm:resnet18"}, "e": {"backbone": "efficientnet_b3"}}})
    assert ok["models"]["m"]["backbone"] == "timm:resnet18"
    with pytest.raises(InputError, match="models/bad/backbone") as err:
        validate_config({"models": {"bad": {"backbone": "resnet9000"}}})
    assert "unknown backbone 'resnet9000'" in str(err.value)
    with pytest.raises(InputError, match="models/bad/backbone.*not a timm model name|not a timm model name"):
        validate_config({"models": {"bad": {"backbone": "timm:no_such_net"}}})
    # a ViT's features_only extractor has stride-16 maps only
    with pytest.raises(InputError, match="strides") as err:
        validate_config({"models": {"vit": {"backbone": "timm:vit_tiny_patch16_224"}}})
    assert "models/vit/backbone" in str(err.value)
    # a model whose features_only extractor cannot be built
    real = timm.create_model

    def no_features(name, *args, **kwargs):
        if kwargs.get("features_only"):
            raise RuntimeError("features_only not implemented for this model")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_features)
    with pytest.raises(InputError, match="does not support features_only") as err:
        validate_config({"models": {"nf": {"backbone": "timm:resnet26"}}})
    assert "models/nf/backbone" in str(err.value)


def test_training_checkpoint_records_backbone_weights_sha256(tmp_path, tables):
    import hashlib

    from stages import train

    out, splits = tables
    torch.manual_seed(0)
    src = build_backbone("resnet_tiny", out_channels=16, norm="bn")
    wpath = tmp_path / "trunk.pth"
    torch.save(src.body.state_dict(), wpath)
    cfg = {"backbone": "resnet_tiny", "fpn_channels": 16, "representation_size": 32, "epochs": 1, "batch_size": 1,
           "lr": 0.001, "lr_steps": [1], "warmup_iters": 1, "iters_per_epoch": 1, "min_size": 64, "max_size": 64,
           "test_scales": [64], "seed": 1, "backbone_weights": str(wpath)}
    run = tmp_path / "run"
    assert train.main(["--config", json.dumps(cfg), "--images", str(out / "images.parquet"),
                       "--boxes", str(out / "boxes.parquet"), "--splits", str(splits), "--device", "cpu",
                       "--ckpt-dir", str(run / "ckpt"), "--out", str(run / "model.pt")]) == 0
    digest = hashlib.sha256(wpath.read_bytes()).hexdigest()
    final = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    assert final["backbone_weights"] == {"path": str(wpath), "sha256": digest}
    (ckpt,) = list((run / "ckpt").glob("*.pt"))
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["backbone_weights"]["sha256"] == digest
