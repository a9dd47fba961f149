"""In-memory image classification splits and a batch iterator with GPU-friendly augmentation."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch

T = TypeVar("T")


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

    def to(self, device: torch.device | str) -> ClassificationData:
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


def normalize(
    images: torch.Tensor, mean: tuple[float, ...] | torch.Tensor, std: tuple[float, ...] | torch.Tensor
) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float ``[N, C, H, W]`` standardised per channel (``mean``, ``std``: ``[C]``;
    pass tensors already on the device to spare a copy from the host per call)."""
    mean_t = torch.as_tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, device=images.device).view(1, -1, 1, 1)
    # The default dtype (float32; float64 in the equivalence tests, torch.set_default_dtype).
    return (images.to(torch.get_default_dtype()).div_(255) - mean_t) / std_t


def crop_flip_draws(n: int, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The random numbers of :func:`random_crop_flip` for a batch of ``n``, drawn in its order: ``[3, n]``
    long (row offset, column offset, flip 0/1)."""
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.stack([dy, dx, flip.long()])


def crop_flip(images: torch.Tensor, draws: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Zero-pad, crop back to size at the drawn offsets, flip where drawn: ``images: [N, C, H, W]``,
    ``draws: [3, N]`` from :func:`crop_flip_draws`, on the images' device -> ``[N, C, H, W]``."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = draws[0, :, None] + torch.arange(h, device=images.device)[None, :]  # [N, H]
    cols = draws[1, :, None] + torch.arange(w, device=images.device)[None, :]  # [N, W]
    batch = torch.arange(n, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return torch.where(draws[2, :, None, None, None].bool(), cropped.flip(3), cropped)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch: zero-pad, random crop back to size, random horizontal flip.
    ``[N, C, H, W] -> [N, C, H, W]``."""
    return crop_flip(images, crop_flip_draws(images.shape[0], generator, padding).to(images.device), padding)


def to_device_early(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device`` without the host waiting: through pinned memory, asynchronously,
    when ``device`` is a GPU (the copy queues behind the work already sent; a plain copy would wait for it)."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def shard_indices(num_items: int, rank: int, world_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """This rank's share of ``0..num_items-1`` for one training epoch, like ``DistributedSampler``: one
    permutation (the same on every rank: same generator seed) padded by wrapping around to a multiple of
    the world size, then every ``world_size``-th item. All ranks get the same count. ``-> [ceil(n / W)]``."""
    order = torch.randperm(num_items, generator=generator) if generator is not None else torch.arange(num_items)
    padded = -(-num_items // world_size) * world_size
    order = order[torch.arange(padded) % num_items]  # wraps as often as needed: more ranks than items too
    return order[rank::world_size]


def sorted_groups(keys: torch.Tensor, group_size: int) -> torch.Tensor:
    """Items sorted by ``keys`` (stable: equal keys keep index order) and cut into consecutive groups of
    ``group_size``; the last group is filled up from the start of the sorted order, so every group is
    full (an item may then sit in two groups). ``keys: [N]`` -> ``[ceil(N / group_size), group_size]``
    long indices."""
    num_items = keys.numel()
    order = torch.sort(keys, stable=True).indices
    num_groups = -(-num_items // group_size)
    return order[torch.arange(num_groups * group_size) % num_items].view(num_groups, group_size)


def shard_groups(
    groups: torch.Tensor, rank: int, world_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """This rank's whole groups for one training epoch, flattened: :func:`shard_indices` over the rows of
    ``groups`` (their order shuffled by ``generator``, the same on every rank; rank r takes the r-th, the
    (r + W)-th, ... group), so groups stay whole and all ranks get the same count. ``groups: [G, B]`` ->
    ``[ceil(G / W) * B]``."""
    return groups[shard_indices(groups.shape[0], rank, world_size, generator)].flatten()


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
    order, with random crop + flip when an ``augment_generator`` is given.

    No host-to-device copy per batch (with the data on the GPU, nothing makes the host wait for it): the
    indices, the epoch's augmentation draws (drawn up front batch by batch, the numbers
    :func:`random_crop_flip` would draw) and the normalisation constants go to the device once."""
    device = torch.device(device)
    index = to_device_early(indices, images.device)
    draws = None
    if augment_generator is not None:
        starts = range(0, indices.numel(), batch_size)
        per_batch = [crop_flip_draws(min(batch_size, indices.numel() - start), augment_generator) for start in starts]
        draws = to_device_early(torch.cat(per_batch, dim=1), device) if per_batch else None
    mean_t, std_t = to_device_early(torch.tensor(mean), device), to_device_early(torch.tensor(std), device)
    for start in range(0, indices.numel(), batch_size):
        idx = index[start : start + batch_size]
        batch = images[idx].to(device, non_blocking=True)
        if draws is not None:
            batch = crop_flip(batch, draws[:, start : start + batch_size])
        yield normalize(batch, mean_t, std_t), labels[idx].to(device, non_blocking=True)


def prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """``items`` in order, produced up to ``depth`` ahead by a background thread (image decoding, pinning)
    while the caller trains on the current one. An exception the producer raises is raised here, at its
    place in the order; leaving early (``close()`` or garbage collection) stops the producer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple) -> bool:
        while not stop.is_set():  # a consumer that left never takes another item: do not wait for it
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((done, exc))

    thread = threading.Thread(target=produce, name="harness-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
