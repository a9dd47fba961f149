"""``synthetic_coco``: a deterministic COCO look-alike written as real COCO JSON plus PNG images, so the
real loader (:mod:`harness.data.coco`) and pycocotools read it unchanged.

Three categories told apart by shape and colour (red squares, green disks, blue bars) on a noisy grey
background. Every object's size is drawn from one of COCO's buckets, so the set has small (< 32^2),
medium and large (> 96^2) objects in about equal numbers; objects do not overlap, so each annotated area
is the object's exact pixel count and its box the tight box around those pixels.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image

CATEGORIES = ({"id": 1, "name": "square"}, {"id": 2, "name": "disk"}, {"id": 3, "name": "bar"})
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 80, 230]], dtype=np.float64)
# Side lengths per bucket, chosen so every shape's pixel area lands inside that COCO bucket.
SIDES = {"small": (8, 26), "medium": (42, 88), "large": (112, 150)}


def _shape_mask(category: int, side: int, yy: np.ndarray, xx: np.ndarray, top: int, left: int) -> np.ndarray:
    if category == 1:  # square
        return (yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side)
    if category == 2:  # disk inscribed in the side x side square
        r = side / 2
        return ((yy - top - r + 0.5) ** 2 + (xx - left - r + 0.5) ** 2) <= r * r
    # bar: as wide as the square, 0.6 of its height, centred vertically
    h = max(2, round(side * 0.6))
    off = (side - h) // 2
    return (yy >= top + off) & (yy < top + off + h) & (xx >= left) & (xx < left + side)


def _image(rng: np.random.Generator, size: int, image_id: int) -> tuple[np.ndarray, list[dict]]:
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = 110 + rng.normal(0, 12, size=(size, size, 3))
    occupied = np.zeros((size, size), dtype=bool)
    annotations = []
    for _ in range(int(rng.integers(1, 4))):
        bucket = ("small", "medium", "large")[int(rng.integers(0, 3))]
        category = int(rng.integers(1, 4))
        side = int(rng.integers(*SIDES[bucket]))
        for _attempt in range(20):  # find a free spot; give the object up if there is none
            top, left = (int(v) for v in rng.integers(0, size - side, size=2))
            mask = _shape_mask(category, side, yy, xx, top, left)
            if not (mask & occupied).any():
                break
        else:
            continue
        occupied |= mask
        pixels[mask] = COLOURS[category - 1] + rng.normal(0, 10, size=(int(mask.sum()), 3))
        rows, cols = np.nonzero(mask)
        x0, y0 = int(cols.min()), int(rows.min())
        annotations.append(
            {
                "image_id": image_id,
                "category_id": category,
                "bbox": [x0, y0, int(cols.max()) + 1 - x0, int(rows.max()) + 1 - y0],
                "area": int(mask.sum()),
                "iscrowd": 0,
            }
        )
    return np.clip(pixels, 0, 255).astype(np.uint8), annotations


def _write_split(
    folder: pathlib.Path, annotations_file: pathlib.Path, count: int, size: int, rng: np.random.Generator, first_id: int
) -> None:
    folder.mkdir(parents=True)
    images, anns = [], []
    for image_id in range(first_id, first_id + count):
        pixels, objects = _image(rng, size, image_id)
        name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(folder / name)
        images.append({"id": image_id, "file_name": name, "height": size, "width": size})
        anns.extend(objects)
    for i, ann in enumerate(anns):
        ann["id"] = first_id * 100 + i + 1
    annotations_file.write_text(
        json.dumps(
            {
                "info": {"description": "moe-bench synthetic_coco"},
                "images": images,
                "annotations": anns,
                "categories": [dict(c, supercategory="shape") for c in CATEGORIES],
            }
        )
    )


def synthetic_coco_root(
    cache_dir: str | pathlib.Path, train_images: int, val_images: int, image_size: int, seed: int
) -> pathlib.Path:
    """Cache folder for one synthetic configuration (different sizes never share files)."""
    return pathlib.Path(cache_dir) / f"synthetic_coco_{train_images}x{val_images}_{image_size}px_seed{seed}"


def write_synthetic_coco(
    root: str | pathlib.Path, train_images: int = 48, val_images: int = 16, image_size: int = 256, seed: int = 0
) -> pathlib.Path:
    """Write ``<root>/{train2017,val2017}/*.png`` and ``<root>/annotations/instances_{train,val}2017.json``
    unless present; return ``root``. The folder appears atomically (written aside, then renamed)."""
    root = pathlib.Path(root)
    if (root / "annotations" / "instances_val2017.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".synthetic-coco-", dir=root.parent))
    try:
        (staging / "annotations").mkdir()
        _write_split(
            staging / "train2017",
            staging / "annotations" / "instances_train2017.json",
            train_images,
            image_size,
            rng,
            1,
        )
        _write_split(
            staging / "val2017",
            staging / "annotations" / "instances_val2017.json",
            val_images,
            image_size,
            rng,
            1 + train_images,
        )
        try:
            os.rename(staging, root)
        except OSError:  # another process won the race; its copy is identical
            if not (root / "annotations" / "instances_val2017.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
