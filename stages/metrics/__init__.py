"""The OpenImages Challenge metric (boxes and masks), exact to the official TF Object Detection API evaluator.

Typical use (the ground truth is prepared once and reused for many scorings, e.g. inside a search loop)::

    gt = prepare_ground_truth(boxes=boxes, image_labels=image_labels, hierarchy=h, classes=classes)
    result = evaluate_detections(gt=gt, detections=dets)   # -> MetricResult
    result.map, result.per_class, result.counts, result.to_json()
"""

from stages.metrics.detection import (
    MetricResult,
    PreparedGroundTruth,
    average_precision,
    evaluate_detections,
    prepare_ground_truth,
)

__all__ = ["MetricResult", "PreparedGroundTruth", "average_precision", "evaluate_detections",
           "prepare_ground_truth"]
