"""The HRNet mask network: shapes, padding, gradients, learning, crops against a slow reference, weights files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.core.errors import InputError
from stages.models.hrnet import (HRNetMask, build_backbone, build_mask_net, crop_boxes, load_mask_model,
                                 normalize)

TINY = {"backbone": "hrnet_tiny", "head_channels": 8, "weights": None}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions: one thread (several threads on a busy machine only wait for each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_branches_are_the_four_hrnet_branches_not_incre_features():
    bb = build_backbone("hrnet_tiny")
    assert bb.feature_info.channels() == [8, 16, 32, 64]
    assert bb.feature_info.reduction() == [4, 8, 16, 32]
    assert bb.incre_modules is None
    feats = bb(torch.zeros(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 16, 24), (16, 8, 12), (32, 4, 6), (64, 2, 3)]


@pytest.mark.parametrize("size", [32, 48, 60, 64, 80])
def test_tiny_output_shape_any_multiple_of_4(size):
    torch.manual_seed(0)
    net = build_mask_net(TINY).eval()
    assert net(torch.randn(2, 3, size, size)).shape == (2, 1, size, size)


def test_input_not_a_multiple_of_4_is_rejected():
    net = build_mask_net(TINY).eval()
    with pytest.raises(ValueError, match="multiples of 4"):
        net(torch.zeros(1, 3, 50, 50))


class _Recorder(torch.nn.Module):
    """A stand-in backbone: records its input, returns zero branches of the right shapes."""

    def forward(self, x):
        self.seen = x
        h, w = x.shape[-2:]
        return [x.new_zeros(len(x), c, h // s, w // s) for c, s in ((1, 4), (1, 8), (1, 16), (1, 32))]


def test_input_is_padded_symmetrically_to_a_multiple_of_32_and_cropped_back():
    rec = _Recorder()
    net = HRNetMask(rec, [1, 1, 1, 1], 2).eval()
    x = torch.randn(1, 3, 40, 72)
    assert net(x).shape == (1, 1, 40, 72)
    assert rec.seen.shape == (1, 3, 64, 96)
    assert torch.equal(rec.seen, F.pad(x, (12, 12, 12, 12)))
    net(torch.randn(1, 3, 64, 32))
    assert rec.seen.shape == (1, 3, 64, 32)  # multiples of 32: no padding


def test_real_timm_hrnet_w18_small_forward():
    net = build_mask_net({"backbone": "hrnet_w18_small", "head_channels": 16}).eval()
    assert net.backbone.feature_info.channels() == [16, 32, 64, 128]
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown HRNet backbone"):
        build_backbone("hrnet_w7")


def test_gradients_reach_the_backbone_stem():
    torch.manual_seed(0)
    net = build_mask_net(TINY)
    out = net(torch.randn(2, 3, 32, 32))
    F.binary_cross_entropy_with_logits(out, (torch.rand_like(out) > 0.5).float()).backward()
    assert net.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    net = build_mask_net(TINY)
    x = torch.randn(8, 3, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    y = ((yy - 16) ** 2 + (xx - 16) ** 2 < 100).float().expand(8, 1, 32, 32)
    x = x + 2 * y  # the disc is brighter
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(25):
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def _bilinear(img: np.ndarray, y: float, x: float) -> np.ndarray:
    """roi_align's bilinear sample at pixel-index coordinates (y, x): zero beyond one pixel outside, clamped
    to the border within it."""
    h, w = img.shape[-2:]
    if y < -1 or y > h or x < -1 or x > w:
        return np.zeros(img.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * img[:, y0, x0] + (1 - ly) * lx * img[:, y0, x1] + ly * (1 - lx) * img[:, y1, x0]
            + ly * lx * img[:, y1, x1])


def _crop_reference(img: np.ndarray, box, size: int) -> np.ndarray:
    """Each output bin (i, j) averages g x g samples at box-relative positions (k + 0.5) / g inside the bin,
    g = ceil(box side / size) per axis; pixel centres at half-integers (aligned=True)."""
    x0, y0, x1, y1 = box
    bw, bh = (x1 - x0) / size, (y1 - y0) / size
    gy, gx = max(1, math.ceil((y1 - y0) / size)), max(1, math.ceil((x1 - x0) / size))
    out = np.zeros((img.shape[0], size, size))
    for i in range(size):
        for j in range(size):
            acc = 0
            for a in range(gy):
                for b in range(gx):
                    yy = y0 + (i + (a + 0.5) / gy) * bh - 0.5
                    xx = x0 + (j + (b + 0.5) / gx) * bw - 0.5
                    acc = acc + _bilinear(img, yy, xx)
            out[:, i, j] = acc / (gy * gx)
    return out


def test_crop_boxes_equals_a_slow_reference_and_crops_masks_alike():
    rng = np.random.default_rng(0)
    img = rng.random((3, 20, 30))
    boxes = np.array([[2.0, 3.0, 12.5, 9.0], [0.0, 0.0, 30.0, 20.0], [25.3, 1.7, 29.9, 19.0], [5, 5, 6, 6]])
    masks = (rng.random((4, 20, 30)) > 0.5).astype(np.uint8)
    crops, targets = crop_boxes(torch.from_numpy(img).float(), torch.from_numpy(boxes).float(), 8,
                                masks=torch.from_numpy(masks), mask_thr=None)
    assert crops.shape == (4, 3, 8, 8) and targets.shape == (4, 1, 8, 8)
    for k, box in enumerate(boxes):
        assert np.allclose(crops[k].numpy(), _crop_reference(img, box, 8), atol=1e-5)
        assert np.allclose(targets[k].numpy(), _crop_reference(masks[k:k + 1].astype(float), box, 8), atol=1e-5)
    _, hard = crop_boxes(torch.from_numpy(img).float(), torch.from_numpy(boxes).float(), 8,
                         masks=torch.from_numpy(masks))
    assert torch.equal(hard, (targets > 0.5).float())


def test_rotated_crop_at_angle_zero_is_the_plain_crop_and_turns_the_mask_with_the_image():
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.random((3, 40, 50))).float()
    boxes = torch.tensor([[10.0, 8.0, 30.0, 28.0], [4.0, 6.0, 44.0, 36.0]])
    masks = torch.from_numpy(rng.random((2, 40, 50)) > 0.5)
    for k in range(2):  # one box at a time: the rotated path's samples per bin follow the batch's largest box
        plain, pt = crop_boxes(img, boxes[k:k + 1], 16, masks=masks[k:k + 1], mask_thr=None)
        rot0, rt = crop_boxes(img, boxes[k:k + 1], 16, masks=masks[k:k + 1], angles=torch.zeros(1), mask_thr=None)
        assert torch.allclose(plain, rot0, atol=1e-5) and torch.allclose(pt, rt, atol=1e-5)
    # a square box turned by 90 degrees: the crop is the plain crop rotated by 90 degrees (counter-clockwise)
    sq = torch.tensor([[10.0, 8.0, 30.0, 28.0]])
    turned, tt = crop_boxes(img, sq, 20, masks=masks[:1], angles=torch.tensor([90.0]), mask_thr=None)
    base, bt = crop_boxes(img, sq, 20, masks=masks[:1], mask_thr=None)
    assert torch.allclose(turned, torch.rot90(base, 1, (-2, -1)), atol=1e-4)
    assert torch.allclose(tt, torch.rot90(bt, 1, (-2, -1)), atol=1e-4)


def test_crop_boxes_without_boxes():
    crops, targets = crop_boxes(torch.zeros(3, 10, 10), torch.zeros(0, 4), 8, masks=torch.zeros(0, 10, 10))
    assert crops.shape == (0, 3, 8, 8) and targets.shape == (0, 1, 8, 8)


def test_normalize_uint8_equals_float():
    x = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    assert torch.allclose(normalize(x), normalize(x.float() / 255))
    assert normalize(torch.full((3, 1, 1), 0.485)).abs()[0].max() < 1e-6


def test_weights_file_backbone_and_whole_net(tmp_path):
    torch.manual_seed(0)
    src = build_mask_net(TINY)
    torch.save(src.backbone.state_dict(), tmp_path / "bb.pt")
    torch.save({"state_dict": src.state_dict()}, tmp_path / "all.pt")
    torch.manual_seed(1)
    a = build_mask_net({**TINY, "weights": str(tmp_path / "bb.pt")})
    assert torch.equal(a.backbone.conv1.weight, src.backbone.conv1.weight)
    assert not torch.equal(a.head[0].weight, src.head[0].weight)
    b = build_mask_net({**TINY, "weights": str(tmp_path / "all.pt")})
    assert torch.equal(b.classifier.weight, src.classifier.weight)
    torch.save({"nonsense.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit"):
        build_mask_net({**TINY, "weights": str(tmp_path / "bad.pt")})


def test_load_mask_model_round_trip_and_bad_file(tmp_path):
    net = build_mask_net(TINY)
    cfg = {**TINY, "test_scale": 32}
    torch.save({"state_dict": net.state_dict(), "cfg": cfg, "meta": {"epochs": 1}}, tmp_path / "m.pt")
    model, meta = load_mask_model(tmp_path / "m.pt")
    assert isinstance(model, HRNetMask) and not model.training
    assert meta["epochs"] == 1 and meta["cfg"]["test_scale"] == 32
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a mask model"):
        load_mask_model(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(InputError, match="junk.pt"):
        load_mask_model(tmp_path / "junk.pt")
