"""COCO-format detection data: pycocotools loading, flip augmentation, detection batches.

Layout (every path overridable in ``data.coco``)::

    <root>/train2017/*.jpg   <root>/val2017/*.jpg
    <root>/annotations/instances_train2017.json   <root>/annotations/instances_val2017.json

Images are decoded lazily (COCO does not fit in memory) and handed to the model at their own size as float
``[3, H, W]`` in 0..1: torchvision's detection models resize and normalise inside (``min_size``/``max_size``)
and return boxes in the original image's coordinates, which is what COCOeval wants.

Bad input, each handled here rather than deep inside training:
- annotation file missing, not JSON, or without ``images``/``annotations``/``categories``: DataError naming it;
- image file missing: DataError naming it (all files are checked when the split loads);
- image that cannot be decoded (truncated, not an image): DataError naming it, when it is read;
- boxes with zero or negative width/height, and crowd boxes: left out of training targets (torchvision
  rejects degenerate boxes; crowd regions are ignored regions, not objects), counted in ``skipped``;
  evaluation reads the ground truth through pycocotools, which ignores crowds itself;
- images without annotations: kept, as negatives for training and as images for evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from ..errors import DataError
from .base import prefetched

# COCO's size buckets (pycocotools' areaRng): small < 32^2 <= medium < 96^2 <= large.
SIZE_BUCKETS = ("small", "medium", "large")
SMALL_AREA, LARGE_AREA = 32**2, 96**2


def size_bucket(areas: torch.Tensor) -> torch.Tensor:
    """``[M]`` object areas in pixels -> ``[M]`` long: 0 small, 1 medium, 2 large."""
    return (areas >= SMALL_AREA).long() + (areas >= LARGE_AREA).long()


@dataclass
class DetectionSplit:
    """One split: the pycocotools ground truth, and per image its id, file and training target.

    ``targets[i]``: ``boxes [M, 4]`` float xyxy in pixels, ``labels [M]`` long in 1..C (0 is background),
    ``areas [M]`` float (COCO's annotated area, which decides the size bucket).
    """

    coco: COCO
    image_ids: list[int]
    files: list[pathlib.Path]
    targets: list[dict[str, torch.Tensor]]
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    @functools.cached_property
    def aspect_ratios(self) -> torch.Tensor:
        """``[N]`` float64 width / height of each image, from the annotation file's ``width`` and ``height``
        (the image file's header where they are missing), so no image is decoded; read once per split, not
        once per epoch."""
        ratios = []
        for image_id, path in zip(self.image_ids, self.files):
            info = self.coco.imgs[image_id]
            width, height = info.get("width"), info.get("height")
            if not (width and height and width > 0 and height > 0):
                try:  # Pillow reads the size from the header; the pixels stay undecoded
                    with Image.open(path) as image:
                        width, height = image.size
                except (OSError, ValueError, Image.DecompressionBombError) as exc:
                    raise DataError(f"{path}: cannot read image size ({str(exc).splitlines()[0]})") from exc
            ratios.append(float(width) / float(height))
        return torch.tensor(ratios, dtype=torch.float64)

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as float ``[3, H, W]`` in 0..1; a file that does not decode is a DataError naming it."""
        path = self.files[i]
        try:  # Pillow (a torchvision dependency): torchvision.io's decoders are deprecated since 0.29
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: cannot read image ({str(exc).splitlines()[0]})") from exc
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)


@dataclass
class DetectionData:
    """Train and validation splits with one label space: label ``i`` (1..C) is COCO category
    ``category_ids[i - 1]``; ``num_classes`` = C + 1 counts the background, as torchvision expects."""

    train: DetectionSplit
    val: DetectionSplit
    category_ids: list[int]
    category_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids) + 1


def read_coco(annotations: pathlib.Path) -> COCO:
    """pycocotools' ``COCO`` for a file, with its console output silenced and every failure as one line."""
    if not annotations.is_file():
        raise DataError(f"{annotations}: annotation file not found")
    try:
        dataset = json.loads(annotations.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{annotations}: not valid JSON ({exc})") from exc
    if not isinstance(dataset, dict):
        raise DataError(f"{annotations}: not a COCO annotation file (top level is not an object)")
    missing = [key for key in ("images", "categories") if key not in dataset]
    if missing:
        raise DataError(f"{annotations}: not a COCO annotation file (no {', '.join(missing)})")
    dataset.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise DataError(f"{annotations}: malformed COCO entry (missing or wrong field {exc})") from exc
    return coco


def load_split(
    images_dir: pathlib.Path, annotations: pathlib.Path, category_ids: list[int] | None = None
) -> DetectionSplit:
    """A split from an image folder and its annotation file. Labels follow ``category_ids`` (default: the
    file's categories in id order)."""
    coco = read_coco(annotations)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder not found")
    category_ids = category_ids or sorted(coco.getCatIds())
    label_of = {cat: i + 1 for i, cat in enumerate(category_ids)}
    image_ids = sorted(coco.getImgIds())
    files, targets = [], []
    skipped = {"degenerate_boxes": 0, "crowd_boxes": 0, "unknown_category": 0}
    missing = []
    for image_id in image_ids:
        info = coco.imgs[image_id]
        path = images_dir / info["file_name"]
        if not path.is_file():
            missing.append(path)
        files.append(path)
        boxes, labels, areas = [], [], []
        for ann in coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            if ann.get("iscrowd", 0):
                skipped["crowd_boxes"] += 1
            elif w <= 0 or h <= 0:
                skipped["degenerate_boxes"] += 1
            elif ann["category_id"] not in label_of:
                skipped["unknown_category"] += 1
            else:
                boxes.append([x, y, x + w, y + h])
                labels.append(label_of[ann["category_id"]])
                areas.append(float(ann.get("area", w * h)))
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.long),
                "areas": torch.tensor(areas, dtype=torch.float32),
            }
        )
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: image file not found{more} (listed in {annotations})")
    return DetectionSplit(coco, image_ids, files, targets, skipped)


def load_coco(
    root: pathlib.Path, train_images: str, train_annotations: str, val_images: str, val_annotations: str
) -> DetectionData:
    """Both splits under ``root`` (relative paths) with the training file's categories as label space."""
    train = load_split(root / train_images, root / train_annotations)
    category_ids = sorted(train.coco.getCatIds())
    names = [train.coco.cats[c]["name"] for c in category_ids]
    val = load_split(root / val_images, root / val_annotations, category_ids)
    return DetectionData(train, val, category_ids, names)


def hflip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Horizontal flip of ``[3, H, W]`` and its xyxy boxes."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


def host_batches(
    split: DetectionSplit,
    indices: torch.Tensor,
    batch_size: int,
    flip_generator: torch.Generator | None = None,
    pin: bool = False,
) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], list[int]]]:
    """:func:`detection_batches`' batches decoded and flipped on the host, in pinned memory with ``pin``."""
    for start in range(0, indices.numel(), batch_size):
        positions = indices[start : start + batch_size].tolist()
        images, targets = [], []
        for i in positions:
            image, target = split.image(i), split.targets[i]
            if flip_generator is not None and torch.rand((), generator=flip_generator) < 0.5:
                image, target = hflip(image, target)
            if pin:
                image, target = image.pin_memory(), {k: v.pin_memory() for k, v in target.items()}
            images.append(image)
            targets.append(target)
        yield images, targets, positions


def detection_batches(
    split: DetectionSplit,
    indices: torch.Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
    flip_generator: torch.Generator | None = None,
    prefetch: int = 2,
) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], list[int]]]:
    """Yield ``(images [3, H_i, W_i] list, targets list, positions in split)`` on ``device`` for
    ``indices`` in order; each image flipped with probability 1/2 when a ``flip_generator`` is given.

    A background thread decodes up to ``prefetch`` batches ahead (0: none) into pinned memory when
    ``device`` is a GPU, so the copies are asynchronous and the step never waits for the disk. The same
    batches, flips included, either way (one thread draws the flips, in order)."""
    device = torch.device(device)
    batches = host_batches(split, indices, batch_size, flip_generator, pin=device.type == "cuda")
    for images, targets, positions in prefetched(batches, prefetch) if prefetch else batches:
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in target.items()} for target in targets]
        yield images, targets, positions
