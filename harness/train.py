"""Training: ``train_loop(config, report)`` in plain PyTorch (Ray Train wraps it), and the
``python -m harness.train <study.yaml> [--set key=value ...]`` entry point that runs a study's ``base``.

Read top to bottom: build data and model -> per epoch: train (task loss + weighted aux losses summed into
one loss dict) -> evaluate (accuracy and per-layer utilization metrics) -> report flat metrics.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import detection as detection_task
from .config import DETECTION_DATASETS, RunConfig, absolutize_paths, load_study, validate_run
from .data import ClassificationData, iterate_batches, load_dataset, shard_indices
from .detection import build_detector, load_detection_dataset
from .errors import HarnessError
from .metrics import RouterStats, UtilizationAccumulator
from .steps import EpochTally, autocast_context, optimizer_step
from .models import ModelOutput, create_model
from .models.weights import freeze_parameters, load_matching_weights, set_train_mode
from .moe import weighted_aux_losses
from .moe.parallel import LOCAL, Collective, expert_tensor_ids, moe_layers, set_collective, shard_experts, sync_buffers

# The labelling of Krishnamurthy et al.'s I(E;Y): the class the selected expert predicts.
EXPERT_PREDICTION = "expert_prediction"

# report(metrics) after every epoch; report(metrics, checkpoint_dir=folder) on checkpoint epochs.
Report = Callable[..., None]


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


def build_model(config: RunConfig, data: ClassificationData) -> nn.Module:
    """The configured model for ``data``'s classes, channels and image size, started from
    ``model.weights`` when set."""
    kwargs: dict = {"num_classes": data.num_classes}
    m = config.model
    if m.name.endswith("_moe") and config.moe is not None:
        kwargs.update(config.moe.model_options())
        if m.name == "small_cnn_moe":
            kwargs.update(in_channels=data.in_channels, image_size=data.train_images.shape[-1],
                          expert=m.expert.model_dump() if m.expert else None,
                          gate_network=m.gate_network.model_dump() if m.gate_network else None)
        else:
            moe = config.moe
            kwargs.update(position=moe.position, expert_width=moe.expert_width, residual=moe.residual,
                          gate_input=moe.gate.input, expert_layout=moe.expert_layout)
    model = create_model(m.name, **kwargs)
    if m.weights is not None:
        load_matching_weights(model, m.weights)
    return model


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


def build_scheduler(
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


def compute_losses(
    config: RunConfig,
    output: ModelOutput,
    images: torch.Tensor,
    labels: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Task loss and every configured aux loss (summed over MoE layers), as a dict of scalars; ``reduce``
    sums routing statistics over data-parallel ranks."""
    losses = {"task_loss": F.cross_entropy(output.logits.float(), labels)}
    if config.moe is None:
        return losses
    weights = config.moe.losses.aux_weights()
    for routing in output.routings:
        layer_losses = weighted_aux_losses(routing, images, weights, reduce)
        for name, value in layer_losses.items():
            losses[name] = losses[name] + value if name in losses else value
    return losses


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
    """

    collective: Collective = LOCAL
    expert_parallel: bool = False
    device: torch.device | None = None
    restore_dir: pathlib.Path | None = None
    checkpoint_every: int = 0
    worker: dict[str, Any] = field(default_factory=dict)
    on_step: Callable[[int, int], None] | None = None
    save_model: pathlib.Path | None = None


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ClassificationData,
    config: RunConfig,
    device: torch.device,
    epoch: int,
    session: Session,
) -> dict[str, float]:
    """One pass over this rank's shard of the training split; returns the mean losses over all ranks,
    the running training accuracy, and the images seen and tokens dropped by all ranks."""
    set_train_mode(model, config.train.frozen_bn)
    collective = session.collective
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)  # same order on every rank
    indices = shard_indices(data.train_images.shape[0], collective.rank, collective.world_size, generator)
    augment = generator if config.data.augment and data.train_images.shape[-1] == 32 else None
    aux_reduce = collective.sum if collective.world_size > 1 else None
    tally = EpochTally(config, epoch, collective, device)
    for images, labels in iterate_batches(
        data.train_images, data.train_labels, indices, config.data.batch_size, data.mean, data.std, device, augment
    ):
        if config.train.max_steps_per_epoch is not None and tally.steps >= config.train.max_steps_per_epoch:
            break
        if session.on_step is not None:
            session.on_step(epoch, tally.steps + 1)
        with autocast_context(config, device):
            output = model(images)
            losses = compute_losses(config, output, images, labels, aux_reduce)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(model, optimizer, config, epoch, tally.steps, session)
        tally.add(loss, losses, output.routings, {"top1_hits": (output.logits.argmax(dim=1) == labels).sum()})
    metrics = tally.finish(min(tally.steps * config.data.batch_size, indices.numel()))
    # Running accuracy over the epoch's training batches (train mode, augmented), as training error is
    # usually reported; shard padding repeats at most W - 1 images.
    metrics["train_top1"] = metrics.pop("train_top1_hits") / max(metrics["train_images"], 1.0)
    return metrics


@torch.no_grad()
def evaluate(
    model: nn.Module, data: ClassificationData, config: RunConfig, device: torch.device, session: Session | None = None
) -> dict[str, float]:
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
    batch_size = config.data.val_batch_size
    for start, (images, labels) in zip(
        range(0, per_rank, batch_size),
        iterate_batches(data.val_images, data.val_labels, indices, batch_size, data.mean, data.std, device),
    ):
        valid = valid_all[start : start + batch_size].to(device)
        with autocast_context(config, device):
            output = model(images)
        logits = output.logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        sums += torch.stack([
            (F.cross_entropy(logits, labels, reduction="none") * valid).sum(),
            (hits[:, 0] & valid).sum(),
            (hits.any(dim=1) & valid).sum(),
        ]).double()
        if output.expert_classes is not None:
            label_sets.setdefault(EXPERT_PREDICTION, data.num_classes)
        if not accumulators:
            # on the device: NCCL reduces only GPU tensors
            accumulators = [UtilizationAccumulator(r.num_experts, label_sets, device) for r in output.routings]
            router_stats = [RouterStats(r.num_experts, device) for r in output.routings]
        batch_ids = indices[start : start + batch_size][valid.cpu()]
        batch_labels = {k: v[batch_ids].to(device) for k, v in all_labels.items()}
        for stats, routing in zip(router_stats, output.routings):
            stats.update(routing, valid)
        for accumulator, routing in zip(accumulators, output.routings):
            gates = routing.gates[valid].float()
            if output.expert_classes is not None:
                # The reference's I(E;Y): Y = the class the top-1 expert predicts, not the true label.
                selected = gates.argmax(dim=1, keepdim=True)
                batch_labels[EXPERT_PREDICTION] = output.expert_classes[valid].gather(1, selected).squeeze(1)
            accumulator.update(gates, batch_labels)
    collective.sum_(sums)
    metrics = {"val_loss": float(sums[0]) / n, "val_top1": float(sums[1]) / n, "val_top5": float(sums[2]) / n}
    affinities: dict[str, dict[str, list[list[float]]]] = {}
    for i, (accumulator, stats) in enumerate(zip(accumulators, router_stats)):
        accumulator.reduce(collective)
        stats.reduce(collective)
        for name, value in {**accumulator.compute(), **stats.compute()}.items():
            metrics[f"moe{i}_{name}"] = value
        for j, (imp, load) in enumerate(zip(*accumulator.shares())):
            metrics[f"moe{i}_expert{j}_importance_share"] = float(imp)
            metrics[f"moe{i}_expert{j}_load_share"] = float(load)
        affinities[str(i)] = {
            name: [[round(v, 6) for v in row] for row in accumulator.affinity(name).tolist()] for name in label_sets
        }
    if affinities:
        metrics["affinity"] = json.dumps(affinities)
    return metrics


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


def placement_record(model: nn.Module, session: Session, owned: dict[int, list[int]]) -> list[dict[str, Any]]:
    """For every rank: world rank, node id, GPU id and the experts it holds per MoE layer (all of them
    without expert parallelism)."""
    if not owned:
        owned = {i: list(range(layer.num_experts)) for i, layer in enumerate(moe_layers(model))}
    mine = {"rank": session.collective.rank, **session.worker, "experts": {str(k): v for k, v in owned.items()}}
    return session.collective.all_gather_object(mine)


def train_loop(
    config: RunConfig, report: Report, data: ClassificationData | None = None, session: Session | None = None
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
    detection = config.data.name in DETECTION_DATASETS
    if detection:
        data = data if data is not None else load_detection_dataset(config.data)
        model = build_detector(config, data)
        run_epoch, run_evaluation = detection_task.train_one_epoch, detection_task.evaluate
    else:
        data = data if data is not None else load_dataset(config.data)
        if device.type == "cuda":
            data = data.to(device)  # GPU-resident: no per-batch host-to-device copies
        model = build_model(config, data)
        run_epoch, run_evaluation = train_one_epoch, evaluate
    # Before sharding: every rank holds every expert here, so a pattern matches on all ranks alike.
    freeze_parameters(model, config.train.freeze)
    owned: dict[int, list[int]] = {}
    if session.expert_parallel:
        owned = shard_experts(model, collective)
    else:
        set_collective(model, collective)
    model.to(device)
    if not detection and uses_channels_last(config, device):
        # Weights only: the first convolution returns channels_last activations from NCHW images, and
        # every later layer keeps that layout (the padded MoE dispatch included).
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    history: list[dict[str, Any]] = []
    if session.restore_dir is not None:
        history = load_checkpoint(session.restore_dir, model, optimizer, collective.rank, device)
    restored_epoch = len(history)  # 0: a fresh start
    start_epoch = restored_epoch + 1
    scheduler = build_scheduler(config, optimizer, restored_epoch)
    placement = json.dumps(placement_record(model, session, owned))
    setup_s = time.perf_counter() - loop_start  # data loading, model building, device init, restore
    for epoch in range(start_epoch, config.train.epochs + 1):
        torch.manual_seed(config.seed * 1_000_003 + epoch + 7919 * collective.rank)  # gate noise; resumable
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_metrics = run_epoch(model, optimizer, data, config, device, epoch, session)
        train_s = time.perf_counter() - start
        if epoch == 1 and config.schedule.warmup_steps:
            for group in optimizer.param_groups:  # a warm-up longer than epoch 1 ends with it
                group["lr"] = config.optim.lr
        scheduler.step()
        sync_buffers(model, collective, session.expert_parallel)
        val_metrics = run_evaluation(model, data, config, device, session)
        if config.train.test_time_k and epoch == config.train.epochs:
            val_metrics.update(evaluate_each_k(model, lambda: run_evaluation(model, data, config, device, session)))
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
                save_checkpoint(pathlib.Path(folder), model, optimizer, history, collective.rank, session.expert_parallel)
                report(metrics, checkpoint_dir=pathlib.Path(folder))
        else:
            report(metrics)
    if session.save_model is not None:
        save_model_file(model, session.save_model)
    return history


def save_model_file(model: nn.Module, path: pathlib.Path) -> None:
    """Write ``{"model": state_dict}`` (CPU tensors) to ``path`` atomically: what ``model.weights`` loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"model": {name: t.detach().cpu() for name, t in model.state_dict().items()}}, partial)
    partial.replace(path)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: rank 0 writes the replicated parameters, optimizer state and hard-constraint state (they are
# buffers of the model); in expert parallelism every rank also writes its own experts. Plain tensors and
# numbers only, so every file loads with torch.load(weights_only=True).

REPLICATED_FILE = "replicated.pt"


def experts_file(rank: int) -> str:
    return f"experts_rank{rank}.pt"


def _split_state(model: nn.Module, optimizer: torch.optim.Optimizer, expert_parallel: bool):
    local = expert_tensor_ids(model) if expert_parallel else set()
    names = {id(p): name for name, p in model.named_parameters()}
    parts: dict[bool, dict[str, dict]] = {False: {"model": {}, "optimizer": {}}, True: {"model": {}, "optimizer": {}}}
    for name, tensor in model.state_dict(keep_vars=True).items():
        parts[id(tensor) in local]["model"][name] = tensor.detach().cpu()
    for param, state in optimizer.state.items():
        parts[id(param) in local]["optimizer"][names[id(param)]] = {
            k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()
        }
    return parts[False], parts[True]


def save_checkpoint(
    folder: pathlib.Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    history: list[dict[str, Any]],
    rank: int,
    expert_parallel: bool,
) -> None:
    """Write this rank's files for the checkpoint after epoch ``len(history)`` into ``folder``."""
    replicated, experts = _split_state(model, optimizer, expert_parallel)
    epoch = len(history)
    if rank == 0:
        torch.save({"epoch": epoch, "history": history, **replicated}, folder / REPLICATED_FILE)
    if expert_parallel:
        torch.save({"epoch": epoch, **experts}, folder / experts_file(rank))


def load_checkpoint(
    folder: pathlib.Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, device: torch.device
) -> int:
    """Restore model and optimizer from ``folder`` (written by :func:`save_checkpoint` with the same world
    size); returns the history of the epochs it covers."""
    parts = [torch.load(folder / REPLICATED_FILE, map_location=device, weights_only=True)]
    if (folder / experts_file(rank)).exists():
        parts.append(torch.load(folder / experts_file(rank), map_location=device, weights_only=True))
    state = {name: t for part in parts for name, t in part["model"].items()}
    model.load_state_dict(state)
    params = dict(model.named_parameters())
    for part in parts:
        for name, param_state in part["optimizer"].items():
            optimizer.state[params[name]] = param_state
    return list(parts[0]["history"])


# ---------------------------------------------------------------------------------------------------------
# CLI

PROGRESS_KEYS = ("train_loss", "val_loss", "val_top1", "val_top5", "val_ap", "val_ap50", "val_ap_small", "val_ap_medium",
                 "val_ap_large", "images_per_s", "epoch_s")


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
    parser.add_argument("--save-model", type=pathlib.Path, metavar="PATH",
                        help="write the trained model's weights here (a later run's model.weights)")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study, args.overrides)
        config = study.base
        if args.save_model is not None and config.distributed.num_workers:
            raise HarnessError("--save-model: only for runs in this process (distributed.num_workers: 0); a Ray "
                               "Train run's checkpoints hold its weights (replicated.pt)")
        if config.distributed.num_workers:  # workers do not run in this directory
            config = validate_run(absolutize_paths(config.model_dump(mode="json")))
        workers = config.distributed.num_workers
        where = f"Ray Train, {workers} workers" if workers else "in this process"
        print(f"study {study.name}: {config.model.name} on {config.data.name}, {config.train.epochs} epochs, {where}", flush=True)
        if workers:
            from .ray_train import fit  # Ray only when asked for: it is slow to import and start

            history = fit(config, study.name).return_value
        else:
            history = train_loop(config, lambda m: print(_progress_line(m, config.train.epochs), flush=True),
                                 session=Session(save_model=args.save_model))
        final = history[-1]
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("final metrics:")
    for key, value in final.items():
        if isinstance(value, (int, float)):
            print(f"  {key} = {value:.6g}")
    print(placement_table(json.loads(final["placement"])))
    return 0


def placement_table(placement: list[dict[str, Any]]) -> str:
    """Which experts of which MoE layer live on which rank and node, one line per rank."""
    lines = ["placement:"]
    for worker in placement:
        where = f"node {worker.get('node_id') or 'local'}" + (f" gpu {worker['gpu_id']}" if worker.get("gpu_id") is not None else "")
        experts = "; ".join(f"moe{layer} experts {ids}" for layer, ids in worker["experts"].items())
        lines.append(f"  rank {worker['rank']} ({where}): {experts or 'no MoE layers'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
