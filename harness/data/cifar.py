"""CIFAR-100 from the official python-pickle layout, read with a restricted unpickler.

Layout: ``<root>/cifar-100-python/{train,test,meta}`` (``root`` may also be the ``cifar-100-python`` folder
itself), as unpacked from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .base import ClassificationData, Groups

NUM_FINE = 100
NUM_COARSE = 20
HOW_TO_GET = (
    "download and unpack https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz there, "
    "or use data.name=synthetic_cifar"
)

# What a CIFAR pickle may contain: plain containers (pickle opcodes, no lookup) and numpy arrays.
# Anything else (os.system, builtins.eval, ...) is refused, so a data root can never run code.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Protocol-2 pickles written by Python 3 encode bytes as _codecs.encode(str, "latin1"): data, not code.
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def safe_unpickle(path: pathlib.Path) -> Any:
    """Unpickle a data file allowing only containers and numpy arrays; errors name the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: missing CIFAR-100 file; {HOW_TO_GET}") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: not a plain CIFAR pickle ({exc})") from None
    except Exception as exc:  # truncated or garbage bytes surface as many exception types
        raise DataError(f"{path}: corrupt CIFAR pickle ({exc.__class__.__name__}: {exc})") from None


def _field(record: dict, name: str, path: pathlib.Path) -> Any:
    for key in (name.encode(), name):
        if key in record:
            return record[key]
    raise DataError(f"{path}: corrupt CIFAR pickle (no '{name}' entry)")


def read_split(path: pathlib.Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One split file -> ``(images uint8 [N, 3, 32, 32], fine [N], coarse [N])``."""
    record = safe_unpickle(path)
    if not isinstance(record, dict):
        raise DataError(f"{path}: corrupt CIFAR pickle (expected a dict, got {type(record).__name__})")
    data = np.asarray(_field(record, "data", path))
    fine = np.asarray(_field(record, "fine_labels", path), dtype=np.int64)
    coarse = np.asarray(_field(record, "coarse_labels", path), dtype=np.int64)
    n = data.shape[0] if data.ndim else 0
    if data.dtype != np.uint8 or data.shape != (n, 3 * 32 * 32) or fine.shape != (n,) or coarse.shape != (n,):
        raise DataError(f"{path}: corrupt CIFAR pickle (data {data.dtype} {data.shape}, {fine.shape[0]} labels)")
    if n and (fine.min() < 0 or fine.max() >= NUM_FINE or coarse.min() < 0 or coarse.max() >= NUM_COARSE):
        raise DataError(f"{path}: corrupt CIFAR pickle (labels out of range)")
    images = torch.from_numpy(data.reshape(n, 3, 32, 32).copy())
    return images, torch.from_numpy(fine), torch.from_numpy(coarse)


def find_cifar_dir(root: str | pathlib.Path) -> pathlib.Path:
    """The ``cifar-100-python`` folder under ``root`` (or ``root`` itself)."""
    root = pathlib.Path(root)
    for candidate in (root / "cifar-100-python", root):
        if (candidate / "train").is_file() and (candidate / "test").is_file():
            return candidate
    raise DataError(f"{root}: no CIFAR-100 data (expected {root}/cifar-100-python/{{train,test,meta}}); {HOW_TO_GET}")


def load_cifar100(root: str | pathlib.Path) -> ClassificationData:
    """Train = the official train split, validation = the official test split, superclass groups."""
    folder = find_cifar_dir(root)
    train_images, train_fine, _ = read_split(folder / "train")
    val_images, val_fine, val_coarse = read_split(folder / "test")
    return ClassificationData(
        train_images,
        train_fine,
        val_images,
        val_fine,
        NUM_FINE,
        groups={"superclass": Groups(val_coarse, NUM_COARSE)},
    )
