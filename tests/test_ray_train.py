"""End-to-end on a real two-node Ray cluster: expert-parallel equivalence on Ray Train workers, placement
across nodes, worker-failure recovery from sharded checkpoints, and the CLI."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml

from harness.config import validate_run
from harness.moe.parallel import Collective
from harness.training import ray_train
from harness.training.ray_train import RUN_SNAPSHOT_FILE, fit, run_name

from . import ep_equivalence
from .helpers import REPO

pytestmark = pytest.mark.ray


def _equivalence_worker(_config):
    import ray.train

    per_rank = Collective().all_gather_object(ep_equivalence.all_cases())
    failures = {key: ep_equivalence.case_failures(key, per_rank) for key in per_rank[0]}
    ray.train.report({"cases": len(failures)})
    return failures


def test_expert_parallel_equivalence_on_ray_train_workers(ray_cluster, tmp_path):
    """The invariant of ``test_parallel`` with every one of its checks, on two Ray Train workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _equivalence_worker,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name="ep-equivalence",
            storage_path=str(tmp_path),
            worker_runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        ),
    )
    failures = trainer.fit().return_value
    assert len(failures) == len(ep_equivalence.CASES) + 1 + len(ep_equivalence.MODERN_CASES)
    assert {key: found for key, found in failures.items() if found} == {}


def tiny_run(tmp_path, epochs: int = 2, **distributed) -> dict:
    """Two workers, expert parallel, a padded (static-shape) all-to-all and a hard constraint, on
    small_cnn_moe (milliseconds per step: these tests time Ray, not convolutions)."""
    return {
        "data": {
            "name": "synthetic_cifar",
            "root": str(tmp_path / "cache"),
            "batch_size": 16,
            "synthetic": {"train_per_class": 1, "test_per_class": 1},
        },
        "model": {"name": "small_cnn_moe"},
        "moe": {
            "num_experts": 4,
            "k": 2,
            "capacity_factor": 1.25,
            "constraint": {"type": "mean_importance", "threshold": 0.3},
        },
        "train": {"epochs": epochs, "max_steps_per_epoch": 3},
        "distributed": {
            "num_workers": 2,
            "expert_parallel": True,
            "storage_path": str(tmp_path / "runs"),
            **distributed,
        },
    }


def checkpoint_folders(run_dir: pathlib.Path) -> list[pathlib.Path]:
    """A Ray Train run's checkpoint folders (beside them: its checkpoint_manager_snapshot.json)."""
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


@pytest.fixture(scope="module")
def cli_spread_run(ray_cluster, tmp_path_factory):
    """``python -m harness.train`` (a process of its own, as a user runs it) training 2 epochs on 2
    expert-parallel workers of half a CPU each under STRICT_SPREAD: both would fit on one node (PACK puts
    them there), so only the strategy spreads them. Also the uninterrupted run the recovery test compares
    with. Returns the finished process and the run's checkpoint folder: the only one it keeps, its last."""
    folder = tmp_path_factory.mktemp("cli")
    study = folder / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "cli-ep",
                "base": tiny_run(folder, placement_strategy="STRICT_SPREAD", resources_per_worker={"CPU": 0.5}),
            }
        )
    )
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    result = subprocess.run(
        [sys.executable, "-m", "harness.train", str(study)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (folder / "runs").glob("cli-ep-*")
    (last,) = checkpoint_folders(run_dir)  # num_to_keep 2 while training; a finished run keeps its last
    return result, last


def test_cli_runs_expert_parallel_through_ray_train(cli_spread_run):
    result, _ = cli_spread_run
    assert "Ray Train, 2 workers" in result.stdout
    assert "rank 0 (node " in result.stdout and "moe0 experts [0, 1]" in result.stdout
    assert "rank 1 (node " in result.stdout and "moe0 experts [2, 3]" in result.stdout
    assert "val_top1 = " in result.stdout
    # the console: rank 0's one short line per epoch, once each; not Ray Train's per-report metrics dict
    for epoch in (1, 2):
        assert len([line for line in result.stdout.splitlines() if f"epoch {epoch}/2 | loss" in line]) == 1
    assert "Reporting training result" not in result.stdout + result.stderr


def test_strict_spread_places_workers_on_different_nodes(cli_spread_run):
    import json

    import ray

    final = torch.load(cli_spread_run[1] / "replicated.pt", weights_only=True)["history"][-1]
    placement = json.loads(final["placement"])
    assert [w["rank"] for w in placement] == [0, 1]
    nodes = [w["node_id"] for w in placement]
    assert len(set(nodes)) == 2 and set(nodes) <= {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert [w["experts"]["0"] for w in placement] == [[0, 1], [2, 3]]
    # both ranks trained and evaluated: 3 steps of 16 images each, and all 100 validation images once
    assert final["epoch"] == 2 and final["train_images"] == 2 * 3 * 16
    assert round(final["val_top1"] * 100, 6) == round(final["val_top1"] * 100) and final["val_loss"] > 0


def _checkpoint_tensors(latest: pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's checkpoint folder (all ranks' files), and its per-epoch train losses."""
    tensors = {}
    for path in sorted(latest.iterdir()):
        state = torch.load(path, weights_only=True)
        tensors.update({f"{path.stem}/model/{k}": v for k, v in state["model"].items()})
        for param, moments in state["optimizer"].items():
            tensors.update({f"{path.stem}/optimizer/{param}/{k}": torch.as_tensor(v) for k, v in moments.items()})
        if "history" in state:
            tensors["train_loss"] = torch.tensor([m["train_loss"] for m in state["history"]], dtype=torch.float64)
    return tensors


def dies_once(rank: int, epoch: int, step: int, marker: pathlib.Path, run_dir: pathlib.Path):
    """A Ray Train worker function: :func:`harness.training.ray_train.train_worker` whose rank ``rank`` SIGKILLs
    itself before training step ``step`` (from 1) of ``epoch``, once (``marker`` records that it did),
    as the OOM killer or a lost node would: no clean-up at all. Ray ships the closure by value, so the
    workers need not import this module."""

    def worker(loop_config):
        # Runs in a worker process: its harness.training.ray_train.train_worker is the real one (only the driver's
        # name is monkeypatched to this wrapper).
        import signal
        import time

        import ray.train

        import harness.training.loop
        from harness.training.ray_train import train_worker

        def wait_for_checkpoint_of(done_epoch: int) -> None:
            # Ray Train's controller takes a reported checkpoint when it next polls the workers: one that
            # dies before that poll takes its last report with it, and the group restarts from the one
            # before. The controller lists what it took in the run snapshot.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    latest = json.loads((run_dir / RUN_SNAPSHOT_FILE).read_text())["latest_checkpoint_result"]
                    if latest and latest["metrics"]["epoch"] == done_epoch:
                        return
                except (OSError, ValueError):  # not written yet, or being written
                    pass
                time.sleep(0.1)
            raise TimeoutError(f"Ray Train never recorded epoch {done_epoch}'s checkpoint in {RUN_SNAPSHOT_FILE}")

        class DyingRunner:
            """The step runner, with the kill before the chosen step."""

            def __init__(self, runner, world_rank: int) -> None:
                self.runner, self.world_rank = runner, world_rank

            def __getattr__(self, name):  # forward_model, eval_model: the runner's
                return getattr(self.runner, name)

            def __call__(self, batch, at_epoch: int, index: int):
                if (self.world_rank, at_epoch, index + 1) == (rank, epoch, step) and not marker.exists():
                    wait_for_checkpoint_of(epoch - 1)
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
                return self.runner(batch, at_epoch, index)

        build = harness.training.loop.build_step_runner
        harness.training.loop.build_step_runner = lambda *args, **kwargs: DyingRunner(
            build(*args, **kwargs), ray.train.get_context().get_world_rank()
        )
        return train_worker(loop_config)

    return worker


def test_killed_worker_resumes_from_sharded_checkpoint_and_ends_bit_identical(cli_spread_run, tmp_path, monkeypatch):
    """Rank 1 is SIGKILLed in the middle of epoch 2; the group restarts from epoch 1's checkpoint and
    ends with exactly the parameters, optimizer state and losses of the uninterrupted run of the same
    seed (``cli_spread_run``: where the workers sit changes no arithmetic). The data order and gate noise
    are functions of (seed, epoch, rank), the schedule of the epoch, and the checkpoint holds everything
    else (weights, Adam moments, constraint state), so on CPU nothing differs, not even in the last bit.
    The finished run keeps only its last checkpoint, and its run snapshot lists only that one."""
    marker = tmp_path / "worker-died"
    config = validate_run(tiny_run(tmp_path, max_failures=1))
    run_dir = pathlib.Path(config.distributed.storage_path) / run_name(config, "recovery")
    # rank 1 dies in epoch 2, at step 2: fit() runs the wrapper as its worker function
    monkeypatch.setattr(ray_train, "train_worker", dies_once(1, 2, 2, marker, run_dir))
    result = fit(config, "recovery")
    assert marker.exists()  # the worker really died
    # resumed after epoch 1's checkpoint: every epoch exactly once, the first from before the death
    assert [m["epoch"] for m in result.return_value] == [1.0, 2.0]
    assert [m["restored_epoch"] for m in result.return_value] == [0.0, 1.0]
    assert result.metrics["epoch"] == 2
    assert result.metrics_dataframe["epoch"].is_unique
    (latest,) = checkpoint_folders(run_dir)  # epochs 1 and 2 were written; the finished run keeps its last
    snapshot = json.loads((run_dir / RUN_SNAPSHOT_FILE).read_text())
    assert [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]] == [latest.name]
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == latest.name
    assert sorted(p.name for p in latest.iterdir()) == ["experts_rank0.pt", "experts_rank1.pt", "replicated.pt"]
    rank1 = torch.load(latest / "experts_rank1.pt", weights_only=True)["model"]
    replicated = torch.load(latest / "replicated.pt", weights_only=True)["model"]
    assert any(".experts." in name for name in rank1) and not any(".experts." in name for name in replicated)
    assert "moe.constraint.running" in replicated
    recovered, straight = _checkpoint_tensors(latest), _checkpoint_tensors(cli_spread_run[1])
    assert sorted(recovered) == sorted(straight) and len(recovered) > 30
    different = [name for name in straight if not torch.equal(recovered[name], straight[name])]
    assert different == []


def test_worker_error_surfaces_the_ranks_own_message():
    from ray.train import WorkerGroupError

    from harness.errors import DataError, TrainingError
    from harness.training.ray_train import worker_error

    failed = WorkerGroupError(
        "Training failed due to worker errors", {1: TrainingError("non-finite loss (nan) at epoch 3 step 7")}
    )
    error = worker_error(failed)
    assert isinstance(error, TrainingError) and str(error) == "rank 1: non-finite loss (nan) at epoch 3 step 7"
    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = DataError("data.root: /x: no such directory")
    assert isinstance(worker_error(WorkerGroupError("failed", {0: wrapped})), DataError)
    assert str(worker_error(WorkerGroupError("boom", {0: ValueError("bug\ndetails")}))) == (
        "Ray Train run failed on rank 0: ValueError: bug"
    )
