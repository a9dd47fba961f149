"""The training loop: ``train_loop(config, report)`` in plain PyTorch, one loop for every task (Ray Train
wraps it; the CLIs call it).

Read top to bottom: pick the task -> build data, model, optimizer, scheduler (restore a checkpoint) -> per
epoch: train (the task's losses summed into one loss; sync, clip, warm up, step) -> evaluate -> report
flat metrics (with a checkpoint folder on checkpoint epochs).
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import DETECTION_DATASETS, RunConfig
from ..errors import HarnessError
from ..metrics import routing_fluctuation
from ..models.weights import freeze_parameters, set_train_mode
from ..moe.parallel import moe_layers, set_collective, shard_experts, sync_buffers
from ..tasks import classification, detection
from ..tasks.base import Session, Task, epoch_generator
from .checkpoints import load_checkpoint, save_checkpoint, save_model_file
from .step_modes import EagerStep, build_step_runner
from .steps import EpochTally

# report(metrics) after every epoch; report(metrics, checkpoint_dir=folder) on checkpoint epochs.
Report = Callable[..., None]


def task_for(config: RunConfig) -> Task:
    """The task that trains ``config``: detection for the COCO data sets, else classification."""
    return detection.TASK if config.data.name in DETECTION_DATASETS else classification.TASK


def resolve_device(config: RunConfig) -> torch.device:
    """``train.device``: ``auto`` picks CUDA when available."""
    wanted = config.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise HarnessError("train.device: cuda requested but no CUDA device is available")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def uses_channels_last(config: RunConfig, device: torch.device) -> bool:
    """``train.channels_last`` resolved: ``auto`` is on for CUDA, where bf16 convolutions run on tensor
    cores in NHWC (an NCHW model pays a layout conversion around each one), and off elsewhere."""
    wanted = config.train.channels_last
    return device.type == "cuda" if wanted == "auto" else wanted


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``optim`` names over the model's parameters; Adam and AdamW in PyTorch's fused
    implementation where it has one for them (see :func:`fused_options`)."""
    o = config.optim
    params = [p for p in model.parameters() if p.requires_grad]  # train.freeze leaves the rest out
    if o.name == "sgd":
        # Not fused: fused SGD with momentum fails (torch 2.14) once a parameter gets its first gradient
        # after step 1, which is every MoE expert that received no token in the first batch.
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, **fused_options(params))
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **fused_options(params))


def fused_options(params: list[torch.Tensor]) -> dict[str, bool]:
    """``{"fused": True}`` when every parameter is a floating-point tensor on CPU or CUDA, else ``{}``.

    The fused Adam step is one kernel per device and dtype (CUDA) or one vectorised loop (CPU) instead of
    a dozen foreach passes, with no step-sized temporaries: over resnet18_moe's 33M parameters (E=10 at
    layer4) it took 44 ms vs 133 ms foreach on 2 CPU threads. Its step counter lives on the device, so it
    can be captured in a CUDA graph. Same update up to float rounding (tested)."""
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return {"fused": True}
    return {}


def build_lr_scheduler(
    config: RunConfig, optimizer: torch.optim.Optimizer, epochs_done: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch; fast-forwarded ``epochs_done`` epochs when resuming (the schedules are
    functions of the epoch, so this restores them exactly)."""
    s = config.schedule
    if s.name == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=s.milestones, gamma=s.gamma)
    elif s.name == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.train.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    for _ in range(epochs_done):
        optimizer.step()  # no gradients: only keeps PyTorch from warning about the order of calls
        scheduler.step()
    return scheduler


def train_one_epoch(
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Any,
    config: RunConfig,
    device: torch.device,
    epoch: int,
    session: Session,
    runner: EagerStep | None = None,
) -> dict[str, float]:
    """One pass over this rank's shard of the training split: per batch one step of ``runner`` (the task's
    losses summed into one loss, backward, optimizer step; eager, compiled or a CUDA graph's replay, see
    :mod:`harness.training.step_modes`; default: eager). Returns the mean losses over all ranks (``train_loss``,
    ``train_<name>``), the images trained on and tokens dropped by all ranks, and what the task adds; the
    host reads the epoch's tallies once, at its end."""
    runner = runner or EagerStep(task, model, optimizer, config, device, session)
    set_train_mode(model, config.train.frozen_bn)
    collective = session.collective
    batches, shard_size = task.train_batches(data, config, device, epoch_generator(config, epoch), collective)
    tally = EpochTally(config, epoch, collective, device)
    if session.progress is not None:
        steps = -(-shard_size // config.data.batch_size)
        if config.train.max_steps_per_epoch is not None:
            steps = min(steps, config.train.max_steps_per_epoch)
        batches = session.progress(batches, steps, epoch, config.train.epochs)
    for batch in batches:
        if config.train.max_steps_per_epoch is not None and tally.steps >= config.train.max_steps_per_epoch:
            break
        done = runner(batch, epoch, tally.steps)
        if done is None:  # a CUDA graph skips a smaller last batch
            continue
        loss, step = done
        counts = step.counts
        if config.train.train_accuracy == "after_step" and task.counts_after_step is not None:
            # Krishnamurthy's code: the batch's accuracy from a second forward with the updated weights.
            counts = task.counts_after_step(runner.forward_model, batch, config, device)
        tally.add(loss, step.losses, step.routings, counts)
    return task.finish_epoch(tally.finish(min(tally.steps * config.data.batch_size, shard_size)))


def evaluate_each_k(model: nn.Module, run_evaluation: Callable[[], dict[str, Any]]) -> dict[str, float]:
    """The trained model evaluated with k = 1..E experts per token (every MoE layer's router at that k),
    as Pavlitska et al.'s ``varying_k_accuracy.py``: ``val_top1_k<k>`` (classification) or ``val_ap_k<k>``
    and ``val_ap50_k<k>`` (detection). The routers' k is restored afterwards."""
    layers = list(moe_layers(model))
    if not layers:
        return {}
    trained_k = [layer.router.k for layer in layers]
    metrics: dict[str, float] = {}
    try:
        for k in range(1, max(layer.num_experts for layer in layers) + 1):
            for layer in layers:
                layer.router.k = min(k, layer.num_experts)
            figures = run_evaluation()
            for name in ("val_top1", "val_ap", "val_ap50"):
                if name in figures:
                    metrics[f"{name}_k{k}"] = figures[name]
    finally:
        for layer, k in zip(layers, trained_k):
            layer.router.k = k
    return metrics


def place_model(task: Task, model: nn.Module, config: RunConfig, device: torch.device) -> nn.Module:
    """``model`` moved to ``device``, in channels_last where ``train.channels_last`` resolves to it."""
    model.to(device)
    if task.channels_last and uses_channels_last(config, device):
        # Weights only: the first convolution returns channels_last activations from NCHW images, and
        # every later layer keeps that layout (the padded MoE dispatch included).
        model.to(memory_format=torch.channels_last)
    return model


def validation_metrics(
    task: Task,
    model: nn.Module,
    data: Any,
    config: RunConfig,
    device: torch.device,
    session: Session,
    each_k: bool,
    previous_top1: list[torch.Tensor] | None = None,
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """``(metrics, top1)``: the task's validation metrics, with ``each_k`` also :func:`evaluate_each_k`'s
    (``val_top1_k<k>``...), and each MoE layer's top-1 expert per validation token of this rank. Given the
    previous evaluation's ``previous_top1``, the metrics include ``moe<i>_routing_fluctuation``
    (:func:`~harness.metrics.routing_fluctuation`)."""
    top1: list[torch.Tensor] = []
    metrics = task.evaluate(model, data, config, device, session, top1)
    if each_k:
        metrics.update(evaluate_each_k(model, lambda: task.evaluate(model, data, config, device, session)))
    if previous_top1 is not None:
        for i, (before, now) in enumerate(zip(previous_top1, top1)):
            metrics[f"moe{i}_routing_fluctuation"] = routing_fluctuation(before, now, session.collective)
    return metrics, top1


def placement_record(model: nn.Module, session: Session, owned: dict[int, list[int]]) -> list[dict[str, Any]]:
    """For every rank: world rank, node id, GPU id and the experts it holds per MoE layer (all of them
    without expert parallelism)."""
    if not owned:
        owned = {i: list(range(layer.num_experts)) for i, layer in enumerate(moe_layers(model))}
    mine = {"rank": session.collective.rank, **session.worker, "experts": {str(k): v for k, v in owned.items()}}
    return session.collective.all_gather_object(mine)


def train_loop(
    config: RunConfig, report: Report, data: Any = None, session: Session | None = None
) -> list[dict[str, Any]]:
    """Train ``config`` for ``train.epochs`` epochs, calling ``report(metrics)`` after each (with
    ``checkpoint_dir=`` a folder holding this rank's checkpoint files on checkpoint epochs).

    Returns the run's history, one metrics dict per epoch; a resumed run's history includes the epochs
    before the restart (it travels in the checkpoint), each exactly once. ``data`` may be passed in to reuse
    a loaded data set; ``session`` places this process in a distributed run (default: one process)."""
    loop_start = time.perf_counter()
    session = session or Session()
    collective = session.collective
    torch.manual_seed(config.seed)  # identical initial model on every rank
    device = session.device or resolve_device(config)
    task = task_for(config)
    data = task.to_device(data if data is not None else task.load_data(config), device)
    model = task.build_model(config, data)
    # Before sharding: every rank holds every expert here, so a pattern matches on all ranks alike.
    freeze_parameters(model, config.train.freeze)
    owned: dict[int, list[int]] = {}
    if session.expert_parallel:
        owned = shard_experts(model, collective)
    else:
        set_collective(model, collective)
    place_model(task, model, config, device)
    optimizer = build_optimizer(config, model)
    history: list[dict[str, Any]] = []
    if session.restore_dir is not None:
        history = load_checkpoint(session.restore_dir, model, optimizer, device, owned)  # any saved world size
    restored_epoch = len(history)  # 0: a fresh start
    scheduler = build_lr_scheduler(config, optimizer, restored_epoch)
    runner = build_step_runner(task, model, optimizer, config, device, session)  # train.step; after the restore
    placement = json.dumps(placement_record(model, session, owned))
    previous_top1 = None
    # A resumed run evaluates the restored model once: the restored epoch's routing, from which the next
    # epoch's fluctuation is what the uninterrupted run reported.
    if 0 < restored_epoch < config.train.epochs and any(True for _ in moe_layers(model)):
        previous_top1 = validation_metrics(task, runner.eval_model, data, config, device, session, False)[1]
    setup_s = time.perf_counter() - loop_start  # data loading, model building, device init, restore
    for epoch in range(restored_epoch + 1, config.train.epochs + 1):
        torch.manual_seed(config.seed * 1_000_003 + epoch + 7919 * collective.rank)  # gate noise; resumable
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = train_one_epoch(task, model, optimizer, data, config, device, epoch, session, runner)
        train_s = time.perf_counter() - start
        if epoch == 1 and config.schedule.warmup_steps:
            for group in optimizer.param_groups:  # a warm-up longer than epoch 1 ends with it
                group["lr"] = config.optim.lr
        scheduler.step()
        sync_buffers(model, collective, session.expert_parallel)
        each_k = config.train.test_time_k and epoch == config.train.epochs
        val_metrics, previous_top1 = validation_metrics(
            task, runner.eval_model, data, config, device, session, each_k, previous_top1
        )
        metrics = {
            "epoch": float(epoch),
            "lr": lr,
            **train_metrics,
            **val_metrics,
            "images_per_s": train_metrics["train_images"] / max(train_s, 1e-9),
            "epoch_s": time.perf_counter() - start,
            "setup_s": setup_s,
            "restored_epoch": float(restored_epoch),  # the checkpoint this attempt resumed from; 0 = none
            "placement": placement,
        }
        history.append(metrics)
        every = session.checkpoint_every
        if every and (epoch % every == 0 or epoch == config.train.epochs):
            with tempfile.TemporaryDirectory(prefix="harness-ckpt-") as folder:
                save_checkpoint(
                    pathlib.Path(folder),
                    model,
                    optimizer,
                    history,
                    collective.rank,
                    session.expert_parallel,
                    collective.world_size,
                    config.model_dump(mode="json"),
                )
                report(metrics, checkpoint_dir=pathlib.Path(folder))
        else:
            report(metrics)
    if session.save_model is not None:
        save_model_file(model, session.save_model, config.model_dump(mode="json"))
    return history
