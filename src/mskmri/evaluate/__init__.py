"""Evaluation: segmentation and lesion-detection metrics, and group statistics.

- :mod:`mskmri.evaluate.metrics`: Dice, IoU, sensitivity, specificity, accuracy, HD95, ASSD
  (mm), volume difference (mL, %), lesion-wise detection and size strata.
- :mod:`mskmri.evaluate.document`: the ``mskmri/evaluation/1`` document (``mskmri evaluate``).
- :mod:`mskmri.evaluate.stats`: group comparisons over measurement tables (``mskmri stats``).

No torch anywhere here.
"""

from __future__ import annotations

from mskmri.evaluate.metrics import (
    EVALUATION_SCHEMA,
    LabelEvaluation,
    LesionDetection,
    Metric,
    MetricError,
    accuracy,
    assd,
    binary_metrics,
    dice,
    evaluate_labels,
    hd95,
    iou,
    lesion_detection,
    sensitivity,
    specificity,
    surface_distances,
    volume_difference,
)

__all__ = [
    "EVALUATION_SCHEMA",
    "LabelEvaluation",
    "LesionDetection",
    "Metric",
    "MetricError",
    "accuracy",
    "assd",
    "binary_metrics",
    "dice",
    "evaluate_labels",
    "hd95",
    "iou",
    "lesion_detection",
    "sensitivity",
    "specificity",
    "surface_distances",
    "volume_difference",
]
