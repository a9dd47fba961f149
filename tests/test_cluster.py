"""The cluster path: a real `ray job submit` of a tiny study to a local token-authenticated Ray head, and
checks of the shipped cluster manifests."""

import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from .helpers import REPO

CLUSTER = REPO / "cluster"
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter, whatever PATH says


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_head(env: dict, temp_dir: pathlib.Path, log: pathlib.Path) -> tuple[subprocess.Popen, str]:
    """``ray start --head`` on fresh free ports; returns the process and the dashboard address."""
    gcs, dashboard, agent_http, agent_grpc, metrics, node_manager, object_manager, runtime_env = free_ports(8)
    workers = 20000 + (os.getpid() % 200) * 100  # a private range of worker ports
    command = [
        *RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--min-worker-port={workers}",
        f"--max-worker-port={workers + 99}",
        "--num-cpus=2",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
    ]
    with open(log, "ab") as out:
        head = subprocess.Popen(command, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    return head, f"http://127.0.0.1:{dashboard}"


def _stop_head(head: subprocess.Popen) -> None:
    """SIGTERM the head's whole process group, SIGKILL after 5 s; fine if it is already gone."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        head.wait()
        return
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            os.killpg(head.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with its own ports and token auth, stopped (its whole process group)
    afterwards without touching any other Ray on this machine. Free ports are picked, then bound by Ray a
    moment later, so another process can take one in between: a head that exits at start is retried on
    new ports (3 attempts); its output is in the failure message."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    temp_dir = pathlib.Path("/tmp") / f"rayjob-{os.getpid()}"  # short: Ray's socket paths have a length limit
    log = pathlib.Path("/tmp") / f"rayjob-{os.getpid()}.log"
    head = None
    try:
        for _attempt in range(3):
            head, address = _start_head(env, temp_dir, log)
            deadline = time.time() + 120
            while (
                subprocess.run([*RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode
                != 0
            ):
                if head.poll() is not None:
                    break
                assert time.time() < deadline, "the Ray head did not come up"
                time.sleep(1)
            if head.poll() is None:
                break
            head.wait()
        else:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise AssertionError(f"ray start exited three times; its output ends with:\n{tail}")
        yield address, env
    finally:
        if head is not None:
            _stop_head(head)
        subprocess.run(["rm", "-rf", str(temp_dir), str(log)])


@pytest.mark.ray
def test_ray_job_submit_runs_a_study_to_the_end(ray_head, tmp_path):
    address, env = ray_head
    study = tmp_path / "jobstudy.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "jobstudy",
                "base": {
                    "data": {
                        "name": "synthetic_cifar",
                        "root": str(tmp_path / "cache"),
                        "batch_size": 16,
                        "synthetic": {"train_per_class": 1, "test_per_class": 1},
                    },
                    "model": {"name": "small_cnn_moe"},
                    "moe": {"num_experts": 2, "k": 1},
                    "train": {"epochs": 1, "max_steps_per_epoch": 2},
                },
                "sweep": {"moe.losses.importance": {"grid": [0.0, 0.5]}},
            }
        )
    )
    results = tmp_path / "results"
    job_id = f"moe-bench-test-{secrets.token_hex(4)}"
    submit = subprocess.run(
        [
            *RAY,
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--no-wait",
            "--submission-id",
            job_id,
            "--runtime-env-json",
            '{"env_vars": {"PYTHONUNBUFFERED": "1"}}',
            "--",
            sys.executable,
            "-m",
            "harness.sweep",
            str(study),
            "--results-dir",
            str(results),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode == 0, submit.stderr[-2000:]
    deadline = time.time() + 400
    status = ""
    while time.time() < deadline:
        answer = subprocess.run(
            [*RAY, "job", "status", "--address", address, job_id], env=env, capture_output=True, text=True
        )
        status = (answer.stdout + answer.stderr).lower()  # "Job '...' succeeded", logged to stderr
        if answer.returncode != 0 or any(word in status for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    answer = subprocess.run(
        [*RAY, "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True
    )
    logs = answer.stdout + answer.stderr
    assert f"job '{job_id}' succeeded" in status, status + logs[-3000:]
    assert "2 trials: 2 ok" in logs
    trials = pd.read_parquet(results / "jobstudy" / "trials.parquet")
    assert trials["status"].tolist() == ["ok", "ok"] and trials["val_top1"].notna().all()
    assert (results / "jobstudy" / "report.md").exists()


@pytest.mark.ray
def test_job_api_refuses_requests_without_the_token(ray_head):
    address, env = ray_head
    without = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    without["RAY_AUTH_TOKEN_PATH"] = "/nonexistent"
    result = subprocess.run(
        [*RAY, "job", "list", "--address", address],
        env={**without, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    # refused by the server for want of a token, not failed for any other reason (no head, a bad address)
    assert "AuthenticationError: Authentication required: Unauthorized: Missing authentication token" in result.stderr
    # and the same request with the token succeeds
    assert (
        subprocess.run([*RAY, "job", "list", "--address", address], env=env, capture_output=True, timeout=60).returncode
        == 0
    )


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _pods(cluster_spec):
    """The pod spec of the head group and of every worker group."""
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


@pytest.mark.parametrize("name, kind", [("rayjob.yaml", "RayJob"), ("raycluster.yaml", "RayCluster")])
def test_kuberay_manifests(name, kind):
    manifest = load(name)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    spec = manifest["spec"]
    if kind == "RayJob":
        assert spec["entrypoint"].startswith("python -m harness.sweep search_spaces/")
        study = spec["entrypoint"].split()[3]
        assert (REPO / study).is_file()
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
        cluster = spec["rayClusterSpec"]
    else:
        cluster = spec
    assert cluster["rayVersion"] == "2.60.0"
    workers = cluster["workerGroupSpecs"]
    assert any(
        c["resources"]["limits"].get("nvidia.com/gpu") for w in workers for c in w["template"]["spec"]["containers"]
    )
    for pod in _pods(cluster):
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert volumes["results"]["persistentVolumeClaim"]["claimName"] == "moe-bench-results"
        for container in pod["containers"]:
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/dev/shm", "/data", "/results"} <= mounts
            assert container["image"].endswith("/moe-bench:latest")  # built from cluster/Dockerfile
            assert container["resources"]["requests"] == container["resources"]["limits"]


def test_dockerfile_installs_the_project_from_its_own_files():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in text
    assert "COPY --chown=ray:users pyproject.toml" in text and "RUN pip install --no-cache-dir ." in text


def test_cluster_launcher_installs_the_project_on_every_node():
    config = load("aws-gpu.yaml")
    assert config["provider"]["type"] == "aws"
    assert config["file_mounts"] == {"/home/ubuntu/moe-bench": "."}
    assert "python3 -m pip install -e /home/ubuntu/moe-bench" in config["setup_commands"]
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")) and gpu["max_workers"] >= 1
    assert config["head_node_type"] in config["available_node_types"]


def test_runtime_env_lists_the_dependencies_the_images_lack():
    runtime_env = load("runtime_env.yaml")
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = lambda specs: {s.split(">")[0].split("<")[0].split("=")[0].split("[")[0] for s in specs}  # noqa: E731
    # everything the project needs except what the Ray + PyTorch image brings
    assert names(declared) - {"torch", "torchvision", "numpy", "ray"} == names(runtime_env["pip"])
