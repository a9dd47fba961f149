"""Elastic restore (issue 25 item 4): a checkpoint saved on W ranks resumes on W' ranks with its experts
re-sharded, and any checkpoint evaluates in one process (``python -m harness.evaluate``)."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.config import validate_run
from harness.errors import HarnessError
from harness.evaluate import evaluate_checkpoint
from harness.moe.parallel import Collective, shard_experts
from harness.tasks import classification
from harness.tasks.base import Session
from harness.training.checkpoints import read_checkpoint, restore, save_checkpoint
from harness.training.loop import build_optimizer, train_loop

from .helpers import REPO

NUM_EXPERTS = 5  # uneven re-sharding: 3 + 2 on 2 ranks, 2 + 2 + 1 on 3, 2 + 1 + 1 + 1 on 4


def elastic_config(cache: str | pathlib.Path, batch_size: int = 16, **train):
    """small_cnn_moe (whole-model experts, no BatchNorm) on 100 synthetic CIFAR images, 3 SGD steps an
    epoch, top-2 of 5 experts, an importance loss and a hard constraint (its state is a buffer), no
    augmentation (its random draws are per batch, so they would differ with the per-rank batch size).

    Routing is sparse: an expert that no token reaches in a step gets no update on any world size
    (``sync_gradients``), so a W-rank run continues a one-process one within rounding."""
    return validate_run(
        {
            "data": {
                "name": "synthetic_cifar",
                "root": str(cache),
                "batch_size": batch_size,
                "augment": False,
                "val_batch_size": 50,
                "synthetic": {"train_per_class": 1, "test_per_class": 1},
            },
            "model": {"name": "small_cnn_moe"},
            "moe": {
                "num_experts": NUM_EXPERTS,
                "k": 2,
                "losses": {"importance": 0.5},
                "constraint": {"type": "relative_importance", "threshold": 0.2},
            },
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "train": {"epochs": 2, "max_steps_per_epoch": 3, "device": "cpu", **train},
        }
    )


def keeper(folder: pathlib.Path):
    """A ``report`` that copies every checkpoint to ``folder/checkpoint_<epoch:06d>`` (Tune's layout)."""

    def keep(metrics, checkpoint_dir=None):
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, folder / f"checkpoint_{int(metrics['epoch']):06d}", dirs_exist_ok=True)

    return keep


def assert_same_state(a, b) -> None:
    """Two :class:`~harness.training.checkpoints.Checkpoint` s hold the same tensors, bit for bit."""
    assert sorted(a.model) == sorted(b.model) and sorted(a.optimizer) == sorted(b.optimizer)
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
    for name in a.optimizer:
        assert a.optimizer[name].keys() == b.optimizer[name].keys(), name
        for key, value in a.optimizer[name].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b.optimizer[name][key])), (name, key)


def without_placement(folder: pathlib.Path, copy: pathlib.Path) -> pathlib.Path:
    """A copy of checkpoint ``folder`` as older versions wrote it: no world size, placement or config."""
    shutil.copytree(folder, copy)
    state = torch.load(copy / "replicated.pt", weights_only=True)
    for key in ("world_size", "expert_parallel", "placement", "config"):
        del state[key]
    torch.save(state, copy / "replicated.pt")
    return copy


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """Two epochs in this process, checkpoint after each, test-time k after the last, and the
    ``--save-model`` file: ``(folder, history)``."""
    folder = tmp_path_factory.mktemp("run")
    config = elastic_config(folder / "cache", test_time_k=True)
    session = Session(checkpoint_every=1, save_model=folder / "model.pt")
    return folder, train_loop(config, keeper(folder), session=session)


def test_a_checkpoint_evaluates_to_exactly_what_its_run_reported(one_process_run):
    """Each checkpoint of a one-process run, evaluated by :func:`evaluate_checkpoint`: exactly the metrics
    the run reported for that epoch (losses, accuracies, every per-layer figure, the affinity JSON), test-time
    k included; the run folder (its latest ``checkpoint_*``) and the ``--save-model`` file likewise."""
    folder, history = one_process_run
    for epoch in (1, 2):
        evaluation = evaluate_checkpoint(folder / f"checkpoint_{epoch:06d}")
        reported = history[epoch - 1]
        assert evaluation.checkpoint.epoch == epoch
        test_time_k = {k for k in evaluation.metrics if re.search(r"_k\d+$", k)}
        assert test_time_k == {f"val_top1_k{k}" for k in range(1, NUM_EXPERTS + 1)}  # saved test_time_k: on
        if epoch == 2:  # the run evaluated each k after its last epoch only
            assert test_time_k <= set(reported)
        compared = set(evaluation.metrics) - (set() if epoch == 2 else test_time_k)
        assert len(compared) > 20 and {k: evaluation.metrics[k] for k in compared} == {k: reported[k] for k in compared}
    # The run folder (checkpoint_* folders: the latest) and the --save-model file evaluate like epoch 2.
    without_k = ["train.test_time_k=false"]
    for path in (folder, folder / "model.pt"):
        metrics = evaluate_checkpoint(path, without_k).metrics
        assert not any(re.search(r"_k\d+$", k) for k in metrics)
        assert metrics == {k: v for k, v in history[-1].items() if k in metrics}
    other_batches = evaluate_checkpoint(folder / "checkpoint_000001", [*without_k, "data.val_batch_size=7"])
    assert other_batches.metrics["val_top1"] == history[0]["val_top1"]  # counts, whatever the batch size


def test_a_checkpoint_without_a_config_needs_the_study(one_process_run, tmp_path):
    """Checkpoints saved before the config was recorded: ``--study`` supplies it; without, one line."""
    folder, history = one_process_run
    old = without_placement(folder / "checkpoint_000002", tmp_path / "old")
    study = tmp_path / "study.yaml"
    study.write_text(json.dumps({"name": "s", "base": read_checkpoint(folder / "checkpoint_000002").config}))
    with pytest.raises(HarnessError, match="records no run config.*--study"):
        evaluate_checkpoint(old)
    assert evaluate_checkpoint(old, ["train.test_time_k=false"], study).metrics["val_loss"] == history[-1]["val_loss"]


def test_bad_checkpoints_are_one_line_errors(one_process_run, tmp_path):
    folder, _ = one_process_run
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    (tmp_path / "empty").mkdir()
    for path, message in [
        (tmp_path / "missing", "no such checkpoint"),
        (tmp_path / "empty", "no checkpoint here"),
        (tmp_path / "junk.pt", "not readable"),
    ]:
        with pytest.raises(HarnessError, match=message) as info:
            evaluate_checkpoint(path)
        assert "\n" not in str(info.value)
    with pytest.raises(HarnessError, match="does not fit this model"):
        evaluate_checkpoint(folder / "checkpoint_000002", ["moe.num_experts=7"])


def _ranks(world: int) -> list[Collective]:
    """Rank identities of a W-rank group, for sharding and checkpoint files only (no collective runs)."""
    collectives = [Collective(distributed=False) for _ in range(world)]
    for rank, collective in enumerate(collectives):
        collective.rank, collective.world_size = rank, world
    return collectives


def reshard(checkpoint, config, collective: Collective | None, folder: pathlib.Path) -> None:
    """What a restore does on ``collective``'s rank (None: one process without expert parallelism): build
    the model, keep this rank's experts, restore model and optimizer; then save this rank's files again."""
    model = classification.build_model(config, classification.load_data(config))
    owned = shard_experts(model, collective) if collective is not None else {}
    optimizer = build_optimizer(config, model)
    restore(checkpoint, model, optimizer, torch.device("cpu"), owned)
    for local, expert in enumerate(owned.get(0, [])):  # this rank holds exactly its experts, renumbered
        assert torch.equal(model.moe.experts[local].head.weight, checkpoint.model[f"moe.experts.{expert}.head.weight"])
    world = collective.world_size if collective is not None else 1
    rank = collective.rank if collective is not None else 0
    folder.mkdir(exist_ok=True)
    save_checkpoint(
        folder, model, optimizer, checkpoint.history, rank, collective is not None, world, checkpoint.config
    )


@pytest.mark.parametrize("worlds", [(2, 3), (3, 2), (4, 2), (2, 4)])
def test_resharding_round_trip_is_exact(one_process_run, tmp_path, worlds):
    """A one-process checkpoint restored on W ranks and saved by them, that restored on W' ranks and saved,
    that restored in one process and saved: every one composes to the first's global state, bit for bit
    (parameters, SGD momenta, the constraint's buffers), with 5 experts split unevenly (3 + 2, 2 + 2 + 1,
    2 + 1 + 1 + 1), so a W' rank's experts come from several W ranks' files."""
    folder, _ = one_process_run
    saved = read_checkpoint(folder / "checkpoint_000002")
    config = elastic_config(folder / "cache")
    current = saved
    for step, world in enumerate(worlds):
        for collective in _ranks(world):
            reshard(current, config, collective, tmp_path / f"w{step}")
        current = read_checkpoint(tmp_path / f"w{step}")
        assert current.world_size == world and current.expert_parallel and len(current.placement["moe"]) == world
        assert len(list((tmp_path / f"w{step}").glob("experts_rank*"))) == world
        assert_same_state(current, saved)
        if step == 0:  # as a checkpoint from before the placement was recorded: inferred from the files
            assert_same_state(read_checkpoint(without_placement(tmp_path / f"w{step}", tmp_path / "old")), saved)
    reshard(current, config, None, tmp_path / "single")
    assert_same_state(read_checkpoint(tmp_path / "single"), saved)


# ---------------------------------------------------------------------------------------------------------
# Expert parallelism on spawned gloo ranks: checkpoints move 2 ranks -> 1 process and 1 process -> 2 ranks
# (more ranks are covered above without processes: 4 spawned ranks cost ~15 s on 2 cores). The continued
# runs keep the global batch (16 images, 8 per rank on 2): a rank takes every W-th image of the epoch's one
# permutation, so every step sees the same 16 images whatever W.

GLOBAL_BATCH = 16


def _rank_worker(rank: int, world: int, store: str, cache: str, out: str, jobs: list[dict]) -> None:
    """Each job: ``{"tag", "restore" (folder or None)}``: train (expert parallel) from that checkpoint,
    keeping the checkpoints under ``out/<tag>``; ``{"tag", "reshard"}``: restore that checkpoint into this
    rank's shard and save it again under ``out/<tag>`` (no training)."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # see ELASTIC_TOLERANCE
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        config = elastic_config(cache, GLOBAL_BATCH // world)
        for job in jobs:
            folder = pathlib.Path(out, job["tag"])
            if "reshard" in job:
                reshard(read_checkpoint(job["reshard"]), config, Collective(), folder)
                continue
            restore_dir = pathlib.Path(job["restore"]) if job["restore"] else None
            session = Session(
                collective=Collective(), expert_parallel=True, checkpoint_every=1, restore_dir=restore_dir
            )
            train_loop(config, keeper(folder), session=session)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def elastic_runs(tmp_path_factory):
    """The folder with each run's checkpoints: ``w1`` (one process, 2 epochs), ``w2`` (2 expert-parallel
    ranks, 2 epochs), and epoch-1 checkpoints continued elsewhere: ``w2_w2`` (2 ranks again), ``w2_w1`` (2 ranks
    -> one process), ``w1_w2`` (one process -> 2 ranks); ``w1_reshard_w2``: ``w1``'s epoch 1 restored on 2
    ranks and saved again."""
    folder = tmp_path_factory.mktemp("elastic")
    cache = folder / "cache"
    torch.set_default_dtype(torch.float64)  # every run of the fixture, as the ranks: see ELASTIC_TOLERANCE
    try:
        train_loop(elastic_config(cache), keeper(folder / "w1"), session=Session(checkpoint_every=1))
        w1, w2 = folder / "w1" / "checkpoint_000001", folder / "w2" / "checkpoint_000001"
        jobs = [
            {"tag": "w2", "restore": None},
            {"tag": "w2_w2", "restore": str(w2)},
            {"tag": "w1_w2", "restore": str(w1)},
            {"tag": "w1_reshard_w2", "reshard": str(w1)},
        ]
        mp.start_processes(
            _rank_worker, args=(2, str(folder / "store"), str(cache), str(folder), jobs), nprocs=2, start_method="spawn"
        )
        train_loop(elastic_config(cache), keeper(folder / "w2_w1"), session=Session(checkpoint_every=1, restore_dir=w2))
    finally:
        torch.set_default_dtype(torch.float32)
    return folder


@pytest.mark.ray(cluster=False)
def test_restored_global_state_equals_the_saved_one_across_world_sizes(elastic_runs):
    """A one-process checkpoint restored on 2 spawned ranks (3 + 2 experts) and saved again: the same
    global state, bit for bit; the 2-rank checkpoint records its placement."""
    folder = elastic_runs
    resaved = read_checkpoint(folder / "w1_reshard_w2")
    assert resaved.world_size == 2 and resaved.placement == {"moe": [[0, 1, 2], [3, 4]]}
    assert_same_state(resaved, read_checkpoint(folder / "w1" / "checkpoint_000001"))
    assert read_checkpoint(folder / "w2" / "checkpoint_000001").placement == {"moe": [[0, 1, 2], [3, 4]]}


# Summation order only (per-rank sums then a reduction vs one sum, as in test_parallel's whole-model runs):
# the runs are in float64 (eps 2.2e-16), so rounding through 3 SGD steps stays ~1e-13 on any machine; a
# wrong expert, momentum or token moves them by orders of magnitude more (the last assertion: one epoch
# moves them by > 1e-7).
ELASTIC_TOLERANCE = 1e-9
# The evaluate CLI runs in float32 (the default) on those float64 weights: one forward's float32 rounding,
# ~1e-7 relative on figures of order 1 (val_loss ~ ln 100), so 1e-5 absolute leaves a 20x margin.
FLOAT32_EVALUATION_TOLERANCE = 1e-5
TIMING = ("epoch_s", "images_per_s", "setup_s", "restored_epoch")
COMPARED = (
    "train_loss",
    "train_task_loss",
    "train_importance_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "moe0_importance_cv",
    "moe0_load_cv",
    "moe0_usage_entropy_bits",
    "moe0_mutual_info_bits",
)


def _largest_difference(a, b) -> float:
    """Largest absolute difference between two checkpoints' weights, buffers and momenta."""
    assert sorted(a.model) == sorted(b.model) and sorted(a.optimizer) == sorted(b.optimizer)
    weights = [(a.model[n].double() - b.model[n].double()).abs().max().item() for n in a.model if a.model[n].numel()]
    momenta = [
        (a.optimizer[n]["momentum_buffer"] - b.optimizer[n]["momentum_buffer"]).abs().max().item() for n in a.optimizer
    ]
    return max(weights + momenta)


@pytest.mark.ray(cluster=False)
def test_a_run_resumed_on_another_world_size_continues_the_uninterrupted_one(elastic_runs):
    """Epoch 2 of the uninterrupted 2-rank run against its epoch-1 checkpoint continued on 2 ranks
    (bit-identical: the same world size) and in one process, and against the one-process run's epoch-1
    checkpoint continued on 2 ranks (both within rounding): metrics and the final global state."""
    folder = elastic_runs
    history = {
        tag: read_checkpoint(folder / tag / "checkpoint_000002").history
        for tag in ("w1", "w2", "w2_w2", "w2_w1", "w1_w2")
    }
    final = read_checkpoint(folder / "w2" / "checkpoint_000002")
    untimed = lambda metrics: {k: v for k, v in metrics.items() if k not in TIMING}  # noqa: E731
    assert history["w2_w2"][0] == history["w2"][0] and untimed(history["w2_w2"][1]) == untimed(history["w2"][1])
    assert_same_state(read_checkpoint(folder / "w2_w2" / "checkpoint_000002"), final)
    for tag, origin in (("w2_w1", "w2"), ("w1_w2", "w1")):
        continued = history[tag]
        assert continued[0] == history[origin][0] and continued[1]["restored_epoch"] == 1.0  # the saved epoch 1
        assert continued[1]["train_images"] == 3 * GLOBAL_BATCH
        off = {m: abs(continued[1][m] - history["w2"][1][m]) for m in COMPARED}
        assert {m: d for m, d in off.items() if d > ELASTIC_TOLERANCE} == {}, tag
        assert _largest_difference(read_checkpoint(folder / tag / "checkpoint_000002"), final) <= ELASTIC_TOLERANCE, tag
    assert (
        _largest_difference(final, read_checkpoint(folder / "w2" / "checkpoint_000001"))
        > 100 * FLOAT32_EVALUATION_TOLERANCE
    )


@pytest.mark.ray(cluster=False)
def test_evaluate_cli_prints_an_expert_parallel_checkpoints_metrics(elastic_runs, tmp_path):
    """``python -m harness.evaluate`` on the 2-rank expert-parallel run folder, in one process: exit 0, the
    summary with test-time k on the console, the run's epoch-2 figures in ``--json`` (within rounding: the run
    evaluated on 2 ranks); a path that holds no checkpoint: exit 2 and one line. Both run at once."""
    folder = elastic_runs
    out = tmp_path / "metrics.json"
    command = [
        sys.executable,
        "-m",
        "harness.evaluate",
        str(folder / "w2"),
        "--set",
        "train.test_time_k=true",
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    good = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    bad = subprocess.Popen(
        [sys.executable, "-m", "harness.evaluate", str(tmp_path / "nowhere")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    (stdout, stderr), (bad_stdout, bad_stderr) = good.communicate(timeout=120), bad.communicate(timeout=120)
    assert good.returncode == 0, stderr
    assert "epoch 2, saved on 2 ranks (expert parallel)" in stdout
    assert re.search(r"^  val_top1 = ", stdout, re.M) and re.search(rf"^  val_top1_k{NUM_EXPERTS} = ", stdout, re.M)
    record = json.loads(out.read_text())
    assert record["epoch"] == 2 and record["checkpoint"].endswith("checkpoint_000002")
    reported = read_checkpoint(folder / "w2" / "checkpoint_000002").history[-1]
    for metric in ("val_loss", "val_top1", "moe0_importance_cv"):
        assert record["metrics"][metric] == pytest.approx(reported[metric], abs=FLOAT32_EVALUATION_TOLERANCE)
    assert bad.returncode == 2 and bad_stdout == ""
    assert bad_stderr.count("\n") == 1 and bad_stderr.startswith("error: ") and "no such checkpoint" in bad_stderr
