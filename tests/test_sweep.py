"""Sweeps end to end on the shared real Ray cluster: a sweep with a deliberately failing trial, and a
sweep resumed after its driver was killed."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from harness.analysis.aggregate import read_trial_times
from harness.report import write_report
from harness.storage import Location
from harness.sweep import main

from .helpers import S3_BUCKET

pytestmark = pytest.mark.ray


def tiny_study(tmp_path, name, sweep, epochs=1, model="small_cnn_moe", tracking=None):
    study = {
        "name": name,
        "base": {
            "data": {
                "name": "synthetic_cifar",
                "root": str(tmp_path / "cache"),
                "batch_size": 16,
                "synthetic": {"train_per_class": 1, "test_per_class": 1},
            },
            # small_cnn_moe: milliseconds per step, as the tests time Ray, not convolutions
            "model": {"name": model},
            "moe": {"num_experts": 4, "k": 2, **({"expert_width": 8} if model == "resnet18_moe" else {})},
            "optim": {"name": "sgd", "lr": 0.01},
            "train": {"epochs": epochs, "max_steps_per_epoch": 3, "check_every": 1},
        },
        "sweep": sweep,
        **({"tracking": tracking} if tracking else {}),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_sweep_records_a_failing_trial_and_finishes_the_rest(ray_cluster, tmp_path, capsys):
    from harness.evaluate import evaluate_checkpoint

    # lr 1e30 makes the second step's loss non-finite: that trial must fail alone.
    study = tiny_study(tmp_path, "failing", {"optim.lr": {"grid": [0.01, 1.0e30, 0.001]}}, epochs=2)
    # results through a URI: Tune, the aggregator and the report all write via pyarrow filesystems
    assert main([str(study), "--results-dir", f"file://{tmp_path}/results"]) == 0
    out = capsys.readouterr().out
    assert "3 trials: 1 error, 2 ok" in out and f"file://{tmp_path}/results/failing/trials.parquet" in out
    assert (tmp_path / "results" / "failing" / "report.md").exists()
    trials = pd.read_parquet(tmp_path / "results" / "failing" / "trials.parquet")
    assert trials["trial"].tolist() == ["t0000", "t0001", "t0002"]
    assert trials["status"].tolist() == ["ok", "error", "ok"]
    assert trials.loc[1, "error"] == "non-finite loss (nan) at epoch 1 step 2"
    assert trials["sweep.optim.lr"].tolist() == [0.01, 1.0e30, 0.001]
    assert trials.loc[[0, 2], "val_top1"].notna().all() and "moe0_importance_cv" in trials
    assert (trials["config.moe.num_experts"] == 4).all()
    # the sweep timed every trial from the driver: wall time covers the training loop, overhead is the rest
    ok = trials.loc[[0, 2]]
    assert (ok["trial_wall_s"] > ok["train_loop_s"]).all() and (ok["overhead_s"] > 0).all()
    assert (ok["train_loop_s"] > 0).all() and (ok["setup_s"] < ok["overhead_s"]).all()
    assert "median per-trial overhead" in out
    # each finished trial wrote two checkpoints (num_to_keep 2 keeps both while it trains) and keeps only its
    # last: what harness.evaluate reads
    for name in ("t0000", "t0002"):
        trial = tmp_path / "results" / "failing" / name
        assert sorted(p.name for p in trial.glob("checkpoint_*")) == ["checkpoint_000001"]  # Tune counts from 0
        assert evaluate_checkpoint(trial).checkpoint.epoch == 2
    # the results folder now belongs to this study: running it again must not overwrite it
    assert main([str(study), "--results-dir", str(tmp_path / "results")]) == 2  # the same folder as a path
    assert "already holds results of this study; add --resume" in capsys.readouterr().err


def _wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _lines(location):
    """The JSON lines of a file at a :class:`~harness.storage.Location` (none while it does not exist)."""
    return [json.loads(line) for line in location.read_text().splitlines()] if location.exists() else []


@pytest.mark.timeout(900)  # the driver's run and its resume, each minutes on a loaded machine
def test_resume_on_an_object_store_after_the_driver_is_killed(ray_cluster, s3_server, tmp_path, monkeypatch):
    """Results and checkpoints on a real S3 server: a 2-worker Ray Train run, whose checkpoints go to the
    bucket, then an in-process trial of resnet18_moe (its epochs take seconds, so it is still in epoch 2
    when the driver dies), resumed by a new driver from its checkpoint in the bucket; the tables are read
    back with pandas from s3://. (Ray Train's own restore from a checkpoint: test_ray_train.py.)"""
    for name, value in s3_server.items():  # this process reads the bucket too (pandas, pyarrow)
        monkeypatch.setenv(name, value)
    # The Train-backed trial (small_cnn_moe: its epochs take milliseconds, the Ray Train run is the cost): its
    # driver (1 CPU) + 2 workers of half a CPU, the whole 2-CPU cluster.
    rows = [
        {"name": "train", "distributed.num_workers": 2, "model.name": "small_cnn_moe"},
        {"name": "in-process", "distributed.num_workers": 0},
    ]
    study = tiny_study(tmp_path, "resumable", {"row": {"grid": rows}}, epochs=2, model="resnet18_moe")
    results = f"s3://{S3_BUCKET}/{tmp_path.name}"
    sets = ["distributed.resources_per_worker={CPU: 0.5}", "train.max_steps_per_epoch=6"]  # epochs of seconds
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    command = [
        sys.executable,
        "-m",
        "harness.sweep",
        str(study),
        "--results-dir",
        results,
        "--tables-every",
        "2",
        *[a for s in sets for a in ("--set", s)],
    ]
    driver = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    folder = Location(results) / "resumable"
    try:
        # kill the driver once the first trial has finished and the second has reported an epoch
        # A hang detector, not a speed goal: on a loaded 2-core machine the Train-backed first trial alone took
        # over 4 minutes (2 minutes on a quiet one).
        _wait_for(lambda: len(_lines(folder / "t0001" / "result.json")) >= 1, 600, "the second trial to report")
        time.sleep(1.5)  # let Tune write its experiment state
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # live tables: written when the first trial finished, readable (with the report) while the sweep runs
    live = pd.read_parquet(f"{folder}/trials.parquet")
    assert (
        live["trial"].tolist() == ["t0000", "t0001"]
        and live.loc[0, "status"] == "ok"
        and live.loc[1, "status"] == "incomplete"
    )
    _, report = write_report(folder)
    assert "2 trials: 1 incomplete, 1 ok." in report.read_text()
    first_trial_results = (folder / "t0000" / "result.json").read_text()
    before = _lines(folder / "t0001" / "result.json")
    assert [r["epoch"] for r in before] == [1.0], "the second trial must be unfinished when the driver dies"
    # the Ray Train workers' checkpoints went to the bucket too
    train_run = folder / "train_runs" / "resumable-t0000"
    assert [d for d in train_run.list_dirs() if d.startswith("checkpoint_")], "no Ray Train checkpoint in the bucket"

    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = pd.read_parquet(f"{folder}/trials.parquet")
    assert trials["trial"].tolist() == ["t0000", "t0001"]  # each trial exactly once
    assert trials["status"].tolist() == ["ok", "ok"]
    assert trials["epochs"].tolist() == [2, 2]
    assert (folder / "t0000" / "result.json").read_text() == first_trial_results  # finished: not rerun
    # unfinished: resumed from its epoch-1 checkpoint, so its next report is epoch 2, not a rerun of epoch 1
    after = _lines(folder / "t0001" / "result.json")
    assert after[: len(before)] == before and [r["epoch"] for r in after[len(before) :]] == [2.0]
    assert after[-1]["restored_epoch"] == 1.0
    assert [len(json.loads(p)) for p in trials["placement"]] == [2, 1]  # 2 Ray Train workers, then in-process
    # wall-clock segments of both runs, though Tune's restore puts its own copy of top-level *.json back
    times = read_trial_times(folder)
    assert len(times["t0000"]) == 1 and [end is None for _, end in times["t0001"]] == [True, False]
    # both finished, each with one checkpoint left in the bucket: the Ray Train run's and the trial's last
    for run in (train_run, folder / "t0001"):
        assert len([d for d in run.list_dirs() if d.startswith("checkpoint_")]) == 1, run.list_dirs()


def test_train_backed_trials_under_asha(ray_cluster, tmp_path, capsys):
    """Trials that drive a Ray Train TorchTrainer (one worker each) under ASHA, on a cluster that fits one
    trial at a time. ASHA stops each trial when its result arrives (at ``max_t`` if not before), which
    ends the trial's actor while the TorchTrainer runs; without the sweep reclaiming that worker group's
    placement group, the second trial waited forever for its worker.

    ASHA ranks by the reported learning rate, which makes its decision known in advance: at the epoch-1
    rung (reduction factor 2) the second trial's lr is below the first's, so ASHA stops it there."""
    import ray

    study = tiny_study(
        tmp_path,
        "trained",
        {
            "optim.lr": {"grid": [0.01, 0.001]},
            "scheduler": {"type": "asha", "metric": "lr", "mode": "max", "grace_period": 1, "reduction_factor": 2},
        },
        epochs=2,
    )
    sets = ["distributed.num_workers=1", f"distributed.storage_path={tmp_path / 'unused'}"]
    assert main([str(study), "--results-dir", str(tmp_path / "results")] + [a for s in sets for a in ("--set", s)]) == 0
    assert "at most 1 at once" in capsys.readouterr().out  # 2 CPUs: the trial's driver + its worker
    folder = tmp_path / "results" / "trained"
    trials = pd.read_parquet(folder / "trials.parquet")
    assert trials["trial"].tolist() == ["t0000", "t0001"]
    assert trials["status"].tolist() == ["ok", "incomplete"] and trials["epochs"].tolist() == [2, 1]
    assert trials["val_top1"].notna().all()
    assert "train_placement_group" not in trials  # bookkeeping, not a metric
    placement = json.loads(trials.loc[0, "placement"])
    assert len(placement) == 1 and placement[0]["rank"] == 0 and placement[0]["node_id"]
    assert sorted(p.name for p in (folder / "train_runs").iterdir()) == ["trained-t0000", "trained-t0001"]
    # nothing stays reserved for the tests after this one
    left = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    assert left == [], left


def _wandb_records(path):
    """The protobuf records of a W&B offline run file: a 7-byte header, then LevelDB's log format (32 KiB
    blocks; each chunk: crc32c, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0 and length == 0:
            return
        pending = (b"" if kind in (1, 2) else pending) + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_run(folder):
    """A W&B offline run's name, config and logged rows, read back from its run file."""
    name, config, rows = None, {}, []
    for record in _wandb_records(next(folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return name, config, rows


def _tensorboard_scalars(path):
    """Tag -> values of the scalars in a TensorBoard event file (TFRecord: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    data, pos, scalars = path.read_bytes(), 0, {}
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        event = event_pb2.Event()
        event.ParseFromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


def test_optuna_search_crossed_with_a_grid_logs_to_mlflow_wandb_and_tensorboard(ray_cluster, tmp_path, capsys):
    """Optuna (through Ray Tune's OptunaSearch) picks the learning rate, 2 trials per grid point of moe.k;
    every trial reaches a real MLflow file store, W&B offline run files and TensorBoard event files with
    its swept values as parameters and its metrics under their flat names; the report goes to both
    trackers at the end."""
    from mlflow.tracking import MlflowClient

    tracking = {
        "mlflow": {"tracking_uri": f"file://{tmp_path}/mlruns"},
        "wandb": {"mode": "offline", "dir": str(tmp_path)},
        "tensorboard": True,
    }
    study = tiny_study(
        tmp_path,
        "searched",
        {
            "moe.k": {"grid": [1, 2]},
            "optim.lr": {"loguniform": [1.0e-3, 1.0e-1]},
            "search": {"type": "optuna", "metric": "val_top1", "mode": "max", "num_samples": 2},
        },
        tracking=tracking,
    )
    assert main([str(study), "--results-dir", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "4 trials chosen by Optuna" in out and "MLflow: run searched-report" in out
    folder = tmp_path / "results" / "searched"
    trials = pd.read_parquet(folder / "trials.parquet")
    assert trials["trial"].tolist() == ["t0000", "t0001", "t0002", "t0003"] and (trials["status"] == "ok").all()
    assert trials["search"].tolist() == ["optuna"] * 4
    assert trials["sweep.moe.k"].tolist() == [1, 2, 1, 2]  # Optuna's trial n runs grid point n mod 2
    rates = trials["sweep.optim.lr"]
    assert rates.between(1.0e-3, 1.0e-1).all() and rates.nunique() == 4
    assert (trials["config.optim.lr"] == rates).all() and (trials["config.moe.k"] == trials["sweep.moe.k"]).all()
    by_trial = trials.set_index("trial")

    client = MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("searched").experiment_id])}
    assert sorted(runs) == ["searched-report", "t0000", "t0001", "t0002", "t0003"]
    for name, row in by_trial.iterrows():
        run = runs[name]
        assert run.info.status == "FINISHED" and run.data.tags["study"] == "searched"
        assert run.data.params == {
            "trial_name": name,
            "search": "optuna",
            "sweep.moe.k": str(row["sweep.moe.k"]),
            "sweep.optim.lr": str(row["sweep.optim.lr"]),
        }
        assert run.data.metrics["val_top1"] == row["val_top1"]
        assert run.data.metrics["moe0_importance_cv"] == pytest.approx(row["moe0_importance_cv"])
    report_run = runs["searched-report"].info.run_id
    assert {a.path for a in client.list_artifacts(report_run)} == {"report.md", "plots"}
    assert {a.path for a in client.list_artifacts(report_run, "plots")} == {
        f"plots/{p.name}" for p in (folder / "plots").iterdir()
    }

    wandb_runs = [_wandb_run(f) for f in (tmp_path / "wandb").glob("offline-run-*")]
    assert sorted(name for name, _, _ in wandb_runs) == ["searched-report", "t0000", "t0001", "t0002", "t0003"]
    for name, config, rows in wandb_runs:
        if name == "searched-report":
            assert any(key.startswith("plots/") for row in rows for key in row)
            continue
        assert config["sweep.optim.lr"] == by_trial.loc[name, "sweep.optim.lr"] and config["search"] == "optuna"
        assert [r["val_top1"] for r in rows if "val_top1" in r] == [by_trial.loc[name, "val_top1"]]

    events = next((folder / "t0002").glob("events.out.tfevents.*"))
    scalars = _tensorboard_scalars(events)
    assert scalars["ray/tune/val_top1"] == [pytest.approx(by_trial.loc["t0002", "val_top1"])]
