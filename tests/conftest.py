"""Shared fixtures: seeded torch, the shared real data sets (skipped with a reason when absent), the one
Ray cluster, and the guard that keeps ``pytest -m "not ray"`` fast: a test that starts a Python process
(``subprocess`` or a multiprocessing spawn) must carry the ``ray`` marker, or it fails."""

from __future__ import annotations

import multiprocessing.util
import pathlib
import subprocess
import sys

import pytest
import torch

from .helpers import shared_path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _processes_need_a_marker(request, monkeypatch) -> None:
    """Fail an unmarked test that starts a Python process: those take seconds each, and the fast loop
    (``pytest -m "not ray"``) must stay fast. Short tools (``uname``) are fine anywhere."""
    if request.node.get_closest_marker("ray"):
        return
    popen_init = subprocess.Popen.__init__

    def refuse(what: str) -> None:
        raise AssertionError(f"{request.node.nodeid} starts {what}: mark it @pytest.mark.ray (or ray)")

    def guarded_popen(self, args, *rest, **kwargs):
        command = [args] if isinstance(args, (str, bytes)) else list(args)
        if command and str(command[0]) == sys.executable:
            refuse(f"a Python process ({' '.join(map(str, command[:3]))} ...)")
        popen_init(self, args, *rest, **kwargs)

    def guarded_spawn(path, args, passfds):
        refuse("a multiprocessing spawn")

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_popen)
    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", guarded_spawn)


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
    # Workers' output stays in Ray's logs: forwarded to this process's stderr at any moment, it would land
    # in whatever test is capturing stderr then (the bad-input tests require exactly one line there).
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
