"""Shared fixtures: seeded torch, the shared real data sets (skipped with a reason when absent)."""

from __future__ import annotations

import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def shared_path(*parts: str) -> pathlib.Path:
    """A path under ../shared/data, skipping the test when a fresh clone elsewhere lacks it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (only present beside the project checkout)")
    return path


@pytest.fixture
def mnist_root() -> pathlib.Path:
    return shared_path("mnist")


@pytest.fixture(scope="session")
def ray_cluster():
    """One real Ray cluster for every end-to-end test: two simulated nodes of one CPU each (they share
    this machine's IP, so placement is checked by node ID)."""
    import ray
    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": 1, "object_store_memory": 100 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
