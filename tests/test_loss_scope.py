"""``moe.losses.scope`` (issue 34): ``global_batch`` takes the balance statistics over all data-parallel ranks
(2 ranks equal one process on the union batch), ``micro_batch`` over each rank's own batch (2 ranks equal
the mean of one process on each rank's batch). Hand-worked: rank 0's tokens lean to expert 0, rank 1's to
expert 1, so the global batch is balanced and each rank's is not."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from harness.config import validate_run
from harness.moe import AuxWeights, build_moe_layer, weighted_aux_losses
from harness.moe.collective import LOCAL, Collective
from harness.moe.parallel import set_collective, sync_gradients

TOKENS_PER_RANK, CHANNELS, WORLD = 6, 3, 2
SCOPES = ("global_batch", "micro_batch")


def _layer() -> nn.Module:
    """E = k = 2 experts; the gate's logits are ``+-ln(3)/2`` times channel 0's mean, so a token whose
    channel 0 is +1 gets gates (0.75, 0.25) and one whose channel 0 is -1 gets (0.25, 0.75)."""
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Conv2d(CHANNELS, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)) for _ in range(2)]
    layer = build_moe_layer(experts, CHANNELS, 2, k=2)
    with torch.no_grad():
        layer.gate.fc.weight.zero_()
        layer.gate.fc.bias.zero_()
        layer.gate.fc.weight[0, 0], layer.gate.fc.weight[1, 0] = math.log(3) / 2, -math.log(3) / 2
    return layer.train()


def _batch() -> torch.Tensor:
    """``[W * N, C, 3, 3]``: rank 0's tokens (rows ``0..N-1``) have channel 0 = +1, rank 1's -1."""
    x = torch.randn(WORLD * TOKENS_PER_RANK, CHANNELS, 3, 3, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 1.0
    x[TOKENS_PER_RANK:, 0] = -1.0
    return x


def _step(x: torch.Tensor, scope: str, collective: Collective) -> tuple[float, dict[str, torch.Tensor]]:
    """One backward of the task loss plus the importance loss (weight 1) under ``scope``, gradients synced:
    ``(importance loss on this rank, {parameter name: gradient})``."""
    layer = _layer()
    set_collective(layer, collective)
    out = layer(x)
    reduce = collective.sum if collective.world_size > 1 else None
    aux = weighted_aux_losses(out.routing, x, AuxWeights(importance=1.0, scope=scope), reduce)
    (out.output.pow(2).mean() + aux["importance_loss"]).backward()
    sync_gradients(layer, collective, expert_parallel=False)
    return float(aux["importance_loss"].detach()), {n: p.grad.clone() for n, p in layer.named_parameters()}


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # see TOLERANCE
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        x = _batch()[rank * TOKENS_PER_RANK : (rank + 1) * TOKENS_PER_RANK]
        torch.save({scope: _step(x, scope, Collective()) for scope in SCOPES}, pathlib.Path(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each rank's ``{scope: (importance loss, gradients)}`` from 2 data-parallel ranks, and one process's:
    on the union batch, and on each rank's batch alone."""
    folder = tmp_path_factory.mktemp("scope")
    mp.start_processes(_worker, args=(str(folder / "store"), str(folder)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        union = _step(_batch(), "global_batch", LOCAL)
        shards = [
            _step(_batch()[r * TOKENS_PER_RANK : (r + 1) * TOKENS_PER_RANK], "global_batch", LOCAL)
            for r in range(WORLD)
        ]
    finally:
        torch.set_default_dtype(previous)
    return ranks, union, shards


# Float64 (eps 2.2e-16): summation order leaves gradients ~1e-16 apart; the scopes differ by ~1e-1.
TOLERANCE = 1e-9


@pytest.mark.ray(cluster=False)
def test_balance_loss_scopes_hand_worked_and_against_one_process(runs):
    ranks, union, shards = runs
    # Hand-worked: each rank's importance is N x (0.75, 0.25) (or reversed): CV^2 with the unbiased variance
    # = 2 (0.25 N)^2 / (0.5 N)^2 = 0.5; the global batch's is N x (1, 1): 0. (The denominator's CV_EPSILON,
    # 1e-10 against (0.5 N)^2 = 9, moves 0.5 by 6e-12.)
    for rank in ranks:
        assert rank["global_batch"][0] == pytest.approx(0.0, abs=1e-10)
        assert rank["micro_batch"][0] == pytest.approx(0.5, abs=1e-10)
    assert union[0] == pytest.approx(0.0, abs=1e-10) and [s[0] for s in shards] == pytest.approx([0.5, 0.5], abs=1e-10)
    names = list(union[1])
    # global_batch on 2 ranks = one process on the union; micro_batch = the mean of one process per rank's batch
    for name in names:
        mean_of_shards = (shards[0][1][name] + shards[1][1][name]) / 2
        for rank in ranks:
            assert (rank["global_batch"][1][name] - union[1][name]).abs().max() <= TOLERANCE, name
            assert (rank["micro_batch"][1][name] - mean_of_shards).abs().max() <= TOLERANCE, name
    gate = "gate.fc.weight"
    assert (ranks[0]["global_batch"][1][gate] - ranks[0]["micro_batch"][1][gate]).abs().max() > 1e-3


def test_scope_reaches_the_loss_weights_from_a_config():
    config = validate_run({"moe": {"losses": {"importance": 0.5, "scope": "micro_batch"}}})
    assert config.moe.losses.aux_weights().scope == "micro_batch" == config.moe.spec().aux_weights.scope
    assert validate_run({}).moe.losses.aux_weights().scope == "global_batch"
