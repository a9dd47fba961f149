"""In-memory image classification splits and a batch iterator with GPU-friendly augmentation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class Groups:
    """A second labelling of the validation images (e.g. CIFAR-100 superclasses) for specialization metrics.
    ``labels: [N_val]`` long in ``0..num_groups-1``."""

    labels: torch.Tensor
    num_groups: int


@dataclass
class ClassificationData:
    """Train and validation images as uint8 ``[N, C, H, W]`` with long labels ``[N]``.

    ``mean``/``std`` (per channel, in 0..1 units) are computed from the training images; ``groups`` holds
    extra validation labellings keyed by name (``"superclass"``).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int
    groups: dict[str, Groups] = field(default_factory=dict)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.mean:
            pixels = self.train_images.float().div(255).transpose(0, 1).flatten(1)  # [C, N*H*W]
            self.mean = tuple(pixels.mean(dim=1).tolist())
            self.std = tuple(pixels.std(dim=1).clamp_min(1e-3).tolist())

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    def to(self, device: torch.device | str) -> "ClassificationData":
        """The same splits with every tensor on ``device`` (GPU-resident data: uint8 images, ~150 MB for
        CIFAR; batches are then cut and augmented on the device with no host copy)."""
        return ClassificationData(
            self.train_images.to(device),
            self.train_labels.to(device),
            self.val_images.to(device),
            self.val_labels.to(device),
            self.num_classes,
            {name: Groups(g.labels.to(device), g.num_groups) for name, g in self.groups.items()},
            self.mean,
            self.std,
        )


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float ``[N, C, H, W]`` standardised per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float().div_(255) - mean_t) / std_t


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch: zero-pad, random crop back to size, random horizontal flip.
    ``[N, C, H, W] -> [N, C, H, W]``."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(images.device)  # [N, H]
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(images.device)  # [N, W]
    batch = torch.arange(n, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def shard_indices(num_items: int, rank: int, world_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """This rank's share of ``0..num_items-1`` for one training epoch, like ``DistributedSampler``: one
    permutation (the same on every rank: same generator seed) padded by wrapping around to a multiple of
    the world size, then every ``world_size``-th item. All ranks get the same count. ``-> [ceil(n / W)]``."""
    order = torch.randperm(num_items, generator=generator) if generator is not None else torch.arange(num_items)
    padded = -(-num_items // world_size) * world_size
    order = torch.cat([order, order[: padded - num_items]])
    return order[rank::world_size]


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    batch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str = "cpu",
    augment_generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised ``(images [B, C, H, W] float, labels [B] long)`` on ``device`` for ``indices`` in
    order, with random crop + flip when an ``augment_generator`` is given."""
    for start in range(0, indices.numel(), batch_size):
        idx = indices[start : start + batch_size]
        batch = images[idx].to(device, non_blocking=True)
        if augment_generator is not None:
            batch = random_crop_flip(batch, augment_generator)
        yield normalize(batch, mean, std), labels[idx].to(device, non_blocking=True)
