"""What the training loop (:mod:`harness.loop`) and the two tasks (:mod:`harness.classification`,
:mod:`harness.detection`) share: the :class:`Session` (where this process sits in a run), the
:class:`Task` interface the loop drives, autocast, the optimizer step and the epoch's on-device tally.
They sit below the tasks and the loop, so imports run one way: steps <- tasks <- loop <- Ray Train / CLIs.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import RunConfig
from .errors import TrainingError
from .moe import Routing, update_balance_biases
from .moe.collective import LOCAL, Collective
from .moe.parallel import sync_gradients
from .precision import at_least_float32


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
        evaluate: ``(model, data, config, device, session) -> metrics`` on the validation split.
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


def warmup_lr(optimizer: torch.optim.Optimizer, config: RunConfig, epoch: int, step: int) -> None:
    """The epoch-1 linear warm-up over ``schedule.warmup_steps`` (``step`` counts from 0): sets every
    group's ``lr``; nothing after it or in later epochs."""
    warmup = config.schedule.warmup_steps
    if epoch == 1 and warmup:
        # Epoch 1 of every schedule runs at optim.lr; the per-epoch scheduler has not moved it yet.
        factor = min(1.0, (step + 1) / warmup)
        for group in optimizer.param_groups:
            group["lr"] = config.optim.lr * factor


def optimizer_update(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: RunConfig, session: Session, idle_rule: bool = True
) -> None:
    """Gradient sync over ranks, optional clipping, the optimizer step and the balancing biases' update.
    ``session``: a :class:`Session` (its ``collective`` and ``expert_parallel``); ``idle_rule``: experts
    that got no token in the step get no update (:func:`~harness.moe.parallel.sync_gradients`; one host
    read when routing is sparse); without it the update is device work only, so a CUDA graph can hold it."""
    sync_gradients(model, session.collective, session.expert_parallel, idle_rule)
    if config.optim.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm)
    optimizer.step()
    update_balance_biases(model)


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: RunConfig,
    epoch: int,
    step: int,
    session: Session,
    idle_rule: bool = True,
) -> None:
    """Everything between ``backward`` and the next batch: :func:`warmup_lr` (``step`` counts from 0),
    then :func:`optimizer_update`."""
    warmup_lr(optimizer, config, epoch, step)
    optimizer_update(model, optimizer, config, session, idle_rule)


def raise_if_non_finite(flags: torch.Tensor, values: torch.Tensor, epoch: int, steps_done: int) -> None:
    """``flags: [W]`` (non-zero where the step's loss was not finite on some rank), ``values: [W]`` the
    window's losses, the last of them step ``steps_done``: a :class:`TrainingError` naming the first bad
    step."""
    if bool(flags.any()):
        bad = int(flags.nonzero()[0, 0])
        step = steps_done - len(values) + bad + 1
        raise TrainingError(f"non-finite loss ({float(values[bad])}) at epoch {epoch} step {step}")


class EpochTally:
    """Per-step bookkeeping of one training epoch:
    loss sums, dropped tokens and counts (kept on the device, no host read per step; :meth:`finish` reads
    them once), and the window of losses checked for non-finite values every ``train.check_every`` steps.

    ``lagged`` (default: on CUDA) checks a window when the next one closes (or at :meth:`finish`), from a
    copy started when it closed, so the host never waits for the device mid-epoch; without it (CPU, where
    the host is the device) each window is checked as it closes. The error names the step either way."""

    def __init__(
        self, config: RunConfig, epoch: int, collective: Collective, device: torch.device, lagged: bool | None = None
    ) -> None:
        self.config, self.epoch, self.collective, self.device = config, epoch, collective, device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.dropped = torch.zeros((), device=device)
        # The window's losses are copied in: a CUDA graph's loss is one tensor, overwritten every replay.
        self.window = torch.zeros(config.train.check_every, device=device)
        self.in_window = 0
        self.lagged = device.type == "cuda" if lagged is None else lagged
        self.pending: tuple[torch.Tensor, torch.Tensor, int, Any] | None = None
        self.steps = 0

    def add(
        self,
        loss: torch.Tensor,
        losses: dict[str, torch.Tensor],
        routings: Iterable[Routing],
        counts: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """One step: its total ``loss``, the named ``losses`` (averaged per step), the step's routings
        (dropped tokens) and ``counts`` (summed, e.g. correct predictions)."""
        for name, value in {"loss": loss, **losses}.items():
            self.sums[name] = self.sums.get(name, 0) + at_least_float32(value.detach())  # float64 runs stay float64
        for name, value in (counts or {}).items():
            self.counts[name] = self.counts.get(name, 0) + at_least_float32(value.detach())
        for routing in routings:
            self.dropped += routing.dropped
        self.window[self.in_window] = loss.detach().float()
        self.in_window += 1
        self.steps += 1
        if self.in_window == len(self.window):
            self._close_window()

    def _close_window(self) -> None:
        """Flag the window's non-finite losses (summed over ranks, so every rank stops together) and check
        them now, or, ``lagged``, check the previous window and start copying this one's flags."""
        values = self.window[: self.in_window].clone()
        flags = self.collective.sum_((~torch.isfinite(values)).float())
        self.in_window = 0
        if not self.lagged:
            raise_if_non_finite(flags, values, self.epoch, self.steps)
            return
        self._check_pending()
        cuda = self.device.type == "cuda"
        host = torch.empty(flags.shape, pin_memory=cuda)
        host.copy_(flags, non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        self.pending = (host, values, self.steps, event)

    def _check_pending(self) -> None:
        if self.pending is not None:
            host, values, steps_done, event = self.pending
            self.pending = None
            if event is not None:
                event.synchronize()  # long done by now: the device has run a window of steps since
            raise_if_non_finite(host, values, self.epoch, steps_done)

    def finish(self, images_seen: int) -> dict[str, float]:
        """``train_<loss>`` means over all ranks' steps, ``train_images``, ``train_dropped_tokens`` and the
        summed counts (as ``train_<count>``, totals over ranks); ``images_seen`` is this rank's."""
        if self.in_window:
            self._close_window()
        self._check_pending()
        names, count_names = sorted(self.sums), sorted(self.counts)
        stacked = [self.sums[n] for n in names] + [self.counts[n] for n in count_names]
        extra = [self.dropped, torch.full((), float(self.steps), device=self.device)]
        totals = self.collective.sum_(torch.stack(stacked + extra))
        ranks_steps = float(totals[-1])
        metrics = {f"train_{name}": float(total) / max(ranks_steps, 1) for name, total in zip(names, totals)}
        metrics.update({f"train_{name}": float(totals[len(names) + i]) for i, name in enumerate(count_names)})
        metrics["train_images"] = float(images_seen * self.collective.world_size)
        metrics["train_dropped_tokens"] = float(totals[-2])
        return metrics
