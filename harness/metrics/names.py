"""Metric names that several parts of the harness agree on, stated once: the headline figure of a study
(top-1 accuracy for classification, COCO AP for detection), which the console, the report, Tune's progress
table and the ASHA / Optuna defaults all rank by."""

from __future__ import annotations

from collections.abc import Collection

CLASSIFICATION_MAIN_METRIC = "val_top1"
DETECTION_MAIN_METRIC = "val_ap"


def main_metric(names: Collection[str]) -> str:
    """The headline figure among ``names`` (a metrics dict or a set of metric names): COCO AP where there is
    one (detection), else top-1 accuracy."""
    return DETECTION_MAIN_METRIC if DETECTION_MAIN_METRIC in names else CLASSIFICATION_MAIN_METRIC


def task_main_metric(detection: bool) -> str:
    """The headline figure of a detection (``True``) or classification study."""
    return DETECTION_MAIN_METRIC if detection else CLASSIFICATION_MAIN_METRIC
