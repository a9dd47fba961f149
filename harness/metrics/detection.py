"""COCO bbox evaluation: AP, AP50, AP75, AP by object size and AR, through pycocotools' ``COCOeval`` or
faster-coco-eval's ``COCOeval_faster`` (``metrics.coco_backend``; the same 12 figures, within 1e-9, on the
published oracle and on synthetic boxes: ``tests/test_coco_backend.py``)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..errors import ConfigError
from ..extras import COCO_BACKENDS, missing_coco_backend

# COCOeval.stats, in its order.
COCO_STATS = (
    "ap",
    "ap50",
    "ap75",
    "ap_small",
    "ap_medium",
    "ap_large",
    "ar1",
    "ar10",
    "ar100",
    "ar_small",
    "ar_medium",
    "ar_large",
)


def to_coco_results(image_id: int, detection: dict[str, torch.Tensor], category_ids: list[int]) -> list[dict]:
    """One image's torchvision detections (``boxes [D, 4]`` xyxy, ``scores [D]``, ``labels [D]`` in 1..C)
    -> COCO result entries (``bbox`` as xywh, ``category_id`` from ``category_ids[label - 1]``)."""
    boxes = detection["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = detection["scores"].detach().float().cpu().tolist()
    labels = detection["labels"].detach().cpu().tolist()
    return [
        {
            "image_id": image_id,
            "category_id": category_ids[label - 1],
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
        }
        for box, score, label in zip(xywh, scores, labels)
    ]


def coco_evaluate(
    coco_gt: COCO, results: list[dict], image_ids: list[int] | None = None, backend: str = "pycocotools"
) -> dict[str, float]:
    """The 12 COCOeval bbox figures (:data:`COCO_STATS`) of ``results`` (COCO result entries) against
    ``coco_gt``, over ``image_ids`` (default: every ground-truth image), computed by ``backend``
    (``metrics.coco_backend``). The evaluators' console output is silenced. With no detection at all, AP
    and AR are 0 where ground truth exists and -1 where a size bucket has none, as COCOeval reports them."""
    make_evaluator = coco_evaluator(backend)  # first: an absent backend fails with or without detections
    image_ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        if not results:
            return _empty_stats(coco_gt, image_ids)
        # Both loadRes add id, area and segmentation to each entry in place: copies leave the caller's list
        # as it was, so the same list can be evaluated again (by the other backend, say).
        evaluator = make_evaluator(coco_gt, [dict(r) for r in results])
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(COCO_STATS, evaluator.stats)}


def coco_evaluator(backend: str) -> Callable[[COCO, list[dict]], Any]:
    """The evaluator ``backend`` names: ``(coco_gt, results) ->`` a bbox evaluator of the results against
    the ground truth, not yet run (``.params``, ``.evaluate()``, ``.accumulate()``, ``.summarize()``,
    ``.stats``, as pycocotools' ``COCOeval``). faster_coco_eval indexes the ground truth with its own ``COCO``,
    over the same dataset dict; both evaluators write each ground-truth annotation's ``ignore`` flag there
    from its ``iscrowd`` alone, so one backend's run does not change the other's figures. A backend that
    cannot be imported: ConfigError."""
    if backend == "pycocotools":
        return lambda coco_gt, results: COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
    if backend != "faster_coco_eval":
        raise ConfigError(f"metrics.coco_backend: expected one of {', '.join(COCO_BACKENDS)}, got {backend!r}")
    try:
        from faster_coco_eval import COCO as FastCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError as exc:
        why = missing_coco_backend(backend) or f"faster_coco_eval cannot be imported ({exc})"
        raise ConfigError(f"metrics.coco_backend: {why}") from None

    def faster(coco_gt: COCO, results: list[dict]) -> COCOeval_faster:
        fast_gt = FastCOCO(coco_gt.dataset)
        return COCOeval_faster(fast_gt, fast_gt.loadRes(results), iouType="bbox", print_function=lambda *_: None)

    return faster


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
