"""The training step's shared parts: the learning-rate warm-up, the optimizer update (gradient sync over
ranks, clipping, the step, the balancing biases) and the epoch's on-device tally. The task interface they
serve (:class:`~harness.tasks.base.Session`, :class:`~harness.tasks.base.Task`) lives in
:mod:`harness.tasks.base`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..errors import TrainingError
from ..moe import Routing, update_balance_biases
from ..moe.collective import Collective
from ..moe.parallel import sync_gradients
from ..precision import at_least_float32
from ..tasks.base import Session


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
