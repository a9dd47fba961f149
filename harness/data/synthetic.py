"""``synthetic_cifar``: a deterministic CIFAR-100 look-alike written in the official pickle format, so the
real loader (:func:`harness.data.cifar.load_cifar100`) reads it unchanged.

20 superclasses x 5 classes. A superclass fixes the background colour and the orientation of a grating;
its 5 classes differ in the grating's frequency and tint. Superclass is therefore easy and shared visual
structure inside a superclass makes expert specialization learnable and measurable. Each image has a
random phase and pixel noise.
"""

from __future__ import annotations

import math
import os
import pathlib
import pickle
import shutil
import tempfile

import numpy as np

from .cifar import NUM_COARSE

CLASSES_PER_SUPERCLASS = 5


def _images(coarse: np.ndarray, fine_in_super: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[N]`` superclass and within-superclass ids -> uint8 ``[N, 3072]`` in CIFAR's channel-major order."""
    palette = np.random.default_rng(1234).uniform(0.15, 0.85, size=(NUM_COARSE, 3))
    tints = np.random.default_rng(4321).uniform(-1.0, 1.0, size=(CLASSES_PER_SUPERCLASS, 3))
    n = coarse.shape[0]
    y, x = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    theta = coarse * math.pi / NUM_COARSE  # [N]
    freq = 1.5 + 1.0 * fine_in_super  # cycles per image
    phase = rng.uniform(0, 2 * math.pi, size=n)
    coord = x[None] * np.cos(theta)[:, None, None] + y[None] * np.sin(theta)[:, None, None]
    wave = np.sin(2 * math.pi * freq[:, None, None] * coord / 32 + phase[:, None, None])  # [N, 32, 32]
    colour = 0.6 * palette[coarse][:, :, None, None] + 0.2 * tints[fine_in_super][:, :, None, None] * wave[:, None]
    image = colour + 0.15 * wave[:, None] + rng.normal(0, 0.08, size=(n, 3, 32, 32))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8).reshape(n, 3 * 32 * 32)


def _split(per_class: int, rng: np.random.Generator, name: str) -> dict:
    fine = np.repeat(np.arange(NUM_COARSE * CLASSES_PER_SUPERCLASS), per_class)
    fine = fine[rng.permutation(fine.shape[0])]
    coarse = fine // CLASSES_PER_SUPERCLASS
    data = _images(coarse, fine % CLASSES_PER_SUPERCLASS, rng)
    # The official files use bytes keys (they were pickled by Python 2); so do we.
    return {
        b"batch_label": name.encode(),
        b"filenames": [f"synthetic_{i:06d}.png".encode() for i in range(fine.shape[0])],
        b"fine_labels": fine.tolist(),
        b"coarse_labels": coarse.tolist(),
        b"data": data,
    }


def write_synthetic_cifar(
    root: str | pathlib.Path, train_per_class: int = 50, test_per_class: int = 10, seed: int = 0
) -> pathlib.Path:
    """Write ``<root>/cifar-100-python/{train,test,meta}`` unless present; return the ``cifar-100-python``
    folder. The folder appears atomically (written aside, then renamed), so a crash leaves no half set."""
    target = pathlib.Path(root) / "cifar-100-python"
    if (target / "meta").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".synthetic-", dir=target.parent))
    try:
        for name, per_class in (("train", train_per_class), ("test", test_per_class)):
            with open(staging / name, "wb") as f:
                pickle.dump(_split(per_class, rng, f"synthetic {name}"), f, protocol=2)
        meta = {
            b"fine_label_names": [f"class_{i:02d}".encode() for i in range(NUM_COARSE * CLASSES_PER_SUPERCLASS)],
            b"coarse_label_names": [f"superclass_{i:02d}".encode() for i in range(NUM_COARSE)],
        }
        with open(staging / "meta", "wb") as f:
            pickle.dump(meta, f, protocol=2)
        try:
            os.rename(staging, target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "meta").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def synthetic_cifar_root(
    cache_dir: str | pathlib.Path, train_per_class: int, test_per_class: int, seed: int
) -> pathlib.Path:
    """Cache folder for one synthetic configuration (different sizes never share files)."""
    return pathlib.Path(cache_dir) / f"synthetic_cifar_{train_per_class}x{test_per_class}_seed{seed}"
