"""A tiny Faster R-CNN (resnet_tiny + FPN, 64x64 images) and a batch for head tests."""

from __future__ import annotations

import torch
from torchvision.models.detection import FasterRCNN

from stages.models.backbones import build_backbone

NUM_CLASSES = 3

torch.set_num_threads(1)  # the test machine's cores are shared


def tiny_faster_rcnn(seed: int = 0) -> FasterRCNN:
    torch.manual_seed(seed)
    backbone = build_backbone("resnet_tiny", trainable_layers=5, out_channels=16)
    return FasterRCNN(backbone, num_classes=NUM_CLASSES, min_size=64, max_size=64,
                      rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
                      rpn_pre_nms_top_n_test=64, rpn_post_nms_top_n_test=32,
                      box_batch_size_per_image=32, box_score_thresh=0.0, box_detections_per_img=20)


def tiny_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 20.0, 60.0, 50.0]]),
         "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 30.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets
