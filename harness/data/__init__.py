"""Data sets: CIFAR-100 (official pickles), synthetic CIFAR (written in that format), MNIST/FashionMNIST."""

from __future__ import annotations

import pathlib

from ..config import DataConfig
from ..errors import DataError
from .base import ClassificationData, Groups, iterate_batches, normalize, random_crop_flip, shard_indices
from .cifar import load_cifar100, safe_unpickle
from .coco import DetectionData, load_coco
from .mnist import load_mnist
from .synthetic import synthetic_cifar_root, write_synthetic_cifar
from .synthetic_coco import synthetic_coco_root, write_synthetic_coco


def load_dataset(config: DataConfig) -> ClassificationData:
    """The configured data set, in memory. A missing root names the path and how to obtain the data."""
    if config.name == "synthetic_cifar":
        s = config.synthetic
        root = synthetic_cifar_root(config.root_or_default, s.train_per_class, s.test_per_class, s.seed)
        write_synthetic_cifar(root, s.train_per_class, s.test_per_class, s.seed)
        return with_normalisation(load_cifar100(root), config)
    if config.root is None:
        raise DataError(f"data.root: not set; data set {config.name!r} needs the folder that holds it")
    if not pathlib.Path(config.root).is_dir():
        raise DataError(f"data.root: {config.root}: no such directory")
    data = (
        load_cifar100(config.root)
        if config.name == "cifar100"
        else load_mnist(config.root, config.name, config.val_size)
    )
    return with_normalisation(data, config)


def with_normalisation(data: ClassificationData, config: DataConfig) -> ClassificationData:
    """``data`` normalised with ``data.mean``/``data.std`` when the config fixes them (else the training
    split's own statistics stay); a count that does not match the images' channels is a :class:`DataError`."""
    if config.mean is None:
        return data
    if len(config.mean) != data.in_channels:
        raise DataError(f"data.mean: {len(config.mean)} values for {data.in_channels}-channel images")
    data.mean, data.std = tuple(config.mean), tuple(config.std)
    return data


def coco_root(config: DataConfig) -> pathlib.Path:
    """Where the configured detection data lives (for ``synthetic_coco``: its cache folder)."""
    if config.name == "synthetic_coco":
        s = config.synthetic
        return synthetic_coco_root(config.root_or_default, s.train_images, s.val_images, s.image_size, s.seed)
    return pathlib.Path(config.root_or_default)


def check_coco_layout(config: DataConfig) -> None:
    """Fail fast (before any Ray or model work) when real COCO is not where the config says: one line
    naming the path, the expected layout and the synthetic alternative."""
    if config.name != "coco":
        return
    root, c = coco_root(config), config.coco
    needed = [root / c.train_images, root / c.val_images, root / c.train_annotations, root / c.val_annotations]
    missing = next((p for p in needed if not p.exists()), None)
    if missing is not None:
        raise DataError(
            f"data.root: {missing} not found; COCO is expected as <root>/{c.train_images}/, <root>/{c.val_images}/, "
            f"<root>/{c.train_annotations} and <root>/{c.val_annotations} (paths set in data.coco), with root "
            f"{root}; set data.root, or use data.name=synthetic_coco for a generated stand-in"
        )


def load_detection_dataset(config: DataConfig) -> DetectionData:
    """The configured detection data (writing ``synthetic_coco`` on first use)."""
    root = coco_root(config)
    if config.name == "synthetic_coco":
        s = config.synthetic
        write_synthetic_coco(root, s.train_images, s.val_images, s.image_size, s.seed)
    check_coco_layout(config)
    c = config.coco
    return load_coco(root, c.train_images, c.train_annotations, c.val_images, c.val_annotations)


__all__ = [
    "ClassificationData",
    "DataError",
    "DetectionData",
    "check_coco_layout",
    "coco_root",
    "Groups",
    "iterate_batches",
    "load_cifar100",
    "load_dataset",
    "load_detection_dataset",
    "load_mnist",
    "normalize",
    "random_crop_flip",
    "safe_unpickle",
    "shard_indices",
    "with_normalisation",
    "write_synthetic_cifar",
]
