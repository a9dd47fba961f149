"""Ray Train wrapper around :func:`harness.training.loop.train_loop`: one ``TorchTrainer`` per run, built from the
config's ``distributed`` section.

Ray Train V2 (the default in Ray 2.60) resumes a run whose storage path and name already hold checkpoints,
so run names are deterministic: ``<study>-<hash of the run config>``. Multi-node runs need a storage path
every node can reach (S3/GCS URI or a shared filesystem such as NFS): workers write their checkpoint files
there and restarted workers read them back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import posixpath
import sys
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ..config import DistributedConfig, RunConfig
from ..console import epoch_line, verbose_line
from ..errors import HarnessError, TrainingError
from ..moe.parallel import Collective
from ..storage import ray_init_env, remove_other_checkpoints
from ..tasks.base import Session
from .loop import train_loop

# Metric naming the worker group's placement group (hex id), reported by every worker.
PLACEMENT_GROUP_KEY = "train_placement_group"


def run_name(config: RunConfig, study_name: str) -> str:
    """``distributed.run_name`` or ``<study>-<12 hex digits of the config's hash>``."""
    if config.distributed.run_name:
        return config.distributed.run_name
    digest = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    return f"{study_name}-{digest[:12]}"


def resolve_use_gpu(distributed: DistributedConfig) -> bool:
    """``use_gpu: auto`` means: the connected Ray cluster has GPUs."""
    if distributed.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(distributed.use_gpu)


def scaling_config(distributed: DistributedConfig, use_gpu: bool) -> ScalingConfig:
    """Workers, their resources (fractional GPUs allowed) and the placement strategy."""
    resources = distributed.worker_resources(use_gpu)
    return ScalingConfig(
        num_workers=distributed.num_workers,
        use_gpu=use_gpu,
        resources_per_worker=resources,
        placement_strategy=distributed.placement_strategy,
    )


def storage_uri(path: str) -> str:
    """Ray wants absolute local paths; URIs (``s3://``...) pass through."""
    return path if "://" in path else str(pathlib.Path(path).resolve())


def train_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs on every Ray Train worker: rebuild the config, join the process group Ray set up, resume from
    the latest checkpoint if any, train. Returns the run's per-epoch history (rank 0's becomes
    ``Result.return_value``)."""
    config = RunConfig.model_validate(loop_config["config"])
    if not loop_config.get("verbose"):
        # Ray Train logs every report (the whole metrics dict) at INFO through loggers named by file path,
        # below the root logger: raising the root's level keeps the console to rank 0's epoch lines.
        logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    gpu_ids = ray.get_gpu_ids()

    placement_group = ray.util.get_current_placement_group()
    line = verbose_line if loop_config.get("verbose") else epoch_line

    def report(metrics: dict[str, Any], checkpoint_dir: pathlib.Path | None = None) -> None:
        has_files = checkpoint_dir is not None and any(checkpoint_dir.iterdir())
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if has_files else None
        if rank == 0:
            print(line(metrics, config.train.epochs), flush=True)
        if placement_group is not None:  # lets a sweep reclaim it if Tune stops the trial mid-run
            metrics = {**metrics, PLACEMENT_GROUP_KEY: placement_group.id.hex()}
        ray.train.report(metrics, checkpoint=checkpoint)

    def run(restore_dir: pathlib.Path | None) -> list[dict[str, Any]]:
        session = Session(
            collective=Collective(),
            expert_parallel=config.distributed.expert_parallel,
            device=ray.train.torch.get_device(),
            restore_dir=restore_dir,
            checkpoint_every=config.distributed.checkpoint_every,
            worker={"node_id": ray.get_runtime_context().get_node_id(), "gpu_id": gpu_ids[0] if gpu_ids else None},
        )
        return train_loop(config, report, session=session)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return run(None)
    with checkpoint.as_directory() as folder:
        return run(pathlib.Path(folder))


def fit(
    config: RunConfig,
    study_name: str,
    name: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
    verbose: bool = False,
) -> ray.train.Result:
    """Train ``config`` with Ray Train (connecting to ``RAY_ADDRESS`` or starting a local Ray); returns the
    Ray ``Result``: ``.return_value`` is the history (one metrics dict per epoch, across restarts),
    ``.metrics``/``.metrics_dataframe`` cover the epochs that wrote a checkpoint. ``name`` and
    ``storage_path`` override the config's; ``callbacks`` are Ray Train callbacks (the sweep passes
    Tune's ``TuneReportCallback``); ``verbose``: rank 0 prints every metric per epoch, not the short line."""
    if not ray.is_initialized():
        # The workers' output reaches the console (rank 0's epoch lines); Ray's own INFO lines with --verbose.
        ray.init(
            include_dashboard=False,
            log_to_driver=True,
            logging_level=logging.INFO if verbose else logging.WARNING,
            **ray_init_env(),
        )
    d = config.distributed
    use_gpu = resolve_use_gpu(d)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "verbose": verbose},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=scaling_config(d, use_gpu),
        run_config=ray.train.RunConfig(
            name=name or run_name(config, study_name),
            storage_path=storage_uri(storage_path or d.storage_path),
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=d.num_to_keep),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise worker_error(exc) from exc
    keep_last_checkpoint(result)
    return result


# Ray Train (V2) lists a run's checkpoints here; a run started under the same name restores the list and
# refuses to start if a checkpoint on it is gone.
RUN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def keep_last_checkpoint(result: ray.train.Result) -> None:
    """Delete a finished run's checkpoints but its latest: :mod:`harness.evaluate` reads the latest, and so
    does a rerun of the same run, which then has nothing left to train. (While it trains, a run keeps
    ``num_to_keep`` checkpoints.) Ray Train's run snapshot is rewritten first to list only the latest, as
    Ray itself saves the list before it deletes, so an interruption in between leaves a folder nothing
    lists, never a listed one that is gone. A snapshot of a layout not known here keeps every checkpoint."""
    latest = result.checkpoint
    if latest is None:  # checkpoint_every: 0
        return
    fs = latest.filesystem
    run_path, name = posixpath.split(latest.path.rstrip("/"))
    snapshot = posixpath.join(run_path, RUN_SNAPSHOT_FILE)
    try:
        if fs.get_file_info(snapshot).type != pafs.FileType.File:
            raise ValueError("no such file")
        with fs.open_input_stream(snapshot) as f:
            state = snapshot_of(json.loads(f.read()), name)
        with fs.open_output_stream(snapshot) as f:
            f.write(json.dumps(state).encode())
        remove_other_checkpoints(fs, latest.path)
    except (OSError, KeyError, TypeError, ValueError) as exc:  # the run itself succeeded: warn, keep its files
        print(
            f"warning: kept every checkpoint of {run_path}: its {RUN_SNAPSHOT_FILE} is not as expected ({exc})",
            file=sys.stderr,
            flush=True,
        )


def snapshot_of(state: dict[str, Any], name: str) -> dict[str, Any]:
    """Ray Train's run snapshot ``state`` listing only the checkpoint folder ``name``, its latest; a
    ValueError when ``name`` is not its latest or a checkpoint still awaits validation."""
    latest = state["latest_checkpoint_result"]["checkpoint_dir_name"]
    results, indices = state["checkpoint_results"], state["checkpoint_report_indices"]
    if latest != name or len(results) != len(indices) or state.get("pending_training_results"):
        raise ValueError(f"latest {latest}, expected {name}; {len(results)} checkpoints, {len(indices)} report indices")
    kept = [i for i, result in enumerate(results) if result["checkpoint_dir_name"] == name]
    state = {
        **state,
        "checkpoint_results": [results[i] for i in kept],
        "checkpoint_report_indices": [indices[i] for i in kept],
    }
    for key, names in state.items():  # validated_checkpoint_dir_names and the like
        if key.endswith("_checkpoint_dir_names"):
            state[key] = [n for n in names if n == name]
    return state


def worker_error(exc: Exception) -> HarnessError:
    """The user-facing error behind a failed run: the first failing rank's own :class:`HarnessError`
    (a non-finite loss, a bad data root) when it raised one, else a one-line summary of its exception."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause: BaseException | None = failures[rank]
        while cause is not None:
            if isinstance(cause, HarnessError):
                return type(cause)(f"rank {rank}: {cause}")
            cause = getattr(cause, "cause", None) or cause.__cause__
    if failures:
        rank = min(failures)
        message = (str(failures[rank]).strip().splitlines() or [""])[0]
        return TrainingError(f"Ray Train run failed on rank {rank}: {type(failures[rank]).__name__}: {message}")
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return TrainingError(f"Ray Train run failed: {' '.join(lines[:3])[:300]}")
