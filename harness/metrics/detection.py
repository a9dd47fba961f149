"""COCO bbox evaluation through pycocotools' ``COCOeval``: AP, AP50, AP75, AP by object size and AR."""

from __future__ import annotations

import contextlib
import io

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# COCOeval.stats, in its order.
COCO_STATS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
              "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


def to_coco_results(image_id: int, detection: dict[str, torch.Tensor], category_ids: list[int]) -> list[dict]:
    """One image's torchvision detections (``boxes [D, 4]`` xyxy, ``scores [D]``, ``labels [D]`` in 1..C)
    -> COCO result entries (``bbox`` as xywh, ``category_id`` from ``category_ids[label - 1]``)."""
    boxes = detection["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = detection["scores"].detach().float().cpu().tolist()
    labels = detection["labels"].detach().cpu().tolist()
    return [
        {"image_id": image_id, "category_id": category_ids[label - 1], "bbox": [round(v, 2) for v in box],
         "score": round(score, 5)}
        for box, score, label in zip(xywh, scores, labels)
    ]


def coco_evaluate(coco_gt: COCO, results: list[dict], image_ids: list[int] | None = None) -> dict[str, float]:
    """The 12 COCOeval bbox figures (:data:`COCO_STATS`) of ``results`` (COCO result entries) against
    ``coco_gt``, over ``image_ids`` (default: every ground-truth image). pycocotools' console output is
    silenced. With no detection at all, AP and AR are 0 where ground truth exists and -1 where a size
    bucket has none, as COCOeval reports them."""
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        if not results:
            return _empty_stats(coco_gt, image_ids)
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(COCO_STATS, evaluator.stats)}


def _empty_stats(coco_gt: COCO, image_ids: list[int]) -> dict[str, float]:
    areas = [ann["area"] for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_ids, iscrowd=False))]
    present = {
        "": bool(areas),
        "small": any(a < 32**2 for a in areas),
        "medium": any(32**2 <= a < 96**2 for a in areas),
        "large": any(a >= 96**2 for a in areas),
    }
    stats = {}
    for name in COCO_STATS:
        bucket = name.split("_")[1] if "_" in name else ""
        stats[name] = 0.0 if present[bucket] else -1.0
    return stats
