"""Detection task: COCO-format data, RetinaNet(-MoE), one training epoch, COCO evaluation with AP by object
size and expert x FPN-level / expert x object-size specialization, given to the training loop
(:mod:`harness.training.loop`) as :data:`TASK`, as the classification task is.

MoE layers are numbered in :meth:`MoERetinaNet.moe_modules` order: with ``moe_at: heads`` ``moe0`` is the
classification subnet and ``moe1`` the box subnet (their tokens are image x FPN level), with
``moe_at: layer4`` ``moe0`` is backbone layer4 (tokens are images).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..data import load_detection_dataset
from ..data.base import shard_groups, shard_indices, sorted_groups
from ..data.coco import SIZE_BUCKETS, DetectionData, detection_batches, size_bucket
from ..metrics.detection import COCO_STATS, coco_evaluate, to_coco_results
from ..metrics.utilization import RouterStats, UtilizationAccumulator, mean_pairwise_cosine, top1_experts
from ..models import create_model
from ..models.retinanet_moe import NUM_LEVELS, fpn_level_of_objects, resize_scale
from ..moe import MoELayer
from ..moe.parallel import Collective, expert_parameter_vectors
from .base import StepResult, Task, autocast_context


def build_detector(config: RunConfig, data: DetectionData) -> nn.Module:
    """The configured RetinaNet (dense or MoE) for ``data``'s categories."""
    m, c = config.model, config.data.coco
    kwargs: dict[str, Any] = dict(
        num_classes=data.num_classes,
        backbone=m.backbone,
        weights=m.weights,
        min_size=c.min_size,
        max_size=c.max_size,
        p6_from=m.p6_from,
        focal_clamp=m.focal_clamp,
    )
    moe = config.moe
    if m.name == "retinanet_moe" and moe is not None:
        kwargs.update(
            moe=moe.spec(),
            moe_at=m.moe_at,
            expert_width=moe.expert_width,
            expert_init=m.expert_init,
            expert_init_noise=m.expert_init_noise,
        )
    return create_model(m.name, **kwargs)


def train_batches(
    data: DetectionData, config: RunConfig, device: torch.device, generator: torch.Generator, collective: Collective
) -> tuple[Iterator[tuple[list[torch.Tensor], list[dict]]], int]:
    """This rank's shard of the training images as ``(images, targets)`` batches (torchvision's detection
    format: a list of ``[3, H, W]`` images and of ``{"boxes" [M, 4], "labels" [M], ...}``), randomly
    flipped when ``data.augment``.

    ``data.batch_grouping: aspect_ratio`` batches images of similar width/height, as the reference's
    ``AspectRatioBasedSampler``: the whole training split sorted by aspect ratio and cut into full batches
    (fixed for the run), whose order the epoch's generator shuffles the same way on every rank; rank r
    takes batches r, r + W, ... (so each batch stays whole and all ranks take the same number of steps).
    One process trains on exactly the reference's batches, in a shuffled order."""
    batch_size, rank, world_size = config.data.batch_size, collective.rank, collective.world_size
    if config.data.batch_grouping == "aspect_ratio":
        indices = shard_groups(sorted_groups(data.train.aspect_ratios, batch_size), rank, world_size, generator)
    else:
        indices = shard_indices(len(data.train), rank, world_size, generator)
    flip = generator if config.data.augment else None
    batches = (
        (images, targets) for images, targets, _ in detection_batches(data.train, indices, batch_size, device, flip)
    )
    return batches, indices.numel()


def forward(
    model: nn.Module, batch: tuple[list[torch.Tensor], list[dict]], config: RunConfig, reduce: Any = None
) -> StepResult:
    """RetinaNet's loss dict (``classification``, ``bbox_regression``, and the MoE modules' ``<aux>_loss``,
    their statistics summed over ranks by ``reduce`` under ``moe.losses.scope: global_batch``) and the MoE
    modules' routings."""
    images, targets = batch
    model.aux_reduce = reduce  # every detector is an MoERetinaNet (the dense one has no MoE losses to reduce)
    losses = model(images, targets)
    return StepResult(losses, [r for routings in model.routings().values() for r in routings])


class _LayerStats:
    """Utilization of one MoE module over the validation set: its tokens (image x FPN level for a head,
    image for layer4), and its gates seen from each ground-truth object (the token at the object's FPN
    level), labelled by COCO size bucket."""

    def __init__(self, num_experts: int, per_level: bool, device: torch.device) -> None:
        self.per_level = per_level
        self.tokens = UtilizationAccumulator(num_experts, {"fpn_level": NUM_LEVELS} if per_level else {}, device)
        self.objects = UtilizationAccumulator(num_experts, {"object_size": len(SIZE_BUCKETS)}, device)
        self.router = RouterStats(num_experts, device)
        self.top1: list[torch.Tensor] = []  # each batch's and level's top-1 expert per valid token

    def update(self, routings: list, valid: torch.Tensor, targets: list[dict], scales: list[float]) -> None:
        """``valid: [B]`` bool on the host (which batch rows are real images, not shard padding)."""
        rows = valid.to(routings[0].gates.device)
        for level, routing in enumerate(routings):
            gates = routing.gates[rows].float()
            self.top1.append(top1_experts(gates))
            labels = {"fpn_level": torch.full((gates.shape[0],), level, device=gates.device)} if self.per_level else {}
            self.tokens.update(gates, labels)
            self.router.update(routing, rows)
        for i, (ok, target, scale) in enumerate(zip(valid.tolist(), targets, scales)):
            if not ok or target["areas"].numel() == 0:
                continue
            areas = target["areas"]
            levels = fpn_level_of_objects(areas, scale) if self.per_level else torch.zeros_like(areas, dtype=torch.long)
            per_level_gates = torch.stack([r.gates[i].float() for r in routings])  # [levels, E]
            self.objects.update(per_level_gates[levels.to(per_level_gates.device)], {"object_size": size_bucket(areas)})

    def metrics(self, collective: Any) -> tuple[dict[str, float], dict[str, list[list[float]]]]:
        self.tokens.reduce(collective)
        self.objects.reduce(collective)
        self.router.reduce(collective)
        metrics = {**self.tokens.compute(), **self.router.compute()}
        metrics["object_size_mutual_info_bits"] = self.objects.compute()["object_size_mutual_info_bits"]
        for j, (imp, load) in enumerate(zip(*self.tokens.shares())):
            metrics[f"expert{j}_importance_share"] = float(imp)
            metrics[f"expert{j}_load_share"] = float(load)
        tables = {"object_size": self.objects.affinity("object_size")}
        if self.per_level:
            tables["fpn_level"] = self.tokens.affinity("fpn_level")
        return metrics, {name: [[round(v, 6) for v in row] for row in t.tolist()] for name, t in tables.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DetectionData,
    config: RunConfig,
    device: torch.device,
    session: Any,
    routing_top1: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """COCO bbox figures (``val_ap``, ``val_ap50``, ``val_ap75``, ``val_ap_small/medium/large``, ``val_ar*``),
    per-MoE-layer utilization (``moe<i>_*``, with ``moe<i>_object_size_mutual_info_bits`` and, for heads,
    ``moe<i>_fpn_level_mutual_info_bits``) and ``affinity`` JSON ``{layer: {"fpn_level"|"object_size": [E][G]}}``.

    Each rank detects on every W-th validation image; detections are gathered so COCOeval (the evaluator of
    ``metrics.coco_backend``) sees every image exactly once, and routing counts are summed over ranks."""
    model.eval()
    collective = session.collective
    n = (
        len(data.val)
        if config.data.coco.max_val_images is None
        else min(len(data.val), config.data.coco.max_val_images)
    )
    per_rank = -(-n // collective.world_size)
    positions = torch.arange(per_rank) * collective.world_size + collective.rank
    valid_all = positions < n
    indices = torch.where(valid_all, positions, torch.zeros_like(positions))
    c = config.data.coco
    results: list[dict] = []
    stats: dict[str, _LayerStats] = {}
    batch_size = config.data.val_batch_size
    for start, (images, targets, batch_positions) in zip(
        range(0, per_rank, batch_size), detection_batches(data.val, indices, batch_size, device)
    ):
        valid = valid_all[start : start + batch_size]
        with autocast_context(config, device):
            detections = model(images)
        for ok, position, detection in zip(valid.tolist(), batch_positions, detections):
            if ok:
                results.extend(to_coco_results(data.val.image_ids[position], detection, data.category_ids))
        scales = [resize_scale(img.shape[-2], img.shape[-1], c.min_size, c.max_size) for img in images]
        for name, routings in model.routings().items():
            if name not in stats:
                stats[name] = _LayerStats(routings[0].num_experts, per_level=name != "layer4", device=device)
            stats[name].update(routings, valid, targets, scales)
    gathered = collective.all_gather_object(results)
    figures = None
    if collective.rank == 0:
        figures = coco_evaluate(
            data.val.coco,
            [r for part in gathered for r in part],
            data.val.image_ids[:n],
            backend=config.metrics.coco_backend,
        )
    figures = collective.all_gather_object(figures)[0]
    metrics: dict[str, Any] = {f"val_{name}": figures[name] for name in COCO_STATS}
    affinities = {}
    modules = model.moe_modules()
    for i, (name, layer) in enumerate(stats.items()):
        layer_metrics, tables = layer.metrics(collective)
        metrics.update({f"moe{i}_{key}": value for key, value in layer_metrics.items()})
        moe = next(m for m in modules[name].modules() if isinstance(m, MoELayer))
        metrics[f"moe{i}_expert_similarity"] = mean_pairwise_cosine(expert_parameter_vectors(moe, collective))
        affinities[str(i)] = tables
    if affinities:
        metrics["affinity"] = json.dumps(affinities)
    if routing_top1 is not None:  # each MoE module's top-1 expert per (image, level) token of this rank
        routing_top1.extend(torch.cat(layer.top1) for layer in stats.values())
    return metrics


def load_data(config: RunConfig) -> DetectionData:
    """The configured detection data; images stay on the host and move per batch."""
    return load_detection_dataset(config.data)


TASK = Task(
    load_data=load_data, build_model=build_detector, train_batches=train_batches, forward=forward, evaluate=evaluate
)
