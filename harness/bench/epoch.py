"""The epoch section: one CIFAR-100-sized epoch through the harness's own train loop (:func:`epoch_time`)."""

from __future__ import annotations

import time
from typing import Any

import torch

from .common import CIFAR_CLASSES, _sync


def epoch_time(device: torch.device, batch_size: int, train_images: int = 50_000, val_images: int = 10_000,
               overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """Seconds for one training epoch plus one evaluation of ``resnet18_moe`` (E=4, k=2, layer4, padded
    dispatch) through :func:`harness.loop.train_one_epoch` / :func:`harness.classification.evaluate` on a synthetic
    CIFAR-100-sized data set (uint8, GPU-resident on CUDA). The first epoch is a warm-up and not timed."""
    from ..config import RunConfig
    from ..data.base import ClassificationData
    from ..classification import TASK, build_model, evaluate
    from ..loop import build_optimizer, train_one_epoch, uses_channels_last
    from ..steps import Session

    generator = torch.Generator().manual_seed(0)
    data = ClassificationData(
        torch.randint(0, 256, (train_images, 3, 32, 32), dtype=torch.uint8, generator=generator),
        torch.randint(0, CIFAR_CLASSES, (train_images,), generator=generator),
        torch.randint(0, 256, (val_images, 3, 32, 32), dtype=torch.uint8, generator=generator),
        torch.randint(0, CIFAR_CLASSES, (val_images,), generator=generator),
        CIFAR_CLASSES,
    ).to(device)
    raw = {
        "model": {"name": "resnet18_moe"},
        "moe": {"num_experts": 4, "k": 2, "position": [4], "capacity_factor": 1.0, "dispatch": "padded",
                "expert_layout": "inner_narrow", "losses": {"importance": 0.5}},
        "data": {"name": "synthetic_cifar", "batch_size": batch_size, "val_batch_size": 1024},
        "train": {"device": device.type},
        "optim": {"name": "adam", "lr": 1e-3},
    }
    for key, value in (overrides or {}).items():
        raw[key].update(value)
    config = RunConfig.model_validate(raw)
    torch.manual_seed(0)
    model = build_model(config, data).to(device)
    if uses_channels_last(config, device):  # as train_loop lays it out
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    session = Session(device=device)
    timings: dict[str, float] = {}
    for epoch in (1, 2):
        _sync(device)
        start = time.perf_counter()
        train_one_epoch(TASK, model, optimizer, data, config, device, epoch, session)
        _sync(device)
        middle = time.perf_counter()
        evaluate(model, data, config, device, session)
        _sync(device)
        timings = {"train_s": middle - start, "eval_s": time.perf_counter() - middle}
    timings["epoch_s"] = timings["train_s"] + timings["eval_s"]
    timings.update(train_images=train_images, val_images=val_images, batch_size=batch_size)
    return timings
