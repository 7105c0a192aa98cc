import pytest
import torch
from torch import nn
from torchvision.models import resnet

from stages.models.backbones import DeformableConv3x3, build_backbone


def test_resnet_tiny_shapes():
    bb = build_backbone("resnet_tiny", trainable_layers=5, out_channels=32)
    out = bb(torch.zeros(2, 3, 64, 64))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape) for v in out.values()] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4),
                                                      (2, 32, 2, 2), (2, 32, 1, 1)]
    assert bb.out_channels == 32


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_named_backbones_build(name):
    bb = build_backbone(name, trainable_layers=3, returned_layers=(2, 3, 4))
    assert list(bb.body.return_layers) == ["layer2", "layer3", "layer4"]
    assert not bb.body.conv1.weight.requires_grad and not bb.body.layer1[0].conv1.weight.requires_grad
    assert bb.body.layer2[0].conv1.weight.requires_grad


@pytest.mark.parametrize("name", ["resnet101", "resnext101"])
def test_large_backbones_build(name):
    bb = build_backbone(name, trainable_layers=3, dcn=True)
    assert isinstance(bb.body.layer4[0].conv2, DeformableConv3x3)


def test_deformable_conv_starts_as_the_plain_conv_and_learns_offsets():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False)
    dconv = DeformableConv3x3(conv)
    x = torch.randn(2, 8, 9, 9)
    assert torch.allclose(dconv(x), conv(x), atol=1e-5)
    dconv(x).square().sum().backward()
    assert dconv.conv_offset.weight.grad.abs().sum() > 0


def test_dcn_backbone_loads_plain_imagenet_style_weights(tmp_path):
    torch.manual_seed(0)
    plain = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1])
    path = tmp_path / "trunk.pth"
    torch.save(plain.state_dict(), path)  # includes fc.* and BN num_batches_tracked
    bb = build_backbone("resnet_tiny", trainable_layers=0, weights_path=path, dcn=True)
    assert isinstance(bb.body.layer3[0].conv1, DeformableConv3x3)
    assert torch.equal(bb.body.layer3[0].conv1.weight, plain.layer3[0].conv1.weight)
    assert torch.equal(bb.body.layer1[0].bn1.running_var, plain.layer1[0].bn1.running_var)
    trainable = {n for n, p in bb.body.named_parameters() if p.requires_grad}
    assert trainable and all(".conv_offset." in n for n in trainable)
    out = bb(torch.zeros(1, 3, 64, 64))
    assert out["0"].shape == (1, 256, 16, 16)


def test_full_backbone_state_dict_round_trip_and_bad_file(tmp_path):
    a = build_backbone("resnet_tiny", out_channels=16, returned_layers=(2, 3))
    path = tmp_path / "bb.pth"
    torch.save(a.state_dict(), path)
    b = build_backbone("resnet_tiny", out_channels=16, returned_layers=(2, 3), weights_path=path)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    torch.save({"something": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="does not fit"):
        build_backbone("resnet_tiny", weights_path=path)


def test_bad_arguments_rejected():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16")
    with pytest.raises(ValueError):
        build_backbone("resnet_tiny", trainable_layers=6)
    with pytest.raises(ValueError):
        build_backbone("resnet_tiny", returned_layers=(0, 1))


def test_resnet_small_width_trainable_bn_and_dcn():
    bb = build_backbone("resnet_small", width=8, out_channels=16, trainable_layers=5, norm="bn", dcn=True)
    assert [bb.body.layer1[0].conv1.out_channels, bb.body.layer4[0].conv1.out_channels] == [8, 64]
    assert isinstance(bb.body.bn1, nn.BatchNorm2d) and bb.body.bn1.weight.requires_grad
    assert isinstance(bb.body.layer4[1].conv2, DeformableConv3x3)
    out = bb(torch.zeros(1, 3, 64, 64))
    assert [tuple(v.shape) for v in out.values()] == [(1, 16, 16, 16), (1, 16, 8, 8), (1, 16, 4, 4),
                                                      (1, 16, 2, 2), (1, 16, 1, 1)]
