"""``metrics.coco_backend``: faster-coco-eval gives pycocotools' 12 COCOeval figures (within 1e-9) on the
published oracle and on generated boxes of every size, the detection task evaluates with the chosen
backend, an absent backend stops at validation with one line naming the field and the install command, and
the bench times both on the oracle."""

import json
import random
import sys

import pytest
import torch
import yaml

from harness.bench import coco_eval_time
from harness.bench import main as bench_main
from harness.config import validate_run
from harness.data import load_detection_dataset
from harness.data.coco import read_coco
from harness.errors import ConfigError
from harness.metrics.detection import COCO_STATS, coco_evaluate
from harness.tasks.base import Session
from harness.tasks.detection import build_detector, evaluate
from harness.train import main as train_main

from .helpers import shared_path

TOLERANCE = 1e-9
INSTALL = "pip install 'moe-bench[fastcoco]'"


def both(gt, results, image_ids=None) -> tuple[dict[str, float], dict[str, float]]:
    pytest.importorskip("faster_coco_eval")  # the test extra installs it
    return (
        coco_evaluate(gt, results, image_ids, backend="pycocotools"),
        coco_evaluate(gt, results, image_ids, backend="faster_coco_eval"),
    )


def assert_same(reference: dict[str, float], fast: dict[str, float]) -> None:
    assert set(reference) == set(fast) == set(COCO_STATS)
    for name in COCO_STATS:
        assert abs(fast[name] - reference[name]) <= TOLERANCE, (name, reference[name], fast[name])


def test_faster_coco_eval_matches_pycocotools_on_the_published_oracle():
    oracle = shared_path("coco-eval-oracle")
    gt = read_coco(oracle / "instances_val2014_100.json")
    results = json.loads((oracle / "instances_val2014_fakebbox100_results.json").read_text())
    reference, fast = both(gt, results)
    assert_same(reference, fast)
    published = {"ap": 0.505, "ap50": 0.697, "ap75": 0.573, "ap_small": 0.586, "ap_medium": 0.519, "ap_large": 0.501}
    for name, value in published.items():
        assert round(fast[name], 3) == value, name


def synthetic_coco(seed: int = 0) -> tuple[dict, list[dict]]:
    """Ground truth (12 images, 3 categories, boxes of all three sizes, crowds, an empty image) and imperfect
    detections: jittered, some missed, some of the wrong class, false positives, tied scores, and one image
    with more than 100 detections (COCOeval's maxDets cut)."""
    rng = random.Random(seed)
    sides = {"small": (6, 30), "medium": (34, 90), "large": (100, 220)}
    images, annotations, results = [], [], []
    for image_id in range(1, 13):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        for _ in range(0 if image_id == 5 else rng.randint(2, 7)):
            low, high = sides[rng.choice(list(sides))]
            w, h = rng.uniform(low, high), rng.uniform(low, high)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            category = rng.randint(1, 3)
            crowd = int(rng.random() < 0.07)
            # COCO's area is the mask's, less than the box's: it decides the size bucket
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h * rng.uniform(0.6, 1.0),
                    "iscrowd": crowd,
                }
            )
            if rng.random() < 0.8:
                dx, dy, dw, dh = (
                    rng.gauss(0, 0.12 * w),
                    rng.gauss(0, 0.12 * h),
                    rng.gauss(0, 0.15 * w),
                    rng.gauss(0, 0.15 * h),
                )
                box = [x + dx, y + dy, max(1.0, w + dw), max(1.0, h + dh)]
                label = category if rng.random() < 0.85 else rng.randint(1, 3)
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": label,
                        "bbox": [round(v, 2) for v in box],
                        "score": round(rng.random(), 2),
                    }
                )  # two decimals: ties in the ranking
        for _ in range(120 if image_id == 7 else rng.randint(0, 4)):
            w, h = rng.uniform(5, 150), rng.uniform(5, 150)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": rng.randint(1, 3),
                    "bbox": [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h],
                    "score": round(rng.random() * 0.7, 2),
                }
            )
    categories = [{"id": i, "name": name} for i, name in enumerate(("square", "disk", "bar"), start=1)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def write_generated(tmp_path):
    dataset, _ = synthetic_coco()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dataset))
    return path


def test_faster_coco_eval_matches_pycocotools_on_generated_boxes(tmp_path):
    _, results = synthetic_coco()
    gt = read_coco(write_generated(tmp_path))
    kept = [dict(r) for r in results]
    reference, fast = both(gt, results)
    assert results == kept  # neither backend changed the caller's detections
    assert_same(reference, fast)
    # every figure is a real fraction: no bucket empty, none perfect, none zero
    assert all(0 < reference[name] < 1 for name in COCO_STATS), reference
    # over a subset of the images (max_val_images), and with no detection at all
    subset = [1, 2, 3, 4, 5, 6]
    assert_same(*both(gt, results, subset))
    assert both(gt, results, subset)[0] != reference
    assert_same(*both(gt, []))


def test_missing_backend_stops_at_validation_naming_the_field_and_the_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if not installed
    with pytest.raises(ConfigError) as error:
        validate_run({"metrics": {"coco_backend": "faster_coco_eval"}})
    message = str(error.value)
    assert message.startswith("base.metrics.coco_backend: faster_coco_eval is not installed")
    assert INSTALL in message and "\n" not in message
    validate_run({"metrics": {"coco_backend": "pycocotools"}})  # the default needs nothing more
    # the CLI: one line, before any training
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "fast",
                "sweep": {},
                "base": {
                    "data": {"name": "synthetic_coco", "root": str(tmp_path)},
                    "model": {"name": "retinanet"},
                    "moe": None,
                    "metrics": {"coco_backend": "faster_coco_eval"},
                },
            }
        )
    )
    assert train_main([str(study)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.coco_backend" in err and INSTALL in err
    assert [p.name for p in tmp_path.iterdir()] == ["study.yaml"]  # no data generated, nothing written
    # evaluation itself refuses too (a worker without the package), with or without detections
    gt = read_coco(write_generated(tmp_path))
    for results in ([], [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5}]):
        with pytest.raises(ConfigError, match=r"^metrics\.coco_backend: .*moe-bench\[fastcoco\]"):
            coco_evaluate(gt, results, backend="faster_coco_eval")


def test_detection_task_evaluates_with_the_configured_backend(tmp_path, monkeypatch):
    pytest.importorskip("faster_coco_eval")
    raw = {
        "data": {
            "name": "synthetic_coco",
            "root": str(tmp_path),
            "val_batch_size": 2,
            "synthetic": {"train_images": 2, "val_images": 2, "image_size": 160},
            "coco": {"min_size": 160, "max_size": 160},
        },
        "model": {"name": "retinanet", "backbone": "resnet18"},
        "moe": None,
        "train": {"device": "cpu"},
    }
    configs = {
        backend: validate_run({**raw, "metrics": {"coco_backend": backend}})
        for backend in ("pycocotools", "faster_coco_eval")
    }
    data = load_detection_dataset(configs["pycocotools"].data)
    torch.manual_seed(0)
    model = build_detector(configs["pycocotools"], data)
    model.score_thresh = 0.0  # untrained: keep low-score boxes so AP has something to rank
    figures = {
        backend: evaluate(model, data, config, torch.device("cpu"), Session()) for backend, config in configs.items()
    }
    assert_same(*({name: f[f"val_{name}"] for name in COCO_STATS} for f in figures.values()))
    assert figures["pycocotools"]["val_ar100"] > 0
    # the task hands the configured backend on: made unimportable, evaluation fails naming it
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    with pytest.raises(ConfigError, match="metrics.coco_backend"):
        evaluate(model, data, configs["faster_coco_eval"], torch.device("cpu"), Session())


def test_bench_times_both_backends_on_the_oracle(tmp_path, capsys):
    oracle = shared_path("coco-eval-oracle")
    pytest.importorskip("faster_coco_eval")
    others = ("classification", "memory", "epoch", "small_cnn", "expert_parallel", "detection")
    out = tmp_path / "bench.json"
    skips = [arg for section in others for arg in ("--skip", section)]
    command = ["--device", "cpu", *skips, "--coco-oracle", str(oracle), "--coco-repeats", "2", "--json", str(out)]
    assert bench_main(command) == 0
    timing = json.loads(out.read_text())["coco_eval"]
    backends = timing["backends"]
    assert set(backends) == {"pycocotools", "faster_coco_eval"} and timing["repeats"] == 2
    assert backends["faster_coco_eval"]["ap"] == pytest.approx(backends["pycocotools"]["ap"], abs=TOLERANCE)
    reference, fast = backends["pycocotools"]["seconds"], backends["faster_coco_eval"]["seconds"]
    assert timing["seconds"] == reference > 0 and fast > 0 and timing["faster_vs_pycocotools"] == reference / fast
    printed = capsys.readouterr().out
    assert "| pycocotools | " in printed and "| faster_coco_eval | " in printed
    assert coco_eval_time(str(tmp_path / "no-oracle")) is None
