"""The per-step pieces both tasks' training loops share (classification in :mod:`harness.train`, detection
in :mod:`harness.detection`): autocast, the optimizer step, and the epoch's on-device tally. They sit
below both, so neither task imports the other's module.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
from torch import nn

from .config import RunConfig
from .errors import TrainingError
from .moe import Routing, update_balance_biases
from .moe.parallel import Collective, sync_gradients


def autocast_context(config: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA unless ``train.amp: off``; nothing on CPU unless ``amp: bf16``."""
    amp = config.train.amp
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, config: RunConfig, epoch: int, step: int,
                   session: Any) -> None:
    """Everything between ``backward`` and the next batch: gradient sync over ranks, optional clipping,
    the epoch-1 linear warm-up (``step`` counts from 0), the optimizer step, the balancing biases' update.
    ``session``: a :class:`harness.train.Session` (its ``collective`` and ``expert_parallel``)."""
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
    """Per-step bookkeeping of one training epoch, shared by the classification and detection loops:
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
