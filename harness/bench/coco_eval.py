"""The coco_eval section: COCOeval's time on the shared oracle (:func:`coco_eval_time`)."""

from __future__ import annotations

import json
import time

def coco_eval_time(oracle: str) -> dict[str, float] | None:
    """Seconds pycocotools' COCOeval takes on the oracle (100 val2014 images, its fake detections), or
    None when the oracle folder is absent."""
    import pathlib

    from ..data.coco import read_coco
    from ..metrics.detection import coco_evaluate

    folder = pathlib.Path(oracle)
    if not (folder / "instances_val2014_100.json").is_file():
        return None
    gt = read_coco(folder / "instances_val2014_100.json")
    results = json.loads((folder / "instances_val2014_fakebbox100_results.json").read_text())
    start = time.perf_counter()
    stats = coco_evaluate(gt, results)
    return {"seconds": time.perf_counter() - start, "images": 100, "detections": len(results), "ap": stats["ap"]}
