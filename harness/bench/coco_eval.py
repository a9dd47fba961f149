"""The coco_eval section: each COCO evaluator's time on the shared oracle (:func:`coco_eval_time`)."""

from __future__ import annotations

import json
import pathlib
import statistics
import time

from ..data.coco import read_coco
from ..extras import COCO_BACKENDS, missing_coco_backend
from ..metrics.detection import coco_evaluate


def coco_eval_time(oracle: str, repeats: int = 5) -> dict | None:
    """Seconds each ``metrics.coco_backend`` takes to evaluate the oracle (100 val2014 images, its fake
    detections), or None when the oracle folder is absent. The backends are timed in turns, ``repeats``
    rounds, each figure the median of its rounds; a call is the whole :func:`coco_evaluate` (for
    faster_coco_eval including its own index of the ground truth). ``seconds`` and ``ap`` are
    pycocotools'; ``backends[name]`` is None for a backend that is not installed."""
    folder = pathlib.Path(oracle)
    if not (folder / "instances_val2014_100.json").is_file():
        return None
    gt = read_coco(folder / "instances_val2014_100.json")
    results = json.loads((folder / "instances_val2014_fakebbox100_results.json").read_text())
    present = [name for name in COCO_BACKENDS if missing_coco_backend(name) is None]
    seconds: dict[str, list[float]] = {name: [] for name in present}
    ap: dict[str, float] = {}
    for _ in range(repeats):
        for name in present:  # in turns, so a machine's drift slows both alike
            start = time.perf_counter()
            ap[name] = coco_evaluate(gt, results, backend=name)["ap"]
            seconds[name].append(time.perf_counter() - start)
    backends = {name: None for name in COCO_BACKENDS}
    backends.update({name: {"seconds": statistics.median(seconds[name]), "ap": ap[name]} for name in present})
    reference, fast = backends["pycocotools"], backends["faster_coco_eval"]
    return {
        "seconds": reference["seconds"],
        "ap": reference["ap"],
        "images": 100,
        "detections": len(results),
        "repeats": repeats,
        "backends": backends,
        "faster_vs_pycocotools": reference["seconds"] / fast["seconds"] if fast else None,
    }
