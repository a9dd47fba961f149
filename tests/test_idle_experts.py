"""Experts that get no token in a step get no update, on any world size (issue 35): one process on the
union batch, 2 data-parallel ranks and 2 expert-parallel ranks give the same weights, Adam state and
losses within float64 rounding, while a steered router leaves one expert idle for several steps and
sends another tokens from one rank only."""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from harness.moe import AuxWeights, build_moe_layer, weighted_aux_losses
from harness.moe.collective import LOCAL, Collective
from harness.moe.parallel import set_collective, shard_experts, sync_gradients

NUM_EXPERTS, K, CHANNELS, TOKENS_PER_RANK, STEPS, WORLD = 4, 2, 4, 8, 4, 2
ONE_RANK = 2  # gets tokens from rank 0 only, every step
LATE_IDLE = 3  # gets rank 1's tokens in step 0 only, then none: Adam's moments would carry it on
MODES = ("one_process", "data_parallel", "expert_parallel")


def _layer(batchnorm: bool) -> nn.Module:
    """A top-2 layer of 4 small experts whose gate (GAP -> linear) is set by hand: expert 2 likes channel
    0 (high on rank 0's tokens, low on rank 1's), expert 3 likes channel 2 (high in step 0 only), experts 0
    and 1 split the rest by channel 1. Adam moves each weight by ~lr = 0.01 per step, far too little to
    change these choices in 4 steps."""
    torch.manual_seed(0)
    experts = [
        nn.Sequential(
            nn.Conv2d(CHANNELS, 6, 3, padding=1),
            *([nn.BatchNorm2d(6)] if batchnorm else []),
            nn.ReLU(),
            nn.Conv2d(6, 5, 1),
        )
        for _ in range(NUM_EXPERTS)
    ]
    layer = build_moe_layer(experts, CHANNELS, 5, k=K, dispatch="loop")
    with torch.no_grad():
        fc = layer.gate.fc
        fc.weight.zero_()
        fc.bias.copy_(torch.tensor([1.0, 1.0, 0.0, -20.0]))
        fc.weight[0, 1], fc.weight[1, 1], fc.weight[ONE_RANK, 0], fc.weight[LATE_IDLE, 2] = 1.0, -1.0, 5.0, 10.0
    return layer.train()


def _batch(step: int) -> torch.Tensor:
    """``[W * TOKENS_PER_RANK, C, 5, 5]``, rank r's tokens at rows ``r * TOKENS_PER_RANK ...``."""
    x = torch.randn(WORLD * TOKENS_PER_RANK, CHANNELS, 5, 5, generator=torch.Generator().manual_seed(step))
    x[:TOKENS_PER_RANK, 0] += 3.0
    x[TOKENS_PER_RANK:, 0] -= 3.0
    if step == 0:
        x[TOKENS_PER_RANK:, 2] += 5.0
    return x


def _global_name(name: str, expert_ids: list[int]) -> str:
    """``experts.<local>.rest`` -> ``experts.<global id>.rest``."""
    head, dot, rest = name.partition("experts.")
    if not dot or head:
        return name
    local, _, tail = rest.partition(".")
    return f"experts.{expert_ids[int(local)]}.{tail}"


def _train(mode: str, batchnorm: bool, collective: Collective) -> dict:
    """STEPS Adam steps of ``mode`` on this rank: its losses (global), tokens per expert (this rank's, per
    step) and final state (parameters, buffers and Adam state under global expert names)."""
    layer = _layer(batchnorm)
    rank = collective.rank
    if mode == "expert_parallel":
        shard_experts(layer, collective)
    elif mode == "data_parallel":
        set_collective(layer, collective)
    one = mode == "one_process"
    group = LOCAL if one else collective
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.01)
    losses, tokens = [], []
    for step in range(STEPS):
        x = _batch(step) if one else _batch(step)[rank * TOKENS_PER_RANK : (rank + 1) * TOKENS_PER_RANK]
        out = layer(x)
        aux = weighted_aux_losses(out.routing, x, AuxWeights(importance=0.5), None if one else collective.sum)
        loss = out.output.pow(2).mean() + sum(aux.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(layer, group, expert_parallel=mode == "expert_parallel")
        optimizer.step()
        losses.append(float(group.sum_(loss.detach().clone()) / group.world_size))
        tokens.append(out.routing.dispatch_mask.sum(dim=0).tolist())
    ids = layer.expert_ids
    names = {id(p): _global_name(n, ids) for n, p in layer.named_parameters()}
    state = {_global_name(n, ids): t.detach().clone() for n, t in layer.state_dict().items()}
    adam = {
        f"{names[id(p)]}:{key}": torch.as_tensor(value).clone()
        for p, values in optimizer.state.items()
        for key, value in values.items()
    }
    return {"losses": losses, "tokens": tokens, "state": state, "adam": adam, "experts": ids}


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # see TOLERANCE
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        collective = Collective()
        runs = {
            (mode, batchnorm): _train(mode, batchnorm, collective)
            for batchnorm in (False, True)
            for mode in MODES
            if not (batchnorm and mode == "data_parallel")
        }
        torch.save(runs, pathlib.Path(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{(mode, batchnorm): [rank 0's run, rank 1's run]}``; data parallelism without BatchNorm only (each
    rank normalises its own tokens there, one process all of them: a difference by design)."""
    folder = tmp_path_factory.mktemp("idle")
    mp.start_processes(_worker, args=(str(folder / "store"), str(folder)), nprocs=WORLD, start_method="spawn")
    per_rank = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {key: [ranks[key] for ranks in per_rank] for key in per_rank[0]}


def _merged(ranks: list[dict], part: str) -> dict[str, torch.Tensor]:
    """The global ``state`` or ``adam`` of a run: replicated entries from rank 0, every rank's experts."""
    merged = dict(ranks[0][part])
    for run in ranks[1:]:
        merged.update({k: v for k, v in run[part].items() if k.startswith("experts.")})
    return merged


# Float64 (eps 2.2e-16): summation order leaves weights and Adam moments ~1e-15 apart through 4 steps,
# while a zero gradient handed to an idle expert moves its weights by ~lr = 1e-2 (Adam's normalised step).
TOLERANCE = 1e-9


@pytest.mark.ray(cluster=False)
@pytest.mark.parametrize(
    "mode,batchnorm", [("data_parallel", False), ("expert_parallel", False), ("expert_parallel", True)]
)
def test_an_idle_expert_gets_no_update_on_any_world_size(runs, mode, batchnorm):
    reference = runs[("one_process", batchnorm)][0]
    ranks = runs[(mode, batchnorm)]
    # The steering held: the late-idle expert got tokens in step 0 only (from rank 1), the one-rank expert
    # only from rank 0, and one process saw the same.
    assert [t[LATE_IDLE] > 0 for t in reference["tokens"]] == [True] + [False] * (STEPS - 1)
    assert all(t[ONE_RANK] > 0 for t in ranks[0]["tokens"]) and all(t[ONE_RANK] == 0 for t in ranks[1]["tokens"])
    assert [t[LATE_IDLE] for t in ranks[0]["tokens"]] == [0] * STEPS
    # Weights, buffers and Adam state of every expert equal one process's: the idle expert has Adam state
    # from step 0 alone (step = 1), as one process leaves it.
    for part in ("state", "adam"):
        ours, theirs = _merged(ranks, part), reference[part]
        assert sorted(ours) == sorted(theirs), part
        off = {k: (ours[k] - theirs[k]).abs().max().item() for k in theirs if theirs[k].numel()}
        assert {k: v for k, v in off.items() if v > TOLERANCE} == {}, part
    adam = _merged(ranks, "adam")
    assert (
        adam[f"experts.{LATE_IDLE}.0.weight:step"].item() == 1
        and adam[f"experts.{ONE_RANK}.0.weight:step"].item() == STEPS
    )
    assert max(abs(a - b) for a, b in zip(ranks[0]["losses"], reference["losses"])) <= TOLERANCE
    if batchnorm:  # the idle expert's statistics moved in step 0 only: its owner ran it on an empty slice since
        assert _merged(ranks, "state")[f"experts.{LATE_IDLE}.1.num_batches_tracked"].item() == 1
