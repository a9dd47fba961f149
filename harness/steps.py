"""What the training loop (:mod:`harness.loop`) and the two tasks (:mod:`harness.classification`,
:mod:`harness.detection`) share: the :class:`Session` (where this process sits in a run), the
:class:`Task` interface the loop drives, autocast, the optimizer step and the epoch's on-device tally.
They sit below the tasks and the loop, so imports run one way: steps <- tasks <- loop <- Ray Train / CLIs.
"""

from __future__ import annotations

import contextlib
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .config import RunConfig
from .errors import TrainingError
from .moe import Routing, update_balance_biases
from .moe.parallel import LOCAL, Collective, sync_gradients


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
        on_step: called with ``(epoch, step)`` (step from 1) before every training step (the
            fault-injection hook: tests kill a worker in the middle of an epoch with it).
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
    on_step: Callable[[int, int], None] | None = None
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
        evaluate: ``(model, data, config, device, session) -> metrics`` on the validation split.
        channels_last: whether ``train.channels_last`` applies (the classification models).
        to_device: ``(data, device) -> data`` where the step reads it (whole on the GPU where it fits;
            unchanged for tasks that move each batch).
    """

    load_data: Callable[[RunConfig], Any]
    build_model: Callable[[RunConfig, Any], nn.Module]
    train_batches: Callable[..., tuple[Iterator[Any], int]]
    forward: Callable[..., StepResult]
    evaluate: Callable[..., dict[str, Any]]
    finish_epoch: Callable[[dict[str, float]], dict[str, float]] = lambda metrics: metrics
    channels_last: bool = False
    to_device: Callable[[Any, torch.device], Any] = lambda data, device: data


def epoch_generator(config: RunConfig, epoch: int) -> torch.Generator:
    """The epoch's data order and augmentation: the same on every rank, and a function of (seed, epoch)
    only, so a run resumed from a checkpoint sees what an uninterrupted one would."""
    return torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)


def autocast_context(config: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA unless ``train.amp: off``; nothing on CPU unless ``amp: bf16``."""
    amp = config.train.amp
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, config: RunConfig, epoch: int, step: int,
                   session: Session) -> None:
    """Everything between ``backward`` and the next batch: gradient sync over ranks, optional clipping,
    the epoch-1 linear warm-up (``step`` counts from 0), the optimizer step, the balancing biases' update.
    ``session``: a :class:`Session` (its ``collective`` and ``expert_parallel``)."""
    sync_gradients(model, session.collective, session.expert_parallel)
    if config.optim.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm)
    warmup = config.schedule.warmup_steps
    if epoch == 1 and warmup:
        # Epoch 1 of every schedule runs at optim.lr; the per-epoch scheduler has not moved it yet.
        factor = min(1.0, (step + 1) / warmup)
        for group in optimizer.param_groups:
            group["lr"] = config.optim.lr * factor
    optimizer.step()
    update_balance_biases(model)


def raise_if_non_finite(window: list[torch.Tensor], epoch: int, steps_done: int, collective: Collective) -> None:
    """One host sync per window; the flags are summed over ranks so every rank stops together."""
    flags = collective.sum_((~torch.isfinite(torch.stack(window))).float())
    if bool(flags.any()):
        bad = int(flags.nonzero()[0, 0])
        step = steps_done - len(window) + bad + 1
        raise TrainingError(f"non-finite loss ({float(window[bad])}) at epoch {epoch} step {step}")


class EpochTally:
    """Per-step bookkeeping of one training epoch:
    loss sums, dropped tokens and counts (kept on the device, no host sync per step), and the window of
    losses checked for non-finite values every ``train.check_every`` steps."""

    def __init__(self, config: RunConfig, epoch: int, collective: Collective, device: torch.device) -> None:
        self.config, self.epoch, self.collective, self.device = config, epoch, collective, device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.dropped = torch.zeros((), device=device)
        self.window: list[torch.Tensor] = []
        self.steps = 0

    def add(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], routings: Iterable[Routing],
            counts: dict[str, torch.Tensor] | None = None) -> None:
        """One step: its total ``loss``, the named ``losses`` (averaged per step), the step's routings
        (dropped tokens) and ``counts`` (summed, e.g. correct predictions)."""
        for name, value in {"loss": loss, **losses}.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        for name, value in (counts or {}).items():
            self.counts[name] = self.counts.get(name, 0) + value.detach().float()
        for routing in routings:
            self.dropped += routing.dropped
        self.window.append(loss.detach().float())
        self.steps += 1
        if len(self.window) == self.config.train.check_every:
            raise_if_non_finite(self.window, self.epoch, self.steps, self.collective)
            self.window = []

    def finish(self, images_seen: int) -> dict[str, float]:
        """``train_<loss>`` means over all ranks' steps, ``train_images``, ``train_dropped_tokens`` and the
        summed counts (as ``train_<count>``, totals over ranks); ``images_seen`` is this rank's."""
        if self.window:
            raise_if_non_finite(self.window, self.epoch, self.steps, self.collective)
        names, count_names = sorted(self.sums), sorted(self.counts)
        stacked = [self.sums[n] for n in names] + [self.counts[n] for n in count_names]
        extra = [self.dropped, torch.tensor(float(self.steps), device=self.device)]
        totals = self.collective.sum_(torch.stack(stacked + extra))
        ranks_steps = float(totals[-1])
        metrics = {f"train_{name}": float(total) / max(ranks_steps, 1) for name, total in zip(names, totals)}
        metrics.update({f"train_{name}": float(totals[len(names) + i]) for i, name in enumerate(count_names)})
        metrics["train_images"] = float(images_seen * self.collective.world_size)
        metrics["train_dropped_tokens"] = float(totals[-2])
        return metrics
