"""The interface between the training loop and a task: the :class:`Session` (where this process sits in a
run), the :class:`Task` the loop drives and the :class:`StepResult` a task's forward returns, and what a
task's forward and evaluation use from the run (autocast, the epoch's generator, leaving a model's state
unchanged). Tasks build on this; the training loop (:mod:`harness.training`) drives them."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..moe import Routing
from ..moe.collective import LOCAL, Collective


@dataclass
class Session:
    """Where this process sits in a run. The defaults are one process; the Ray Train wrapper fills in the
    rest on every worker.

    Attributes:
        collective: the data-parallel group (identity in one process).
        expert_parallel: each rank holds only its share of every MoE layer's experts.
        device: overrides ``train.device`` (Ray Train assigns each worker its GPU).
        restore_dir: a checkpoint folder to resume from.
        checkpoint_every: write a checkpoint every this many epochs (and after the last); 0 = never.
        worker: facts for the placement record (``node_id``, ``gpu_id``).
        save_model: write the trained model's state_dict here after the last epoch (one process only).
        progress: wraps an epoch's batches as ``progress(batches, steps, epoch, epochs)`` (the CLI's
            progress bar); None = plain iteration.
    """

    collective: Collective = LOCAL
    expert_parallel: bool = False
    device: torch.device | None = None
    restore_dir: pathlib.Path | None = None
    checkpoint_every: int = 0
    worker: dict[str, Any] = field(default_factory=dict)
    save_model: pathlib.Path | None = None
    progress: Callable[[Iterable[Any], int, int, int], Iterable[Any]] | None = None


@dataclass(frozen=True)
class StepResult:
    """One training step's forward: ``losses`` (named scalars, summed into the loss), the MoE layers'
    ``routings`` (for dropped tokens) and ``counts`` (summed over the epoch, e.g. correct predictions)."""

    losses: dict[str, torch.Tensor]
    routings: list[Routing]
    counts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """What a task (classification, detection) gives the training loop; the loop owns the steps,
    checkpoints and reports.

    Attributes:
        load_data: ``(config) -> data`` in host memory.
        build_model: ``(config, data) -> model``.
        train_batches: ``(data, config, device, generator, collective) -> (batches, shard_size)``: this
            rank's training batches of the epoch (order and augmentation drawn from ``generator``, the
            same on every rank) and how many items its shard holds.
        forward: ``(model, batch, config, reduce) -> StepResult`` under autocast; ``reduce`` sums routing
            statistics over data-parallel ranks (None in one process).
        finish_epoch: turns the epoch's tallied ``train_*`` metrics into the reported ones.
        evaluate: ``(model, data, config, device, session, routing_top1=None) -> metrics`` on the validation
            split; a given ``routing_top1`` list receives each MoE layer's top-1 expert per validation token
            of this rank (``[N_rank]`` long), for the loop's routing fluctuation.
        channels_last: whether ``train.channels_last`` applies (the classification models).
        to_device: ``(data, device) -> data`` where the step reads it (whole on the GPU where it fits;
            unchanged for tasks that move each batch).
        counts_after_step: ``(model, batch, config, device) -> counts``: the step's counts recomputed by a
            second forward after the optimizer step (``train.train_accuracy: after_step``); None = the task
            has none.
    """

    load_data: Callable[[RunConfig], Any]
    build_model: Callable[[RunConfig, Any], nn.Module]
    train_batches: Callable[..., tuple[Iterator[Any], int]]
    forward: Callable[..., StepResult]
    evaluate: Callable[..., dict[str, Any]]
    finish_epoch: Callable[[dict[str, float]], dict[str, float]] = lambda metrics: metrics
    channels_last: bool = False
    to_device: Callable[[Any, torch.device], Any] = lambda data, device: data
    counts_after_step: Callable[..., dict[str, torch.Tensor]] | None = None


@contextlib.contextmanager
def state_left_unchanged(model: nn.Module, device: torch.device) -> Iterator[None]:
    """A forward in training mode that changes nothing: every buffer (BatchNorm statistics, hard-constraint
    state, pending balancing loads) is put back afterwards, and the random generators (gate noise) too."""
    saved = [buffer.clone() for buffer in model.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in zip(model.buffers(), saved):
                    buffer.copy_(value)


def epoch_generator(config: RunConfig, epoch: int) -> torch.Generator:
    """The epoch's data order and augmentation: the same on every rank, and a function of (seed, epoch)
    only, so a run resumed from a checkpoint sees what an uninterrupted one would."""
    return torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)


def autocast_context(
    config: RunConfig, device: torch.device, cache_enabled: bool = True
) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA unless ``train.amp: off``; nothing on CPU unless ``amp: bf16``. A CUDA graph
    capture passes ``cache_enabled=False``: autocast's cache of cast weights must not outlive it."""
    amp = config.train.amp
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return contextlib.nullcontext()
