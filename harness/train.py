"""Training: ``train_loop(config, report)`` in plain PyTorch (Ray Train wraps it), and the
``python -m harness.train <study.yaml> [--set key=value ...]`` entry point that runs a study's ``base``.

Read top to bottom: build data and model -> per epoch: train (task loss + weighted aux losses summed into
one loss dict) -> evaluate (accuracy and per-layer utilization metrics) -> report flat metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import RunConfig, load_study
from .data import ClassificationData, iterate_batches, load_dataset
from .errors import HarnessError, TrainingError
from .metrics import importance_share, load_share, utilization_metrics
from .models import ModelOutput, create_model
from .moe import weighted_aux_losses

Report = Callable[[dict[str, float]], None]


def resolve_device(config: RunConfig) -> torch.device:
    """``train.device``: ``auto`` picks CUDA when available."""
    wanted = config.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise HarnessError("train.device: cuda requested but no CUDA device is available")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def autocast_context(config: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA unless ``train.amp: off``; nothing on CPU unless ``amp: bf16``."""
    amp = config.train.amp
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(config: RunConfig, data: ClassificationData) -> nn.Module:
    """The configured model for ``data``'s classes and channels."""
    kwargs: dict = {"num_classes": data.num_classes}
    moe = config.moe
    if config.model.name.endswith("_moe") and moe is not None:
        kwargs.update(
            num_experts=moe.num_experts,
            k=moe.k,
            gate=moe.gate.type,
            noisy=moe.gate.noisy,
            capacity_factor=moe.capacity_factor,
            constraint=moe.constraint.model_dump() if moe.constraint else None,
            gate_hidden_channels=moe.gate.hidden_channels,
            attention_dim=moe.gate.attention_dim,
        )
        if config.model.name == "small_cnn_moe":
            kwargs.update(in_channels=data.in_channels, hidden_dim=config.model.hidden_dim)
        else:
            kwargs.update(position=moe.position, expert_width=moe.expert_width, residual=moe.residual)
    return create_model(config.model.name, **kwargs)


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def build_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    s = config.schedule
    if s.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=s.milestones, gamma=s.gamma)
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.train.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def compute_losses(config: RunConfig, output: ModelOutput, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Task loss and every configured aux loss (summed over MoE layers), as a dict of scalars."""
    losses = {"task_loss": F.cross_entropy(output.logits.float(), labels)}
    if config.moe is None:
        return losses
    w = config.moe.losses
    for routing in output.routings:
        layer_losses = weighted_aux_losses(
            routing,
            images,
            importance_weight=w.importance,
            load_weight=w.load,
            kl_uniform_weight=w.kl_uniform,
            switch_weight=w.switch,
            beta_s=w.sample_similarity.beta_s,
            beta_d=w.sample_similarity.beta_d,
        )
        for name, value in layer_losses.items():
            losses[name] = losses[name] + value if name in losses else value
    return losses


def _first_non_finite(window: list[torch.Tensor]) -> int | None:
    """Index of the first non-finite loss in ``window`` (one host sync for the whole window)."""
    finite = torch.isfinite(torch.stack(window))
    if bool(finite.all()):
        return None
    return int((~finite).nonzero()[0, 0])


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ClassificationData,
    config: RunConfig,
    device: torch.device,
    epoch: int,
) -> dict[str, float]:
    """One pass over the training split; returns mean losses, images seen and dropped tokens."""
    model.train()
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    sums: dict[str, torch.Tensor] = {}
    dropped = torch.zeros((), dtype=torch.long, device=device)
    window: list[torch.Tensor] = []
    steps = images_seen = 0
    batches = iterate_batches(
        data.train_images, data.train_labels, config.data.batch_size, data.mean, data.std,
        generator=generator, augment=config.data.augment and data.train_images.shape[-1] == 32, device=device,
    )
    for images, labels in batches:
        if config.train.max_steps_per_epoch is not None and steps >= config.train.max_steps_per_epoch:
            break
        with autocast_context(config, device):
            output = model(images)
            losses = compute_losses(config, output, images, labels)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in {"loss": loss, **losses}.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
        for routing in output.routings:
            dropped += routing.dropped
        window.append(loss.detach().float())
        steps += 1
        images_seen += labels.shape[0]
        if len(window) == config.train.check_every:
            _raise_if_non_finite(window, epoch, steps)
            window = []
    if window:
        _raise_if_non_finite(window, epoch, steps)
    metrics = {f"train_{name}": float(total) / max(steps, 1) for name, total in sums.items()}
    metrics["train_images"] = float(images_seen)
    metrics["train_dropped_tokens"] = float(dropped)
    return metrics


def _raise_if_non_finite(window: list[torch.Tensor], epoch: int, steps_done: int) -> None:
    bad = _first_non_finite(window)
    if bad is not None:
        step = steps_done - len(window) + bad + 1
        raise TrainingError(f"non-finite loss ({float(window[bad])}) at epoch {epoch} step {step}")


@torch.no_grad()
def evaluate(model: nn.Module, data: ClassificationData, config: RunConfig, device: torch.device) -> dict[str, float]:
    """Validation loss, top-1/top-5 accuracy and per-MoE-layer utilization metrics (``moe<i>_<metric>``),
    with mutual information for every extra labelling (``moe<i>_<group>_mutual_info_bits``)."""
    model.eval()
    correct1 = correct5 = 0.0
    loss_sum = torch.zeros((), device=device)
    gates: list[list[torch.Tensor]] = []
    batches = iterate_batches(
        data.val_images, data.val_labels, config.data.val_batch_size, data.mean, data.std, device=device
    )
    for images, labels in batches:
        with autocast_context(config, device):
            output = model(images)
        logits = output.logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        if not gates:
            gates = [[] for _ in output.routings]
        for layer, routing in zip(gates, output.routings):
            layer.append(routing.gates.float().cpu())
    n = data.val_labels.shape[0]
    metrics = {"val_loss": float(loss_sum) / n, "val_top1": float(correct1) / n, "val_top5": float(correct5) / n}
    for i, layer in enumerate(gates):
        layer_gates = torch.cat(layer)
        for name, value in utilization_metrics(layer_gates, data.val_labels, data.num_classes).items():
            metrics[f"moe{i}_{name}"] = value
        for group_name, group in data.groups.items():
            group_metrics = utilization_metrics(layer_gates, group.labels, group.num_groups)
            metrics[f"moe{i}_{group_name}_mutual_info_bits"] = group_metrics["mutual_info_bits"]
        for j, (imp, load) in enumerate(zip(importance_share(layer_gates), load_share(layer_gates))):
            metrics[f"moe{i}_expert{j}_importance_share"] = float(imp)
            metrics[f"moe{i}_expert{j}_load_share"] = float(load)
    return metrics


def train_loop(config: RunConfig, report: Report, data: ClassificationData | None = None) -> dict[str, float]:
    """Train ``config`` for ``train.epochs`` epochs, calling ``report(metrics)`` after each; returns the last
    epoch's metrics. ``data`` may be passed in to reuse a loaded data set."""
    torch.manual_seed(config.seed)
    device = resolve_device(config)
    data = data if data is not None else load_dataset(config.data)
    model = build_model(config, data).to(device)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    metrics: dict[str, float] = {}
    for epoch in range(1, config.train.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = train_one_epoch(model, optimizer, data, config, device, epoch)
        train_s = time.perf_counter() - start
        scheduler.step()
        val_metrics = evaluate(model, data, config, device)
        metrics = {
            "epoch": float(epoch),
            "lr": lr,
            **train_metrics,
            **val_metrics,
            "images_per_s": train_metrics["train_images"] / max(train_s, 1e-9),
            "epoch_s": time.perf_counter() - start,
        }
        report(metrics)
    return metrics


# ---------------------------------------------------------------------------------------------------------
# CLI

PROGRESS_KEYS = ("train_loss", "val_loss", "val_top1", "val_top5", "images_per_s", "epoch_s")


def _progress_line(metrics: dict[str, float], epochs: int) -> str:
    parts = [f"epoch {int(metrics['epoch'])}/{epochs}"]
    parts += [f"{key} {metrics[key]:.4g}" for key in PROGRESS_KEYS if key in metrics]
    utilization = [  # per-layer summaries; the per-expert shares are in the final listing
        f"{key} {value:.4g}" for key, value in metrics.items() if re.match(r"moe\d+_(?!expert\d)", key)
    ]
    return " | ".join(parts + utilization)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.train", description="Run a study's base config.")
    parser.add_argument("study", help="study YAML file (name, base, sweep)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base field, e.g. --set train.epochs=2 (repeatable)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study, args.overrides)
        config = study.base
        print(f"study {study.name}: {config.model.name} on {config.data.name}, {config.train.epochs} epochs", flush=True)
        final = train_loop(config, lambda m: print(_progress_line(m, config.train.epochs), flush=True))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("final metrics:")
    for key, value in final.items():
        print(f"  {key} = {value:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
