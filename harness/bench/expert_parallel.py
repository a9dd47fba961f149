"""The expert_parallel section: the counted and the static all-to-all on spawned gloo ranks
(:func:`expert_parallel_throughput`)."""

from __future__ import annotations

import json

import torch

from ..models import create_model
from .common import CIFAR_CLASSES, interleaved_step_seconds, make_step, spread_routing

EXPERT_PARALLEL_DISPATCHES = ("loop", "padded")


def _expert_parallel_rank(rank: int, world: int, store: str, batch_size: int, steps: int, out: str) -> None:
    """One spawned gloo rank of :func:`expert_parallel_throughput`: both exchanges' models side by side,
    their steps timed in turns; rank 0 writes the seconds per step of each as JSON."""
    import os

    import torch.distributed as dist

    from ..moe.parallel import Collective, shard_experts, sync_gradients

    torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        collective = Collective()
        generator = torch.Generator().manual_seed(rank)
        images = torch.randn(batch_size, 3, 32, 32, generator=generator)
        labels = torch.randint(0, CIFAR_CLASSES, (batch_size,), generator=generator)
        steps_by_dispatch = []
        for dispatch in EXPERT_PARALLEL_DISPATCHES:
            torch.manual_seed(0)  # the same model on every rank before sharding
            model = create_model(
                "resnet18_moe",
                num_classes=CIFAR_CLASSES,
                num_experts=4,
                k=2,
                position=4,
                dispatch=dispatch,
                capacity_factor=1.0,
                noisy=True,
            )
            spread_routing(model)  # else every token would travel to the same expert's rank
            shard_experts(model, collective)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
            step = make_step(
                model,
                optimizer,
                images,
                labels,
                torch.device("cpu"),
                after_backward=lambda model=model: sync_gradients(model, collective, expert_parallel=True),
            )
            for _ in range(2):
                step()
            steps_by_dispatch.append(step)
        seconds = interleaved_step_seconds(steps_by_dispatch, steps, dist.barrier)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(dict(zip(EXPERT_PARALLEL_DISPATCHES, seconds)), f)
    finally:
        dist.destroy_process_group()


def expert_parallel_throughput(world: int, batch_size: int, steps: int) -> dict[str, float]:
    """Images/s over all ranks, by dispatch, of ``resnet18_moe`` (E=4, k=2, layer4, capacity factor 1.0)
    trained expert-parallel on ``world`` spawned CPU processes (gloo), each with ``batch_size`` images:
    ``"loop"`` exchanges counts first and sends exactly the routed tokens, ``"padded"`` sends fixed
    capacity-padded blocks (:class:`~harness.moe.parallel.PaddedExpertParallelDispatcher`). Both models
    live in the same ranks and their steps are timed in turns (:func:`interleaved_step_seconds`)."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "seconds.json")
        # Spawned ranks find _expert_parallel_rank by its module name, harness.bench.expert_parallel, which is
        # never ``__main__`` (``python -m harness.bench`` runs harness/bench/__main__.py).
        mp.start_processes(
            _expert_parallel_rank,
            args=(world, os.path.join(folder, "store"), batch_size, steps, out),
            nprocs=world,
            start_method="spawn",
        )
        with open(out) as f:
            seconds = json.load(f)
    return {dispatch: world * batch_size / seconds[dispatch] for dispatch in EXPERT_PARALLEL_DISPATCHES}
