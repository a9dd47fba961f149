"""MNIST and FashionMNIST from torchvision's raw layout, never downloading.

Layout: ``<root>/<MNIST|FashionMNIST>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``. With both
splits present, train = train split and validation = t10k. With only the t10k split (as in the shared test
data), it is split deterministically: a permutation of its 10,000 images drawn with a fixed seed (0,
independent of the run's seed), the last ``val_size`` images for validation and the rest for training.
"""

from __future__ import annotations

import gzip
import pathlib

import numpy as np
import torch

from ..errors import DataError
from .base import ClassificationData

SPLIT_SEED = 0
_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_HOW_TO_GET = {
    "mnist": (
        "get the four files from https://yann.lecun.com/exdb/mnist/ "
        "(or torchvision.datasets.MNIST(root, download=True) once)"
    ),
    "fashion_mnist": (
        "get them from https://github.com/zalandoresearch/fashion-mnist "
        "(or torchvision.datasets.FashionMNIST(root, download=True) once)"
    ),
}


def read_idx(path: pathlib.Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 array; errors name the file."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not a uint8 IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file (header says {shape})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(raw_dir: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem, f"{stem}.gz"):
        if (raw_dir / name).is_file():
            return raw_dir / name
    return None


def _read_pair(raw_dir: pathlib.Path, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    images_path = _find(raw_dir, f"{split}-images-idx3-ubyte")
    labels_path = _find(raw_dir, f"{split}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        return None
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path}: {images.shape} images do not match {labels.shape} labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_mnist(root: str | pathlib.Path, name: str = "mnist", val_size: int = 2000) -> ClassificationData:
    """MNIST (``name="mnist"``) or FashionMNIST (``"fashion_mnist"``) as uint8 ``[N, 1, 28, 28]``."""
    root = pathlib.Path(root)
    folder = _FOLDER[name]
    raw_dir = next((d for d in (root / folder / "raw", root / "raw", root) if d.is_dir()), None)
    test = _read_pair(raw_dir, "t10k") if raw_dir is not None else None
    if test is None:
        raise DataError(
            f"{root}: no {folder} data (expected {root}/{folder}/raw/t10k-images-idx3-ubyte[.gz] and "
            f"t10k-labels-idx1-ubyte[.gz]); {_HOW_TO_GET[name]}"
        )
    train = _read_pair(raw_dir, "train")
    if train is None:
        images, labels = test
        if not 0 < val_size < images.shape[0]:
            raise DataError(f"data.val_size={val_size}: must be in 1..{images.shape[0] - 1} for a t10k-only split")
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
        train_idx, val_idx = order[:-val_size], order[-val_size:]
        train = images[train_idx], labels[train_idx]
        test = images[val_idx], labels[val_idx]
    return ClassificationData(train[0], train[1], test[0], test[1], num_classes=10)
