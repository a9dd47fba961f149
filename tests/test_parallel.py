"""Expert and data parallelism on plain torch.distributed (gloo, CPU, two spawned processes)."""

import json
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.moe.collective import LOCAL
from harness.moe.parallel import ExpertPlacement

from .ep_equivalence import CASES, MODERN_CASES, UNSTEERED, all_cases, case_failures, case_key


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


ALL_KEYS = [case_key(*c) for c in CASES] + [UNSTEERED] + sorted(MODERN_CASES)


@pytest.mark.ray(cluster=False)
@pytest.mark.parametrize("key", ALL_KEYS)
def test_expert_parallel_equals_one_process_on_the_union(two_rank_results, key):
    """Every case (top-1, top-2, capacity drops, 3 experts on 2 ranks, each exchange and way of running
    the owner's experts, no steering, expert choice, bias balancing): 2 expert-parallel ranks equal one
    process on the union of their batches; see :func:`tests.ep_equivalence.case_failures`."""
    assert case_failures(key, two_rank_results) == []


# ---------------------------------------------------------------------------------------------------------
# The whole model through the real training loop: expert parallelism on 2 ranks equals data parallelism
# (every rank holds every expert) on the same 2 ranks.

WHOLE_MODEL_RUNS = {
    # Expert BatchNorm differs by design: an expert-parallel owner normalises its expert's tokens from all
    # ranks at once (one process on the global batch; proved for the layer above), a data-parallel rank
    # only its own. With BatchNorm statistics fixed (train.frozen_bn) nothing else may differ.
    "resnet18_moe": {
        "model": {"name": "resnet18_moe"},
        "train": {"frozen_bn": True},
        "moe": {"num_experts": 4, "k": 2, "position": 4, "expert_width": 8},
    },
    "small_cnn_moe": {"model": {"name": "small_cnn_moe"}, "moe": {"num_experts": 4, "k": 2}},  # no BatchNorm
    # BatchNorm in training mode after the experts' convolution: the difference expert parallelism makes.
    "small_cnn_moe_train_bn": {
        "model": {"name": "small_cnn_moe", "expert": {"conv": [4], "fc": [5, 32], "batchnorm": [0]}},
        "moe": {"num_experts": 4, "k": 2},
    },
}


def whole_model_config(name: str, cache: str):
    """One loss method (importance) and one hard constraint (relative importance) together, 3 SGD steps
    on synthetic CIFAR."""
    from harness.config import validate_run

    raw = {
        "data": {
            "name": "synthetic_cifar",
            "root": cache,
            "batch_size": 16,
            "synthetic": {"train_per_class": 1, "test_per_class": 1},
        },
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 1, "max_steps_per_epoch": 3, "device": "cpu"},
    }
    spec = WHOLE_MODEL_RUNS[name]
    raw["model"], raw["train"] = spec["model"], {**raw["train"], **spec.get("train", {})}
    raw["moe"] = {
        **spec["moe"],
        "losses": {"importance": 0.5},
        "constraint": {"type": "relative_importance", "threshold": 0.2},
    }
    return validate_run(raw)


def _whole_model_worker(rank: int, world: int, store: str, cache: str, out: str) -> None:
    import shutil

    from harness.tasks.base import Session
    from harness.training.loop import train_loop

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # model, images and reductions in float64: see WHOLE_MODEL_TOLERANCE
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from harness.moe.parallel import Collective

        for name in WHOLE_MODEL_RUNS:
            for expert_parallel in (True, False):
                folder = pathlib.Path(out, f"{name}_ep{int(expert_parallel)}")
                folder.mkdir(exist_ok=True)

                def keep(metrics, checkpoint_dir=None, folder=folder):
                    if checkpoint_dir is not None:
                        shutil.copytree(checkpoint_dir, folder, dirs_exist_ok=True)

                session = Session(collective=Collective(), expert_parallel=expert_parallel, checkpoint_every=1)
                history = train_loop(whole_model_config(name, cache), keep, session=session)
                if rank == 0:
                    (folder / "history.json").write_text(json.dumps(history))
    finally:
        dist.destroy_process_group()


def _global_state(folder: pathlib.Path, expert_parallel: bool) -> dict[str, torch.Tensor]:
    """The whole model's state: replicated tensors, plus each rank's experts renamed to global ids."""
    state = dict(torch.load(folder / "replicated.pt", weights_only=True)["model"])
    for rank in range(2) if expert_parallel else ():
        owned = ExpertPlacement(4, 2).local_experts(rank)
        for name, tensor in torch.load(folder / f"experts_rank{rank}.pt", weights_only=True)["model"].items():
            head, _, rest = name.partition(".experts.")
            local, _, tail = rest.partition(".")
            state[f"{head}.experts.{owned[int(local)]}.{tail}"] = tensor
    return state


COMPARED_METRICS = (
    "train_loss",
    "train_task_loss",
    "train_importance_loss",
    "val_loss",
    "val_top1",
    "moe0_importance_cv",
    "moe0_load_cv",
    "moe0_living_experts",
    "moe0_usage_entropy_bits",
    "moe0_mutual_info_bits",
    "moe0_expert_similarity",  # gathered from both ranks under expert parallelism
)


@pytest.fixture(scope="module")
def whole_model_runs(tmp_path_factory):
    from harness.data import load_dataset

    folder = tmp_path_factory.mktemp("whole")
    cache = str(folder / "cache")
    load_dataset(whole_model_config("small_cnn_moe", cache).data)  # written once, before the ranks read it
    mp.start_processes(
        _whole_model_worker, args=(2, str(folder / "store"), cache, str(folder)), nprocs=2, start_method="spawn"
    )
    runs = {}
    for name in WHOLE_MODEL_RUNS:
        runs[name] = [
            (
                _global_state(folder / f"{name}_ep{ep}", bool(ep)),
                json.loads((folder / f"{name}_ep{ep}" / "history.json").read_text()),
            )
            for ep in (1, 0)
        ]
    return runs


def _differences(runs, name) -> tuple[dict[str, float], dict[str, float]]:
    (ep_state, ep_history), (dp_state, dp_history) = runs[name]
    assert sorted(ep_state) == sorted(dp_state)
    tensors = {
        k: (ep_state[k].double() - dp_state[k].double()).abs().max().item() for k in dp_state if dp_state[k].numel()
    }
    metrics = {
        f"{m}@{e['epoch']:.0f}": abs(e[m] - d[m]) for e, d in zip(ep_history, dp_history) for m in COMPARED_METRICS
    }
    return tensors, metrics


# Summation order only: an expert's gradient is one sum over both ranks' tokens under expert parallelism,
# two per-rank sums and an all-reduce under data parallelism. The runs are in float64 (eps 2.2e-16), so
# rounding through 3 SGD steps stays below ~1e-13 on any CPU's kernels, while a wrong token, scale or
# constraint state moves weights and metrics by more than 1e-4.
WHOLE_MODEL_TOLERANCE = 1e-9


@pytest.mark.ray(cluster=False)
@pytest.mark.parametrize("name", ["resnet18_moe", "small_cnn_moe"])
def test_whole_model_expert_parallel_equals_data_parallel(whole_model_runs, name):
    tensors, metrics = _differences(whole_model_runs, name)
    assert len(tensors) > 20 and any(".experts.3." in k for k in tensors) and any(".constraint." in k for k in tensors)
    assert {k: v for k, v in tensors.items() if v > WHOLE_MODEL_TOLERANCE} == {}
    assert {k: v for k, v in metrics.items() if v > WHOLE_MODEL_TOLERANCE} == {}
    (ep_state, ep_history), _ = whole_model_runs[name]
    assert ep_history[-1]["train_importance_loss"] > 0  # the loss method and the constraint were in the run
    assert any(v.abs().sum() > 0 for k, v in ep_state.items() if k.endswith("constraint.running"))


@pytest.mark.ray(cluster=False)
def test_whole_model_differs_only_through_expert_batchnorm_statistics(whole_model_runs):
    """With BatchNorm in training mode the two differ, by more than rounding: the expert BatchNorms'
    batch statistics are the one thing expert parallelism computes over a different set of tokens (all
    ranks' tokens of that expert, not one rank's), and their running statistics show it."""
    tensors, metrics = _differences(whole_model_runs, "small_cnn_moe_train_bn")
    running = {k: v for k, v in tensors.items() if ".experts." in k and k.endswith(("running_mean", "running_var"))}
    assert max(running.values()) > 100 * WHOLE_MODEL_TOLERANCE
    assert max(v for k, v in tensors.items() if k.endswith("weight")) > WHOLE_MODEL_TOLERANCE
    assert max(metrics.values()) > WHOLE_MODEL_TOLERANCE
