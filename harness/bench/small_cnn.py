"""The small-CNN section: one epoch of Krishnamurthy's MNIST MoE (``search_spaces/mnist.yaml``: classic
gate, E = 5, batch 512; 60,000 training and 10,000 test images) three ways, one after the other:

- ``plain``: a plain PyTorch loop written here, as the reference code runs it: a gate network and five
  expert modules (``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.Linear``), each expert called in turn, the
  probabilities mixed, NLL of their log, Adam; the test set evaluated in one batch;
- ``harness modules``: the harness's own epoch (:func:`harness.training.loop.train_one_epoch` and the task's
  evaluation, every metric) with ``model.expert_execution: modules`` (expert by expert);
- ``harness stacked``: the same with the default ``stacked`` execution (the five experts as one network).

On these tiny experts a step is overhead- and memory-bound, so the figures are CPU-meaningful (unlike the
ResNet sections). With the real MNIST absent, generated images of its size stand in (the timing does not
depend on the pixels).
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import _sync

STUDY = pathlib.Path(__file__).resolve().parents[2] / "search_spaces" / "mnist.yaml"


class _PlainMoE(nn.Module):
    """The reference notebook's model in plain PyTorch: ``[N, 1, 28, 28] -> mixture probabilities [N, 10]``."""

    def __init__(self, num_experts: int = 5) -> None:
        super().__init__()

        def tower(fc: tuple[int, ...]) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(1, 1, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
            width = 169
            for out in fc:
                layers += [nn.Linear(width, out), nn.ReLU()]
                width = out
            return layers

        self.gate = nn.Sequential(*tower((128, 32)), nn.Linear(32, num_experts), nn.Softmax(dim=1))
        self.experts = nn.ModuleList(
            nn.Sequential(*tower((5, 32)), nn.Linear(32, 10), nn.Softmax(dim=1)) for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gate(x)
        outputs = torch.stack([expert(x) for expert in self.experts], dim=1)
        return (gates.unsqueeze(2) * outputs).sum(dim=1)


def _data(mnist_root: str | pathlib.Path, generator: torch.Generator):
    from ..data import ClassificationData, load_mnist

    root = pathlib.Path(mnist_root)
    if (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        return load_mnist(root), "MNIST"
    images = torch.randint(0, 256, (70_000, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (70_000,), generator=generator)
    return ClassificationData(images[:60_000], labels[:60_000], images[60_000:], labels[60_000:], 10), "generated"


def _plain_epoch(data: Any, device: torch.device, batch_size: int, generator: torch.Generator) -> dict[str, float]:
    """One epoch of :class:`_PlainMoE`: training (shuffled batches, normalised on the fly) + evaluation."""
    torch.manual_seed(0)
    model = _PlainMoE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    mean, std = 0.1307, 0.3081
    train_x, train_y = data.train_images.to(device), data.train_labels.to(device)
    _sync(device)
    start = time.perf_counter()
    order = torch.randperm(train_x.shape[0], generator=generator).to(device)
    for first in range(0, train_x.shape[0], batch_size):
        idx = order[first : first + batch_size]
        images = (train_x[idx].float() / 255 - mean) / std
        loss = F.nll_loss(torch.log(model(images) + 1e-7), train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    middle = time.perf_counter()
    with torch.no_grad():
        images = (data.val_images.to(device).float() / 255 - mean) / std
        (model(images).argmax(dim=1) == data.val_labels.to(device)).float().mean().item()
    _sync(device)
    return {"train_s": middle - start, "eval_s": time.perf_counter() - middle}


def _harness_epoch(data: Any, device: torch.device, execution: str, mnist_root: str) -> dict[str, float]:
    """One epoch of ``search_spaces/mnist.yaml``'s base run through the harness's epoch and evaluation."""
    from ..config.study import read_yaml, validate_run
    from ..data import with_normalisation
    from ..tasks.base import Session
    from ..tasks.classification import TASK
    from ..training.loop import build_optimizer, place_model, train_one_epoch
    from ..training.step_modes import build_step_runner

    base = read_yaml(STUDY)["base"]
    base["data"]["root"] = str(mnist_root)
    base["model"]["expert_execution"] = execution
    base["train"] = {**base["train"], "device": device.type, "step": "eager"}
    config = validate_run(base)
    torch.manual_seed(0)
    task_data = TASK.to_device(with_normalisation(data, config.data), device)
    model = place_model(TASK, TASK.build_model(config, task_data), config, device)
    optimizer = build_optimizer(config, model)
    session = Session(device=device)
    runner = build_step_runner(TASK, model, optimizer, config, device, session)
    _sync(device)
    start = time.perf_counter()
    train_one_epoch(TASK, model, optimizer, task_data, config, device, 1, session, runner)
    _sync(device)
    middle = time.perf_counter()
    TASK.evaluate(runner.eval_model, task_data, config, device, session)
    _sync(device)
    return {"train_s": middle - start, "eval_s": time.perf_counter() - middle}


def small_cnn_epoch_times(
    device: torch.device,
    mnist_root: str = "../shared/data/mnist",
    batch_size: int = 512,
    train_images: int | None = None,
) -> dict[str, Any]:
    """Seconds of one epoch (``train_s``, ``eval_s``, ``epoch_s``) for ``plain``, ``harness modules`` and
    ``harness stacked`` (see the module docstring), run one after the other on the same data; ``data``
    says whether it was the real MNIST; ``speedup`` = plain / harness stacked. ``train_images``: the first
    this many training images and a sixth as many test images (a quick check; None = all 60,000 + 10,000)."""
    generator = torch.Generator().manual_seed(0)
    data, source = _data(mnist_root, generator)
    if train_images is not None:
        data = type(data)(
            data.train_images[:train_images],
            data.train_labels[:train_images],
            data.val_images[: max(1, train_images // 6)],
            data.val_labels[: max(1, train_images // 6)],
            data.num_classes,
        )
    times = {
        "plain": _plain_epoch(data, device, batch_size, generator),
        "harness modules": _harness_epoch(data, device, "modules", mnist_root),
        "harness stacked": _harness_epoch(data, device, "stacked", mnist_root),
    }
    for timing in times.values():
        timing["epoch_s"] = timing["train_s"] + timing["eval_s"]
    return {
        "data": source,
        "train_images": int(data.train_images.shape[0]),
        "val_images": int(data.val_images.shape[0]),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "epochs": times,
        "speedup": times["plain"]["epoch_s"] / times["harness stacked"]["epoch_s"],
    }


def format_small_cnn(result: dict[str, Any]) -> str:
    """The section's markdown table."""
    lines = [
        f"small CNN MoE (Krishnamurthy MNIST, classic gate, E = 5), one epoch: {result['train_images']} train + "
        f"{result['val_images']} test images ({result['data']}), batch {result['batch_size']}, "
        f"{result['threads']} threads",
        "",
        "| execution | train s | eval s | epoch s | vs plain loop |",
        "|---|---|---|---|---|",
    ]
    plain = result["epochs"]["plain"]["epoch_s"]
    for name, t in result["epochs"].items():
        lines.append(
            f"| {name} | {t['train_s']:.2f} | {t['eval_s']:.2f} | {t['epoch_s']:.2f} | x{plain / t['epoch_s']:.2f} |"
        )
    return "\n".join(lines)
