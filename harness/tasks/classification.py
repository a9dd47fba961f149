"""Classification task (CIFAR-100, MNIST, FashionMNIST, synthetic CIFAR): data, model, the step's losses
and the validation metrics, given to the training loop (:mod:`harness.training.loop`) as :data:`TASK`.

Per step: task loss (cross entropy) + every configured aux loss of every MoE layer, summed into one loss
dict. Validation: loss, top-1/top-5 accuracy and per-MoE-layer utilization and specialization metrics.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig
from ..data import ClassificationData, iterate_batches, load_dataset, shard_indices
from ..data.base import to_device_early
from ..metrics import RouterStats, UtilizationAccumulator, mean_pairwise_cosine, top1_experts
from ..models import ModelOutput, create_model
from ..models.weights import load_matching_weights
from ..moe import add_losses, router_weight_losses, weighted_aux_losses
from ..moe.parallel import Collective, expert_parameter_vectors, moe_layers
from ..plugins import is_import_path, load_object
from ..precision import at_least_float32
from .base import Session, StepResult, Task, autocast_context, state_left_unchanged

# The labelling of Krishnamurthy et al.'s I(E;Y): the class the selected expert predicts.
EXPERT_PREDICTION = "expert_prediction"


def load_data(config: RunConfig) -> ClassificationData:
    """The configured data set, in host memory."""
    return load_dataset(config.data)


def to_device(data: ClassificationData, device: torch.device) -> ClassificationData:
    """The whole data set on the GPU when training there (no per-batch host-to-device copies)."""
    return data.to(device) if device.type == "cuda" else data


def build_model(config: RunConfig, data: ClassificationData) -> nn.Module:
    """The configured model for ``data``'s classes, channels and image size, started from
    ``model.weights`` when set."""
    model = _build_architecture(config, data)
    if config.model.weights is not None:
        load_matching_weights(model, config.model.weights)
    return model


def _build_architecture(config: RunConfig, data: ClassificationData) -> nn.Module:
    kwargs: dict = {"num_classes": data.num_classes}
    m = config.model
    if is_import_path(m.name):  # a model of your own (docs/extending.md)
        moe = config.moe.spec() if config.moe is not None and m.name.endswith("_moe") else None
        shape = {"in_channels": data.in_channels, "image_size": data.train_images.shape[-1]}
        return load_object(m.name)(**kwargs, **shape, moe=moe, **m.args)
    if m.name.endswith("_moe") and config.moe is not None:
        kwargs["moe"] = config.moe.spec()
        if m.name == "small_cnn_moe":
            kwargs.update(
                in_channels=data.in_channels,
                image_size=data.train_images.shape[-1],
                expert=m.expert.model_dump() if m.expert else None,
                gate_network=m.gate_network.model_dump() if m.gate_network else None,
                expert_execution=m.expert_execution,
            )
        else:
            moe = config.moe
            kwargs.update(
                position=moe.position,
                expert_width=moe.expert_width,
                residual=moe.residual,
                gate_input=moe.gate.input,
                init=m.init,
            )
    if m.name == "resnet18":
        kwargs["init"] = m.init
    return create_model(m.name, **kwargs)


def compute_losses(
    config: RunConfig,
    output: ModelOutput,
    images: torch.Tensor,
    labels: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Task loss and every configured aux loss (summed over MoE layers), as a dict of scalars; ``reduce``
    sums routing statistics over data-parallel ranks. ``images: [B, C, H, W]``, ``labels: [B]``."""
    losses = {"task_loss": F.cross_entropy(at_least_float32(output.logits), labels)}
    if config.moe is None:
        return losses
    weights = config.moe.losses.aux_weights()
    for routing in output.routings:
        add_losses(losses, weighted_aux_losses(routing, images, weights, reduce))
    return losses


def _with_router_weight_losses(model: nn.Module, config: RunConfig, losses: dict[str, torch.Tensor]) -> None:
    if config.moe is not None:
        add_losses(losses, router_weight_losses(model, config.moe.losses.aux_weights()))


def train_batches(
    data: ClassificationData,
    config: RunConfig,
    device: torch.device,
    generator: torch.Generator,
    collective: Collective,
) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int]:
    """This rank's shard of the training split as normalised ``(images [B, C, H, W], labels [B])``
    batches, with random crop + flip for 32x32 images when ``data.augment``."""
    indices = shard_indices(data.train_images.shape[0], collective.rank, collective.world_size, generator)
    augment = generator if config.data.augment and data.train_images.shape[-1] == 32 else None
    batches = iterate_batches(
        data.train_images, data.train_labels, indices, config.data.batch_size, data.mean, data.std, device, augment
    )
    return batches, indices.numel()


def forward(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    config: RunConfig,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None,
) -> StepResult:
    """Losses of one batch, its routings, and its correct top-1 predictions (``top1_hits``)."""
    images, labels = batch
    output = model(images)
    losses = compute_losses(config, output, images, labels, reduce)
    _with_router_weight_losses(model, config, losses)
    return StepResult(losses, list(output.routings), {"top1_hits": (output.logits.argmax(dim=1) == labels).sum()})


@torch.no_grad()
def counts_after_step(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], config: RunConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """``top1_hits`` of the batch (``images [B, C, H, W]``, ``labels [B]``) from a forward in training mode
    after the optimizer step, which leaves the model's buffers and the random generators as they were."""
    images, labels = batch
    with state_left_unchanged(model, device), autocast_context(config, device):
        output = model(images)
    return {"top1_hits": (output.logits.argmax(dim=1) == labels).sum()}


def finish_epoch(metrics: dict[str, float]) -> dict[str, float]:
    """Running accuracy over the epoch's training batches (train mode, augmented), as training error is
    usually reported; shard padding repeats at most W - 1 images."""
    metrics["train_top1"] = metrics.pop("train_top1_hits") / max(metrics["train_images"], 1.0)
    return metrics


@contextlib.contextmanager
def batchnorm_statistics(model: nn.Module, statistics: str, device: torch.device) -> Iterator[None]:
    """``metrics.batchnorm``: ``running`` changes nothing (the model is in eval mode); ``batch`` puts every
    BatchNorm layer in training mode, so each evaluation batch is normalised by its own statistics, as in
    Krishnamurthy's code, and restores the layers' running statistics and mode afterwards."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if statistics == "running" or not layers:
        yield
        return
    with state_left_unchanged(model, device):
        for layer in layers:
            layer.train()
        try:
            yield
        finally:
            for layer in layers:
                layer.eval()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ClassificationData,
    config: RunConfig,
    device: torch.device,
    session: Session | None = None,
    routing_top1: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Validation loss, top-1/top-5 accuracy and per-MoE-layer utilization metrics (``moe<i>_<metric>``),
    with mutual information for every extra labelling (``moe<i>_<group>_mutual_info_bits``), and
    ``affinity``: JSON ``{layer: {labelling: [E][G] routed share}}``.

    Two I(E;Y): ``moe<i>_mutual_info_bits`` between the top-1 expert and the true label, and for whole-model
    experts ``moe<i>_expert_prediction_mutual_info_bits`` between the top-1 expert and the class that expert
    predicts (Krishnamurthy et al.'s code).

    In data parallelism each rank evaluates every W-th image (its shard padded to equal length, the padding
    masked out) and the counts are summed over ranks, so every image counts exactly once.
    """
    model.eval()
    collective = (session or Session()).collective
    n = data.val_labels.shape[0]
    per_rank = -(-n // collective.world_size)
    positions = torch.arange(per_rank) * collective.world_size + collective.rank
    valid_all = positions < n
    indices = torch.where(valid_all, positions, torch.zeros_like(positions))
    label_sets = {"class": data.num_classes, **{name: g.num_groups for name, g in data.groups.items()}}
    all_labels = {"class": data.val_labels, **{name: g.labels for name, g in data.groups.items()}}
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    accumulators: list[UtilizationAccumulator] = []
    router_stats: list[RouterStats] = []
    top1: dict[int, list[torch.Tensor]] = {}  # per layer, each batch's top-1 expert per valid token
    batch_size = config.data.val_batch_size
    valid_on_device = to_device_early(valid_all, device)
    index_on_data = to_device_early(indices, data.val_labels.device)
    with batchnorm_statistics(model, config.metrics.batchnorm, device):
        for start, (images, labels) in zip(
            range(0, per_rank, batch_size),
            iterate_batches(data.val_images, data.val_labels, indices, batch_size, data.mean, data.std, device),
        ):
            valid = valid_on_device[start : start + batch_size]
            # Known on the host: only a rank's last batch can hold padding, and only there are rows selected
            # by a mask (a read from the device); every other batch is used whole.
            whole = bool(valid_all[start : start + batch_size].all())
            with autocast_context(config, device):
                output = model(images)
            logits = at_least_float32(output.logits)
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            sums += torch.stack(
                [
                    (F.cross_entropy(logits, labels, reduction="none") * valid).sum(),
                    (hits[:, 0] & valid).sum(),
                    (hits.any(dim=1) & valid).sum(),
                ]
            ).double()
            if output.expert_classes is not None:
                label_sets.setdefault(EXPERT_PREDICTION, data.num_classes)
            if not accumulators:
                # on the device: NCCL reduces only GPU tensors
                accumulators = [UtilizationAccumulator(r.num_experts, label_sets, device) for r in output.routings]
                router_stats = [RouterStats(r.num_experts, device) for r in output.routings]
            batch_ids = (
                index_on_data[start : start + batch_size]
                if whole
                else indices[start : start + batch_size][valid_all[start : start + batch_size]]
            )
            batch_labels = {k: v[batch_ids].to(device, non_blocking=True) for k, v in all_labels.items()}
            for stats, routing in zip(router_stats, output.routings):
                stats.update(routing, None if whole else valid)
            for layer, (accumulator, routing) in enumerate(zip(accumulators, output.routings)):
                gates = at_least_float32(routing.gates if whole else routing.gates[valid])
                top1.setdefault(layer, []).append(top1_experts(gates))
                if output.expert_classes is not None:
                    # The reference's I(E;Y): Y = the class the top-1 expert predicts, not the true label.
                    selected = gates.argmax(dim=1, keepdim=True)
                    classes = output.expert_classes if whole else output.expert_classes[valid]
                    batch_labels[EXPERT_PREDICTION] = classes.gather(1, selected).squeeze(1)
                accumulator.update(gates, batch_labels)
    collective.sum_(sums)
    metrics: dict[str, Any] = {
        "val_loss": float(sums[0]) / n,
        "val_top1": float(sums[1]) / n,
        "val_top5": float(sums[2]) / n,
    }
    affinities: dict[str, dict[str, list[list[float]]]] = {}
    layers = list(moe_layers(model))  # in forward order, as the routings
    for i, (accumulator, stats) in enumerate(zip(accumulators, router_stats)):
        accumulator.reduce(collective)
        stats.reduce(collective)
        for name, value in {**accumulator.compute(), **stats.compute()}.items():
            metrics[f"moe{i}_{name}"] = value
        metrics[f"moe{i}_expert_similarity"] = mean_pairwise_cosine(expert_parameter_vectors(layers[i], collective))
        for j, (imp, load) in enumerate(zip(*accumulator.shares())):
            metrics[f"moe{i}_expert{j}_importance_share"] = float(imp)
            metrics[f"moe{i}_expert{j}_load_share"] = float(load)
        affinities[str(i)] = {
            name: [[round(v, 6) for v in row] for row in accumulator.affinity(name).tolist()] for name in label_sets
        }
    if affinities:
        metrics["affinity"] = json.dumps(affinities)
    if routing_top1 is not None:  # each layer's top-1 expert per validation token of this rank: [N_rank] long
        routing_top1.extend(torch.cat(top1[layer]) for layer in sorted(top1))
    return metrics


TASK = Task(
    load_data=load_data,
    build_model=build_model,
    train_batches=train_batches,
    forward=forward,
    evaluate=evaluate,
    finish_epoch=finish_epoch,
    channels_last=True,
    to_device=to_device,
    counts_after_step=counts_after_step,
)
