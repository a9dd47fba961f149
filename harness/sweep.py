"""``python -m harness.sweep <study.yaml>``: a study's sweep on Ray Tune, results under ``results/<study>/``.

Every trial is expanded and validated before Ray starts (:mod:`harness.tuning.search`). Each trial is a Tune
function trainable that trains in its own process (``distributed.num_workers: 0``) or drives a Ray Train
``TorchTrainer`` whose metrics reach Tune through ``TuneReportCallback``. A failing trial is recorded
with its error and the others go on; ``--resume`` continues an interrupted sweep.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import pathlib
import sys
import textwrap
import time
from typing import Any

from .cli import add_overrides_argument
from .config import RunConfig, TrackingConfig, absolutize_paths, read_study, resolve_entry, trial_config
from .errors import ConfigError, DataError, HarnessError
from .storage import Location, ray_init_env
from .tuning.callbacks import (
    DEFAULT_TABLES_EVERY_S,
    TABLES_EVERY_ENV,
    last_checkpoint_callback,
    live_tables_callback,
    train_placement_group_janitor,
    trial_times_callback,
)
from .tuning.search import OptunaSpace, SweepSpec, Trial, expand_trials, parse_sweep
from .tuning.tracking import log_report, prepare_tracker_env, tracker_callbacks

# Columns of Tune's progress table and of the closing comparison.
KEY_METRICS = (
    "epoch",
    "val_top1",
    "val_top5",
    "val_ap",
    "moe0_importance_cv",
    "moe0_living_experts",
    "moe0_mutual_info_bits",
)


# A Train-backed trial's own process only drives the TorchTrainer and waits.
TRAIN_DRIVER_RESOURCES = {"CPU": 1.0}


def trial_actor_resources(config: RunConfig, use_gpu: bool) -> dict[str, float]:
    """What Tune reserves for the trial's own process. In-process (``num_workers: 0``): 1 CPU, plus the
    GPU share of ``resources_per_worker`` (default a whole GPU) when training on GPUs, so fractional GPUs
    pack several trials per device. Train-backed: the driver's 1 CPU only; the workers' resources are
    reserved by Ray Train's own placement group, so the trial must not hold them too (it would wait forever
    for GPUs it holds itself)."""
    if config.distributed.num_workers:
        return dict(TRAIN_DRIVER_RESOURCES)
    return trial_resources(config, use_gpu)


def trial_resources(config: RunConfig, use_gpu: bool) -> dict[str, float]:
    """Everything one running trial occupies: in-process, its own process's share (see
    :func:`trial_actor_resources`); Train-backed, the driver's CPU plus ``num_workers x
    resources_per_worker``. Concurrency is computed from this, since Tune does not count Train's
    placement groups."""
    d = config.distributed
    per_worker = d.worker_resources(use_gpu)
    if d.num_workers == 0:
        return {"CPU": 1.0, **({"GPU": per_worker["GPU"]} if use_gpu else {})}
    total = {name: amount * d.num_workers for name, amount in per_worker.items()}
    for name, amount in TRAIN_DRIVER_RESOURCES.items():
        total[name] = total.get(name, 0.0) + amount
    return total


def max_concurrent_trials(spec: SweepSpec, trials: list[Trial], cluster: dict[str, float], use_gpu: bool) -> int:
    """How many trials fit on the cluster at once, so that no trial waits forever for resources held by
    Train placement groups Tune does not count; ``sweep.max_concurrent_trials`` overrides it. ``trials``:
    the grid's trials, or a searched sweep's grid points (its trial count is ``spec.searcher_trials``)."""
    if spec.max_concurrent_trials is not None:
        return spec.max_concurrent_trials
    fits = [
        math.floor(cluster.get(name, 0.0) / amount)  # the largest trial decides (num_workers may be swept)
        for trial in trials
        for name, amount in trial_resources(trial.config, use_gpu).items()
        if amount > 0
    ]
    return max(1, min(fits + [spec.searcher_trials or len(trials)]))


def study_dir(results_dir: str, study: str) -> Location:
    """``<results-dir>/<study>``: a local or shared path, or a URI (``s3://``, ``gs://``, ``file://``)."""
    return Location(results_dir) / study


def run_trial(tune_config: dict[str, Any], base: dict[str, Any], study: str, train_storage: str) -> None:
    """Tune function trainable: one trial, in this process or through Ray Train."""
    import ray
    import ray.tune
    import torch

    from .tasks.base import Session
    from .training.loop import train_loop

    trial = resolve_entry(tune_config)
    config = trial_config(base, trial["overrides"])
    if config.distributed.num_workers:
        from ray.tune.integration.ray_train import TuneReportCallback

        from .training.ray_train import fit

        fit(
            config, study, name=f"{study}-{trial['name']}", storage_path=train_storage, callbacks=[TuneReportCallback()]
        )
        return

    def report(metrics: dict[str, Any], checkpoint_dir: pathlib.Path | None = None) -> None:
        checkpoint = ray.tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)

    # As many compute threads as CPUs Tune reserved for the trial: PyTorch would otherwise start one per
    # core in every trial, and trials packed on one machine would oversubscribe it (2.5x slower per epoch
    # for two 1-CPU trials on 2 cores).
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    if cpus >= 1:
        torch.set_num_threads(int(cpus))
    gpu_ids = ray.get_gpu_ids()
    session = Session(
        checkpoint_every=config.distributed.checkpoint_every,
        worker={"node_id": ray.get_runtime_context().get_node_id(), "gpu_id": gpu_ids[0] if gpu_ids else None},
    )
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        train_loop(config, report, session=session)
        return
    with checkpoint.as_directory() as folder:
        session.restore_dir = pathlib.Path(folder)
        train_loop(config, report, session=session)


def build_trial_scheduler(spec: SweepSpec, config: RunConfig):
    """Tune's trial scheduler: FIFO, or ASHA over epochs ranking by ``sweep.scheduler.metric`` (default: the
    study's main metric, :attr:`RunConfig.main_metric`)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.scheduler or {"type": "fifo"}
    if s["type"] == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        metric=s.get("metric", config.main_metric),
        mode=s.get("mode", "max"),
        max_t=config.train.epochs,
        grace_period=s.get("grace_period", 1),
        reduction_factor=s.get("reduction_factor", 4),
    )


DEFAULT_SYNC_PERIOD_S = 300.0  # Tune's own default


def build_searcher(spec: SweepSpec, points: list[Trial], config: RunConfig):
    """Ray Tune's ``OptunaSearch`` over the sampled keys, crossed with the grid ``points``
    (:class:`~harness.tuning.search.OptunaSpace`), seeded with ``sweep.sample_seed``, optimising
    ``sweep.search.metric`` (default: ``config``'s main metric); None for a grid sweep."""
    if spec.search is None:
        return None
    from ray.tune.search.optuna import OptunaSearch

    space = OptunaSpace([_trial_entry(p) for p in points], {k: spec.domains[k] for k in spec.sampled_keys})
    metric = spec.search.get("metric") or config.main_metric
    return OptunaSearch(space=space, metric=metric, mode=spec.search["mode"], seed=spec.sample_seed)


def run_sweep(
    study_name: str,
    base: dict[str, Any],
    spec: SweepSpec,
    trials: list[Trial],
    results_dir: str,
    resume: bool,
    verbose: bool = False,
    tables_every_s: float = DEFAULT_TABLES_EVERY_S,
    tracking: TrackingConfig | None = None,
) -> Location:
    """Run (or resume) the sweep with Ray Tune; returns the study folder. ``trials``: the grid's trials, or
    a searched sweep's grid points. ``verbose``: Ray's logs, the workers' output and every Tune result on
    the console, not only the progress view. ``tables_every_s``: refresh the tables while the sweep runs
    (:func:`live_tables_callback`); 0 = only at the end. ``tracking``: the study's experiment trackers."""
    import ray
    from ray import tune

    folder = study_dir(results_dir, study_name)
    # Tune's newer console output ignores custom reporters; the classic path drives TrialTable.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from .tuning.progress import VERBOSE_ENV

    os.environ[VERBOSE_ENV] = "1" if verbose else "0"  # read by the reporter and the table callback,
    os.environ[TABLES_EVERY_ENV] = str(tables_every_s)  # which a resumed sweep restores from its first run
    if not verbose:  # Ray's own INFO/WARNING lines; the trials' outcomes reach the tables and the summary
        for name in ("ray", "ray.tune", "ray.train", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if not ray.is_initialized():
        # Without --verbose the workers' own output (each trial's epoch lines) stays in Ray's logs.
        ray.init(
            include_dashboard=False,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.ERROR,
            **ray_init_env(),
        )
    from .training.ray_train import resolve_use_gpu
    from .tuning.progress import TrialTable

    first = trials[0].config
    use_gpu = resolve_use_gpu(first.distributed) and first.train.device != "cpu"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, study=study_name, train_storage=str(folder / "train_runs")),
        trial_actor_resources(first, use_gpu),
    )
    prepare_tracker_env(tracking)  # a resumed sweep's callbacks come back from the first run, not its env
    if resume:
        tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        from .analysis.aggregate import write_study_file

        write_study_file(folder, study_name, base, [_trial_entry(t) for t in trials], spec.swept_keys, spec.search)
        total = spec.searcher_trials or len(trials)
        concurrent = max_concurrent_trials(spec, trials, ray.cluster_resources(), use_gpu)
        searcher = build_searcher(spec, trials, first)
        print(
            f"sweep {study_name}: {total} trials{' chosen by Optuna' if searcher else ''}, "
            f"at most {concurrent} at once",
            flush=True,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=None if searcher else {"trial": tune.grid_search([_trial_entry(t) for t in trials])},
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=total if searcher else 1,
                scheduler=build_trial_scheduler(spec, first),
                max_concurrent_trials=concurrent,
                # In-process trials keep their warm actor (imports, CUDA context) for the next trial: most of
                # a short trial's fixed cost. Train-backed trials start their own workers anyway.
                reuse_actors=first.distributed.num_workers == 0,
                trial_name_creator=lambda trial: trial.config["trial"]["name"],
                trial_dirname_creator=lambda trial: trial.config["trial"]["name"],
            ),
            run_config=tune.RunConfig(
                name=study_name,
                storage_path=str(folder.parent),
                failure_config=tune.FailureConfig(max_failures=0),
                # On an object store Tune uploads the driver's files (every trial's result.json) at most
                # every sync_period: as often as the live tables are refreshed, so they see fresh results.
                sync_config=tune.SyncConfig(sync_period=tables_every_s or DEFAULT_SYNC_PERIOD_S),
                # A completed trial keeps only its last checkpoint. Train-backed trials: reclaim the worker
                # group of a trial Tune stops mid-run.
                callbacks=[trial_times_callback(folder), live_tables_callback(folder), last_checkpoint_callback()]
                + ([train_placement_group_janitor()] if any(t.config.distributed.num_workers for t in trials) else [])
                + tracker_callbacks(tracking, study_name),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=first.distributed.num_to_keep),
                progress_reporter=TrialTable(spec.swept_keys, first.main_metric, total),
                verbose=3 if verbose else 1,  # 1: the progress view only; 3: every result as it arrives
            ),
        )
    tuner.fit()
    # Drop the Tuner (and its callbacks) while Ray is still loaded: Ray's W&B callback cleans up in
    # __del__, which fails noisily at interpreter exit.
    del tuner
    gc.collect()
    return folder


def _trial_entry(trial: Trial) -> dict[str, Any]:
    """What Tune's param space and ``study.json`` hold of a trial."""
    return {"name": trial.name, "overrides": trial.overrides, "values": trial.values}


def _describe(trial: Trial) -> str:
    return f"{trial.name}: " + ", ".join(f"{k}={v!r}" for k, v in trial.values.items())


# What a data set fixes of a model's size, read without loading it: (classes, image channels, image side).
# Detection counts its categories plus the background; its images are resized, so the side does not matter.
DATA_SHAPES = {
    "cifar100": (100, 3, 32),
    "synthetic_cifar": (100, 3, 32),
    "mnist": (10, 1, 28),
    "fashion_mnist": (10, 1, 28),
    "coco": (81, 3, 32),
    "synthetic_coco": (4, 3, 32),
}


def model_state_bytes(config: RunConfig) -> tuple[int, int]:
    """``(bytes of the model's parameters and buffers, bytes of its trainable parameters)`` for ``config``,
    from the model built on the meta device (shapes and dtypes, no memory, no data, no weights file)."""
    import types

    import torch

    from .models.weights import freeze_parameters
    from .training.loop import task_for

    classes, channels, side = DATA_SHAPES[config.data.name]
    stand_in = types.SimpleNamespace(
        num_classes=classes, in_channels=channels, train_images=torch.empty(0, channels, side, side, device="meta")
    )
    unweighted = config.model_copy(update={"model": config.model.model_copy(update={"weights": None})})
    with torch.device("meta"):
        model = task_for(config).build_model(unweighted, stand_in)
    freeze_parameters(model, config.train.freeze)
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state, trainable


def optimizer_moments(config: RunConfig) -> int:
    """Tensors the optimizer keeps per trainable parameter, each of the parameter's size: Adam's two
    moments, SGD's momentum buffer (none without momentum)."""
    o = config.optim
    if o.name == "sgd":
        return 1 if o.momentum else 0
    return 2


def checkpoint_bytes(config: RunConfig, sizes: dict[str, tuple[int, int]] | None = None) -> int:
    """Estimated bytes of one checkpoint of ``config``: the model's parameters and buffers plus the
    optimizer's moments (step counters and the metrics history left out). ``sizes`` caches
    :func:`model_state_bytes` by model-shaping config, so each distinct model is built once."""
    sizes = {} if sizes is None else sizes
    key = json.dumps(
        [
            config.model.model_dump(mode="json"),
            config.moe and config.moe.model_dump(mode="json"),
            config.data.name,
            config.train.freeze,
        ],
        sort_keys=True,
    )
    if key not in sizes:
        sizes[key] = model_state_bytes(config)
    state, trainable = sizes[key]
    return state + trainable * optimizer_moments(config)


def human_bytes(count: float) -> str:
    """``count`` bytes in decimal units, 3 significant digits at most: ``3.69 MB``, ``1.23 GB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if float(f"{count:.3g}") < 1000:  # 999.9 kB rounds to 1 MB, not to "1e+03 kB"
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} TB"


def disk_line(spec: SweepSpec, trials: list[Trial]) -> str:
    """The ``--dry-run`` line estimating the checkpoints a finished study leaves on disk: each finished
    trial keeps its last checkpoint (none with ``checkpoint_every: 0``), so the sum over trials of one
    checkpoint's :func:`checkpoint_bytes`; a searched sweep runs ``search.num_samples`` trials per grid
    point. A running trial also holds up to ``num_to_keep`` checkpoints."""
    per_point = spec.search["num_samples"] if spec.search else 1
    sizes: dict[str, tuple[int, int]] = {}
    each = [checkpoint_bytes(t.config, sizes) for t in trials if t.config.distributed.checkpoint_every]
    if not each:
        return "disk: no checkpoints (distributed.checkpoint_every: 0)"
    kept = {t.config.distributed.num_to_keep for t in trials}
    running = (
        "all its checkpoints"
        if kept == {None}
        else f"up to num_to_keep={kept.pop()}"
        if len(kept) == 1
        else "up to num_to_keep"
    )
    low, high = min(each), max(each)
    size = human_bytes(low) if human_bytes(low) == human_bytes(high) else f"{human_bytes(low)} to {human_bytes(high)}"
    count = len(each) * per_point
    who = "the trial keeps" if count == 1 else f"each of {count} trials keeps"
    return (
        f"disk: about {human_bytes(sum(each) * per_point)} of checkpoints once the study has finished (an estimate: "
        f"{who} its last checkpoint, {size} of weights and optimizer state; a running trial keeps {running})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.sweep", description="Run a study's sweep on Ray Tune.")
    parser.add_argument("study", help="study YAML file (name, base, sweep)")
    add_overrides_argument(parser, "override a base field for every trial (repeatable)")
    parser.add_argument("--results-dir", default="results", help="where results/<study>/ goes (default: results)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this study")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and exit without running")
    parser.add_argument("--verbose", action="store_true", help="Ray's logs, the trials' output and every result too")
    parser.add_argument(
        "--tables-every",
        type=float,
        default=DEFAULT_TABLES_EVERY_S,
        metavar="SECONDS",
        help="rewrite the tables after each finished trial and every SECONDS while trials run "
        "(default 60; 0 = only at the end)",
    )
    args = parser.parse_args(argv)
    try:
        if args.tables_every < 0:
            raise ConfigError(f"--tables-every: must be >= 0 seconds, got {args.tables_every}")
        raw, study = read_study(args.study, args.overrides)
        base = absolutize_paths(raw["base"])
        spec = parse_sweep(study.sweep)
        trials = expand_trials(base, spec)
        if args.dry_run:
            if spec.search:
                print(
                    f"study {study.name}: {spec.searcher_trials} trials chosen by Optuna "
                    f"({spec.search['num_samples']} per "
                    f"grid point; searched: {', '.join(spec.sampled_keys)}); {len(trials)} grid points"
                )
            else:
                print(f"study {study.name}: {len(trials)} trials")
            for trial in trials[:5]:
                print("  " + _describe(trial))
            if len(trials) > 5:
                print(f"  ... {len(trials) - 5} more")
            print(disk_line(spec, trials))
            return 0
        check_data_present(trials)
        folder = study_dir(args.results_dir, study.name)
        _check_results_dir(folder, args.resume)
        start = time.time()
        run_sweep(
            study.name,
            base,
            spec,
            trials,
            args.results_dir,
            args.resume,
            args.verbose,
            args.tables_every,
            study.tracking,
        )
        from .analysis.aggregate import TABLES, aggregate, read_trial_times, summary, trials_finished_since
        from .report import findings, write_report

        tables, report = write_report(folder, aggregate(folder))  # the final tables, from every trial's folder
        print(summary(tables, spec.swept_keys, KEY_METRICS))
        print(textwrap.fill(findings(tables["comparison"]), width=110, break_on_hyphens=False))
        elapsed = time.time() - start
        trials_done = tables["trials"]
        overhead = trials_done["overhead_s"].median() if "overhead_s" in trials_done else float("nan")
        # the rate of this run: a resumed sweep counts only the trials it ran to the end itself
        ran = trials_finished_since(read_trial_times(folder), start) if args.resume else len(trials_done)
        print(
            f"sweep finished in {elapsed:.0f} s ({3600 * ran / max(elapsed, 1e-9):.1f} trials/hour); "
            f"median per-trial overhead (trial wall time - time in the training loop) {overhead:.1f} s; wrote:"
        )
        for name in TABLES:
            print(f"  {folder / name}.parquet")
        print(f"  {report} (plots in {report.parent / 'plots'})")
        for line in log_report(study.tracking, study.name, folder):
            print(f"  {line}")
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def check_data_present(trials: list[Trial]) -> None:
    """Stop before Ray starts when a trial's data set or starting weights are not on disk (generated sets
    are exempt: they are written on first use). The error names the path and the expected layout."""
    from .data import check_coco_layout

    seen = set()
    for trial in trials:
        weights = trial.config.model.weights
        if weights is not None and not os.path.isfile(weights):
            raise ConfigError(f"model.weights: {weights}: no such file (trial {trial.name})")
        data = trial.config.data
        key = data.model_dump_json()
        if key in seen:
            continue
        seen.add(key)
        if data.name == "coco":
            check_coco_layout(data)
        elif not data.name.startswith("synthetic_") and (data.root is None or not os.path.isdir(data.root)):
            raise DataError(f"data.root: {data.root}: no such directory (data set {data.name!r}, trial {trial.name})")


def _check_results_dir(folder: Location, resume: bool) -> None:
    """Refuse to mix studies or to silently overwrite one; --resume needs something to resume."""
    from ray import tune

    exists = not folder.is_empty_or_missing()
    if resume and not (exists and tune.Tuner.can_restore(str(folder))):
        raise ConfigError(f"--resume: {folder} holds no sweep to resume")
    if not resume and exists:
        raise ConfigError(f"{folder}: already holds results of this study; add --resume to continue it, or remove it")
    try:
        folder.parent.check_writable()
    except OSError as exc:
        raise ConfigError(f"--results-dir: {folder.parent} is not writable ({exc})") from None


if __name__ == "__main__":
    sys.exit(main())
