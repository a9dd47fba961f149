"""The epoch section: one CIFAR-100-sized epoch through the harness's own train loop (:func:`epoch_time`)."""

from __future__ import annotations

import time
from typing import Any

import torch

from .common import CIFAR_CLASSES, _sync


def epoch_time(
    device: torch.device,
    batch_size: int,
    train_images: int = 50_000,
    val_images: int = 10_000,
    overrides: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Seconds for one training epoch plus one evaluation of ``resnet18_moe`` (E=4, k=2, layer4, padded
    dispatch) through :func:`harness.training.loop.train_one_epoch` /
    :func:`harness.tasks.classification.evaluate` on a synthetic CIFAR-100-sized data set (uint8,
    GPU-resident on CUDA), in the step mode ``train.step`` resolves to (``overrides={"train": {"step":
    ...}}``; auto: eager until the CUDA graph path is verified), recorded as ``step``. The first epoch
    is a warm-up (and the capture or compilation) and not timed."""
    from ..config import RunConfig
    from ..data.base import ClassificationData
    from ..tasks.base import Session
    from ..tasks.classification import TASK, build_model, evaluate
    from ..training.loop import build_optimizer, train_one_epoch, uses_channels_last
    from ..training.step_modes import build_step_runner

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
        "moe": {
            "num_experts": 4,
            "k": 2,
            "position": [4],
            "capacity_factor": 1.0,
            "dispatch": "padded",
            "losses": {"importance": 0.5},
        },
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
    runner = build_step_runner(TASK, model, optimizer, config, device, session)
    timings: dict[str, Any] = {}
    for epoch in (1, 2):
        _sync(device)
        start = time.perf_counter()
        train_one_epoch(TASK, model, optimizer, data, config, device, epoch, session, runner)
        _sync(device)
        middle = time.perf_counter()
        evaluate(runner.eval_model, data, config, device, session)
        _sync(device)
        timings = {"train_s": middle - start, "eval_s": time.perf_counter() - middle}
    timings["epoch_s"] = timings["train_s"] + timings["eval_s"]
    timings.update(train_images=train_images, val_images=val_images, batch_size=batch_size, step=runner.mode)
    return timings


def train_loop_epochs(
    device: torch.device,
    steps: tuple[str, ...] = ("eager", "graph", "compile"),
    epochs: int = 3,
    batch_size: int = 512,
    train_per_class: int = 500,
    test_per_class: int = 100,
    root: str = ".cache",
) -> dict[str, Any]:
    """Whole epochs through :func:`harness.training.loop.train_loop` (data, model, evaluation, reports) for each
    ``train.step`` in ``steps``: ``resnet18_moe`` E4 k2 L4 padded (capacity factor 1.0, noisy gate,
    importance loss 0.5, Adam) on generated CIFAR-100 (``train_per_class`` x 100 training images: 500 is
    CIFAR-100's size). Per step mode: the mode it ran in (``step_mode``; a fallback's log line in
    ``fallback``) and per epoch ``epoch_s``, ``train_s`` (from ``images_per_s``), the losses and
    ``val_top1``; epoch 1 holds the capture or compilation."""
    import logging

    from ..config import validate_run
    from ..training.loop import train_loop

    results: dict[str, Any] = {}
    for step in steps:
        config = validate_run(
            {
                "seed": 0,
                "data": {
                    "name": "synthetic_cifar",
                    "root": root,
                    "batch_size": batch_size,
                    "val_batch_size": 1024,
                    "synthetic": {"train_per_class": train_per_class, "test_per_class": test_per_class},
                },
                "model": {"name": "resnet18_moe"},
                "moe": {
                    "num_experts": 4,
                    "k": 2,
                    "position": [4],
                    "capacity_factor": 1.0,
                    "dispatch": "padded",
                    "gate": {"type": "gap_fc", "noisy": True},
                    "losses": {"importance": 0.5},
                },
                "optim": {"name": "adam", "lr": 1e-3},
                "train": {"epochs": epochs, "device": device.type, "step": step},
            }
        )
        records: list[str] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record, records=records: records.append(record.getMessage())  # type: ignore[method-assign]
        logger = logging.getLogger("harness.training.step_modes")
        logger.addHandler(handler)
        try:
            history = train_loop(config, lambda *_, **__: None)
        finally:
            logger.removeHandler(handler)
        results[step] = {
            "step_mode": "eager" if records else step,
            "fallback": records,
            "epochs": [
                {
                    "epoch": m["epoch"],
                    "epoch_s": m["epoch_s"],
                    "train_s": m["train_images"] / m["images_per_s"],
                    "train_images": m["train_images"],
                    "train_loss": m["train_loss"],
                    "val_loss": m["val_loss"],
                    "val_top1": m["val_top1"],
                }
                for m in history
            ],
        }
    return results
