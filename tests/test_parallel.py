"""Expert and data parallelism on plain torch.distributed (gloo, CPU, two spawned processes)."""

import json
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .ep_equivalence import CASES, MODERN_CASES, UNSTEERED, all_cases, case_key
from harness.moe.parallel import LOCAL, ExpertPlacement

TOLERANCE = 1e-5


def test_contiguous_placement_and_the_uneven_rule():
    placement = ExpertPlacement(10, 4)
    assert placement.sizes() == [3, 3, 2, 2]
    assert placement.local_experts(0) == [0, 1, 2] and placement.local_experts(3) == [8, 9]
    assert placement.owner().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert placement.local_index().tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 1]
    assert ExpertPlacement(4, 2).local_experts(1) == [2, 3]
    with pytest.raises(ValueError, match="at least one expert per rank"):
        ExpertPlacement(2, 3)


def test_local_collective_is_the_identity():
    t = torch.arange(3.0)
    assert LOCAL.world_size == 1 and LOCAL.sum(t) is t
    assert LOCAL.all_gather(t).shape == (1, 3)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(all_cases()))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ep")
    mp.start_processes(_worker, args=(2, str(folder / "store"), str(folder)), nprocs=2, start_method="spawn")
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("k, capacity_factor, dispatch, num_experts", CASES, ids=[case_key(*c) for c in CASES])
def test_expert_parallel_equals_one_process_on_the_union(two_rank_results, k, capacity_factor, dispatch, num_experts):
    key = case_key(k, capacity_factor, dispatch, num_experts)
    for rank, results in enumerate(two_rank_results):
        errors = results[key]
        assert errors["expert_grads_checked"] == ExpertPlacement(num_experts, 2).sizes()[rank]
        for figure in ("output", "loss", "gradients", "constraint"):
            assert errors[figure] <= TOLERANCE, (rank, figure, errors)
        assert errors["dropped"] == 0  # the same number of dropped assignments
        assert (errors["reference_dropped"] > 0) == (capacity_factor is not None)
    # rank 0 routes nothing to the last expert, which rank 1 owns: an empty send in the all-to-all
    assert two_rank_results[0][key]["sent_to_avoided"] == 0
    assert two_rank_results[1][key]["sent_to_avoided"] > 0


@pytest.mark.slow
def test_counted_exchange_when_every_rank_sends_to_every_expert(two_rank_results):
    """Each owner then receives its experts' rows interleaved by source rank and must regroup them."""
    for rank, results in enumerate(two_rank_results):
        errors = results[UNSTEERED]
        assert errors["min_sent"] > 0
        for figure in ("output", "loss", "gradients", "constraint"):
            assert errors[figure] <= TOLERANCE, (rank, figure, errors)


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(MODERN_CASES))
def test_expert_choice_and_bias_balancing_under_expert_parallelism(two_rank_results, key):
    """Expert choice picks each expert's top-C tokens of the union batch, and the bias moves from the union
    batch's loads: 2 expert-parallel ranks equal one process on the union, bias buffers included."""
    for rank, results in enumerate(two_rank_results):
        errors = results[key]
        for figure in ("output", "loss", "gradients", "constraint", "bias", "second_output"):
            assert errors[figure] <= TOLERANCE, (rank, figure, errors)
        assert errors["dropped"] == 0
        if "bias" in key:
            assert errors["bias_moved"] > 0  # the bias did move, identically
