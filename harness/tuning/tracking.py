"""Experiment trackers a study asks for (``tracking:`` in its YAML), through Ray Tune's own logger callbacks.

- MLflow: ``MLflowLoggerCallback``, one MLflow run per trial (named like the trial, tagged with the study),
  the trial's swept values as parameters and every reported figure as a metric under its flat name
  (``val_top1``, ``moe0_importance_cv``), one step per epoch.
- W&B: ``WandbLoggerCallback``, one W&B run per trial, grouped by study, with the same parameters (its
  config) and metrics; ``mode: offline`` writes the runs under ``dir`` for a later ``wandb sync``.
- TensorBoard: Tune's ``TBXLoggerCallback`` event files in each trial's folder.

At the end of the sweep :func:`log_report` adds one more run per tracker, ``<study>-report``, holding the
study's ``report.md`` and its plots as artifacts. The trackers' packages are optional extras
(``pip install 'moe-bench[mlflow]'``...); the study's validation names a missing one before Ray starts.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any

from ..config import TrackingConfig, resolve_entry
from ..storage import Location


def trial_params(tune_config: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters for a tracker: its name, who chose its values, and its swept values under
    ``sweep.<key>`` (the names of ``trials.parquet``'s columns). Not ``trial``: Ray's W&B logger later adds
    the raw Tune config, whose ``trial`` entry would replace it."""
    entry = resolve_entry(tune_config)
    return {
        "trial_name": entry["name"],
        "search": entry["search"],
        **{f"sweep.{k}": v for k, v in entry["values"].items()},
    }


class _TrialParams:
    """Mixin for Ray's logger callbacks: they log ``trial.config`` as the run's parameters when a trial
    starts; for that call only, the trial shows :func:`trial_params` instead of its raw Tune config
    (``{"trial": {"overrides": ...}}``, whose nested overrides would become unreadable parameter names)."""

    def log_trial_start(self, trial: Any) -> None:
        config = trial.config
        trial.config = trial_params(config)
        try:
            super().log_trial_start(trial)  # type: ignore[misc]
        finally:
            trial.config = config


def allow_file_store(tracking_uri: str | None) -> None:
    """MLflow 3 refuses its file store (``file:///.../mlruns``) unless ``MLFLOW_ALLOW_FILE_STORE`` is set;
    a study that names one chose it, so it is allowed for this process."""
    if tracking_uri is not None and (tracking_uri.startswith("file:") or "://" not in tracking_uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def wandb_dir(tracking: TrackingConfig) -> str:
    """W&B's folder as an absolute path (its logging actors do not run in the launching folder): ``dir``,
    else the launching folder (W&B adds ``wandb/`` inside)."""
    return str(pathlib.Path(tracking.wandb.dir or ".").resolve())


def prepare_tracker_env(tracking: TrackingConfig | None) -> None:
    """The environment the trackers' callbacks read in this process (set on every run of the sweep, a
    resumed one too, whose callbacks Tune restores from the first run): MLflow's file store allowed when
    chosen; W&B's offline or disabled mode (Ray's callback asks for an API key unless the env says so)."""
    if tracking is None:
        return
    if tracking.mlflow is not None:
        allow_file_store(tracking.mlflow.tracking_uri)
    if tracking.wandb is not None and tracking.wandb.mode != "online":
        os.environ["WANDB_MODE"] = tracking.wandb.mode


def tracker_callbacks(tracking: TrackingConfig | None, study: str) -> list[Any]:
    """The Tune callbacks for the trackers ``tracking`` chooses (none for ``None``); their environment is
    :func:`prepare_tracker_env`'s."""
    if tracking is None:
        return []
    callbacks: list[Any] = []
    if tracking.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        class MLflowTrials(_TrialParams, MLflowLoggerCallback):
            """Ray's MLflow logger with :func:`trial_params` as each run's parameters."""

        callbacks.append(
            MLflowTrials(
                tracking_uri=tracking.mlflow.tracking_uri,
                experiment_name=tracking.mlflow.experiment or study,
                tags={"study": study},
            )
        )
    if tracking.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        class WandbTrials(_TrialParams, WandbLoggerCallback):
            """Ray's W&B logger with :func:`trial_params` as each run's config."""

        callbacks.append(
            WandbTrials(
                project=tracking.wandb.project or study, group=study, mode=tracking.wandb.mode, dir=wandb_dir(tracking)
            )
        )
    if tracking.tensorboard:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    return callbacks


def log_report(tracking: TrackingConfig | None, study: str, folder: Location) -> list[str]:
    """Log the study's ``report.md`` and ``plots/*.png`` (from ``folder``, local or an object store) as
    artifacts of one ``<study>-report`` run per tracker; returns a line per tracker saying where."""
    if tracking is None or (tracking.mlflow is None and tracking.wandb is None):
        return []
    lines = []
    with tempfile.TemporaryDirectory(prefix="harness-report-") as tmp:
        report, plots = _local_copy(folder, pathlib.Path(tmp))
        if tracking.mlflow is not None:
            lines.append(_mlflow_report(tracking, study, report, plots))
        if tracking.wandb is not None:
            lines.append(_wandb_report(tracking, study, report, plots))
    return lines


def _local_copy(folder: Location, tmp: pathlib.Path) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """``report.md`` and the plots copied into ``tmp`` (trackers upload local files)."""
    report = tmp / "report.md"
    report.write_bytes((folder / "report.md").read_bytes())
    (tmp / "plots").mkdir()
    plots = []
    for name in (folder / "plots").list_files():
        plots.append(tmp / "plots" / name)
        plots[-1].write_bytes((folder / "plots" / name).read_bytes())
    return report, plots


def _mlflow_report(tracking: TrackingConfig, study: str, report: pathlib.Path, plots: list[pathlib.Path]) -> str:
    import mlflow
    from mlflow.tracking import MlflowClient

    allow_file_store(tracking.mlflow.tracking_uri)
    client = MlflowClient(tracking_uri=tracking.mlflow.tracking_uri)
    name = tracking.mlflow.experiment or study
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=f"{study}-report", tags={"study": study})
    client.log_artifact(run.info.run_id, str(report))
    for plot in plots:
        client.log_artifact(run.info.run_id, str(plot), artifact_path="plots")
    client.set_terminated(run.info.run_id)
    uri = tracking.mlflow.tracking_uri or mlflow.get_tracking_uri()
    return f"MLflow: run {study}-report in experiment {name!r} at {uri}"


def _wandb_report(tracking: TrackingConfig, study: str, report: pathlib.Path, plots: list[pathlib.Path]) -> str:
    import wandb

    run = wandb.init(
        project=tracking.wandb.project or study,
        group=study,
        name=f"{study}-report",
        job_type="report",
        mode=tracking.wandb.mode,
        dir=wandb_dir(tracking),
        reinit="create_new",
        settings=wandb.Settings(silent=True),
    )  # the sweep prints where the run went
    try:
        run.log({f"plots/{plot.stem}": wandb.Image(str(plot)) for plot in plots})
        artifact = wandb.Artifact(f"{study}-report", type="report")
        artifact.add_file(str(report))
        for plot in plots:
            artifact.add_file(str(plot), name=f"plots/{plot.name}")
        run.log_artifact(artifact)
        where = run.dir
    finally:
        run.finish()
    return f"W&B ({tracking.wandb.mode}): run {study}-report in project {tracking.wandb.project or study!r} ({where})"
