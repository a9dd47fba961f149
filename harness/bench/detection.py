"""The detection section: RetinaNet against RetinaNet-MoE heads (:func:`detection_throughput`)."""

from __future__ import annotations

import time

import torch

from ..models import create_model
from ..moe.balancing import AuxWeights
from .common import _autocast, _peak_memory_mib, _peak_memory_reset, _sync


def detection_throughput(
    moe: bool, device: torch.device, batch_size: int, image_size: int, steps: int, backbone: str
) -> tuple[float, float]:
    """``(images/s, peak MiB)`` of training torchvision RetinaNet (dense) or RetinaNet-MoE (both head
    subnets E=4, k=2, padded dispatch, capacity factor 1.0) on random images with three boxes each."""
    _peak_memory_reset(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    options = dict(num_classes=81, backbone=backbone, min_size=image_size, max_size=image_size)
    if moe:
        options.update(
            num_experts=4, k=2, capacity_factor=1.0, dispatch="padded", aux_weights=AuxWeights(importance=0.5)
        )
    model = create_model("retinanet_moe" if moe else "retinanet", **options).to(device)
    images = [torch.rand(3, image_size, image_size, device=device) for _ in range(batch_size)]
    boxes = torch.tensor([[10.0, 20, 40, 50], [60, 60, 160, 200], [5, 100, 250, 250]], device=device) * image_size / 256
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2, 3], device=device)} for _ in range(batch_size)]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()

    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start), _peak_memory_mib(device)
