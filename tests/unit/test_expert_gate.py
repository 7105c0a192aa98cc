"""The expert background gate in every RoI head: an RoI whose background score beats every foreground score
gives no detection (and, in the decoupled heads, never reaches the regression branch); the others do."""

import pytest
import torch

from stages.models.detector import build_detector
from stages.models.heads import foreground_wins

torch.set_num_threads(1)

CFG = {"backbone": "resnet_small", "width": 8, "fpn_channels": 8, "representation_size": 16, "min_size": 64,
       "max_size": 64, "tsd_gamma": 0.1}
HEADS = {"sibling": {}, "tsd": {"head": "tsd"}, "cascade": {"cascade": True, "cascade_iou": [0.5, 0.6],
                                                             "cascade_weights": [1.0, 1.0]},
         "cascade+tsd": {"cascade": True, "head": "tsd", "cascade_iou": [0.5, 0.6], "cascade_weights": [1.0, 1.0]}}
#: two images (3 + 2 RoIs); rows 0 and 3 have the background winning, row 2 ties (kept)
PROPOSALS = [torch.tensor([[2.0, 2.0, 20.0, 30.0], [30.0, 4.0, 60.0, 24.0], [10.0, 34.0, 40.0, 62.0]]),
             torch.tensor([[4.0, 4.0, 44.0, 36.0], [20.0, 30.0, 50.0, 60.0]])]
LOGITS = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [2.5, 2.0, -1.0], [-1.0, 0.0, 3.0]])
BACKGROUND_WINS = [True, False, False, True, False]


def _classifiers_and_regressors(heads):
    """Every classifier Linear (sibling/stage predictors and decoupled branches) and every box regressor."""
    named = dict(heads.named_modules())
    cls = [m for n, m in named.items() if n.endswith("cls_score")]
    reg = [m for n, m in named.items() if n.endswith("bbox_pred")]
    return cls, reg


def _detect(heads, expert: bool):
    heads.expert_mode = expert
    g = torch.Generator().manual_seed(0)
    feats = {str(i): torch.randn(2, 8, 16 >> i, 16 >> i, generator=g) for i in range(4)}
    with torch.no_grad():
        return heads(feats, [p.clone() for p in PROPOSALS], [(64, 64), (64, 64)])[0]


@pytest.mark.parametrize("name", list(HEADS))
def test_background_winning_rois_give_no_detection_in_every_head(name):
    torch.manual_seed(0)
    model = build_detector({**CFG, **HEADS[name], "expert": True}, num_classes=2).eval()
    heads = model.roi_heads
    assert heads.expert_mode  # the config flag reaches the head
    heads.score_thresh, heads.nms_thresh = 0.0, 1.0
    cls, reg = _classifiers_and_regressors(heads)
    assert cls and reg
    with torch.no_grad():
        for m in reg:  # zero regression: every detection box is its RoI
            m.weight.zero_()
            m.bias.zero_()
    # every classifier answers the crafted logits, one row per RoI in proposal order
    for m in cls:
        m.register_forward_hook(lambda mod, inp, out: LOGITS[:len(out)].to(out.dtype))
    reached_regression = []
    for n, m in heads.named_modules():
        if n.endswith("reg_head"):  # the decoupled regression branches
            m.register_forward_hook(lambda mod, inp, out: reached_regression.append(len(inp[0])))

    plain = _detect(heads, expert=False)
    gated = _detect(heads, expert=True)

    assert foreground_wins(LOGITS).tolist() == [not b for b in BACKGROUND_WINS]
    row = 0
    for image, (props, p_det, g_det) in enumerate(zip(PROPOSALS, plain, gated)):
        plain_boxes = {tuple(b) for b in p_det["boxes"].round(decimals=3).tolist()}
        gated_boxes = {tuple(b) for b in g_det["boxes"].round(decimals=3).tolist()}
        for box in props.tolist():
            assert tuple(box) in plain_boxes, (image, box)  # without the gate every RoI gives detections
            assert (tuple(box) in gated_boxes) != BACKGROUND_WINS[row], (name, image, box)
            row += 1
        assert gated_boxes <= plain_boxes
    if name.endswith("tsd"):  # the gate sits before the (last) regression branch
        assert reached_regression[-1] == BACKGROUND_WINS.count(False)
