"""Ray Tune callbacks of a sweep's driver: trial wall times, live tables, the clean-up of completed trials'
older checkpoints and the placement-group janitor of Train-backed trials (the experiment trackers'
callbacks are in :mod:`harness.tuning.tracking`)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from ..storage import Location


def trial_times_callback(folder: Location):
    """A Tune callback on the driver that records when each trial starts and ends (wall clock, one
    ``[start, end]`` segment per run of the trial, so a resumed trial has several; a run the driver did not
    see end stays open, ``end`` null) in ``<study>/trial_times.jsonl``: from when Tune has the trial running
    in its actor to when it completes, so the trial function's imports, device init, data loading,
    reporting and checkpointing are included (the actor process's own start is not). Each event reads the
    file and writes it whole: a resumed sweep's callback comes back from the first run's pickled state, so
    only the file knows the earlier runs. The aggregator turns it into ``trial_wall_s`` and ``overhead_s``."""
    from ray import tune

    from ..analysis.aggregate import read_trial_times, write_trial_times

    class TrialTimes(tune.Callback):
        def _mark(self, trial: Any, index: int) -> None:
            name = trial.config["trial"]["name"]
            times = read_trial_times(folder)
            segments = times.setdefault(name, [])
            if index == 0:
                segments.append([time.time(), None])
            elif segments and segments[-1][1] is None:
                segments[-1][1] = time.time()
            write_trial_times(folder, times)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._mark(trial, 0)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._mark(trial, 1)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._mark(trial, 1)

    return TrialTimes()


TRIAL_END_RESYNC_S = 5.0
DEFAULT_TABLES_EVERY_S = 60.0
# The driver's --tables-every, read at run time: a resumed sweep's callbacks come back from the first run.
TABLES_EVERY_ENV = "HARNESS_TABLES_EVERY_S"


def live_tables_callback(folder: Location):
    """A Tune callback on the driver that rewrites the study's tables while the sweep runs: after every
    trial that ends and, while trials run, every ``--tables-every`` seconds (:data:`TABLES_EVERY_ENV`, set
    by this run's driver, also when resuming; 0 = only at the end), so a day-long sweep can be
    read with pandas (or ``python -m harness.report``) before it ends. Each table is replaced atomically;
    a refresh that fails prints one line and the sweep goes on (the final tables are written at the end)."""
    from ray import tune

    from ..analysis.aggregate import aggregate

    class LiveTables(tune.Callback):
        def __init__(self) -> None:
            self.last = time.monotonic()
            self.due: list[float] = []  # refreshes owed after trials ended

        def refresh(self) -> None:
            self.last = time.monotonic()
            try:
                aggregate(folder)
            except Exception as exc:  # noqa: BLE001 - interim tables must never stop the sweep
                print(f"warning: interim tables not written ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)

        # When a trial ends the tables are rewritten at the end of Tune's step, and again 5 s later: Tune
        # syncs a trial's last results into the study folder shortly after the trial ends, not at once.
        def _ended(self) -> None:
            now = time.monotonic()
            self.due += [now, now + TRIAL_END_RESYNC_S]

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._ended()

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._ended()

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            now = time.monotonic()
            interval = float(os.environ.get(TABLES_EVERY_ENV, DEFAULT_TABLES_EVERY_S))
            if interval == 0:
                return
            if any(t <= now for t in self.due) or now - self.last >= interval:
                self.due = [t for t in self.due if t > now]
                self.refresh()

    return LiveTables()


def last_checkpoint_callback():
    """A Tune callback on the driver that deletes a completed in-process trial's checkpoints but its
    latest: Tune never runs a completed trial again (``--resume`` skips it, also one the scheduler
    stopped), and :mod:`harness.evaluate` reads the latest. While a trial trains, and after it failed, it
    keeps ``num_to_keep`` checkpoints. A Train-backed trial reports no checkpoints to Tune: its Ray Train
    run keeps its own last one (:func:`harness.training.ray_train.keep_last_checkpoint`)."""
    from ray import tune

    from ..storage import remove_other_checkpoints

    class KeepLastCheckpoint(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            latest = trial.checkpoint  # by now Tune has registered the trial's last report
            if latest is None:
                return
            try:
                remove_other_checkpoints(latest.filesystem, latest.path)
            except OSError as exc:  # disk left over must never stop the sweep
                print(f"warning: older checkpoints of trial {trial} not deleted ({exc})", file=sys.stderr, flush=True)

    return KeepLastCheckpoint()


def train_placement_group_janitor():
    """A Tune callback on the driver that removes the Ray Train placement group of a Train-backed trial
    Tune stopped while its ``TorchTrainer`` was running (ASHA stops trials mid-run, and at ``max_t``).

    Tune ends such a trial by terminating its actor; the Train controller dies with it, and the worker
    group's placement group, which belongs to the job, stays reserved. Ray Train's own cleaner notices the
    dead controller only through the State API, which a cluster without the dashboard (``ray.init(
    include_dashboard=False)``, as this harness starts) does not serve, so the next trial waits forever for
    those resources. The workers report their group's id (``train_placement_group``); once the trial is
    finished and no actor runs in the group any more (so no live controller can still be using it), it is
    removed. A trial whose ``fit()`` returned has already removed its own: nothing to do.
    """
    import ray
    from ray import tune
    from ray.util.placement_group import PlacementGroup

    from ..training.ray_train import PLACEMENT_GROUP_KEY

    class TrainPlacementGroupJanitor(tune.Callback):
        def __init__(self) -> None:
            self.finished: set[str] = set()  # hex ids of finished trials' groups not yet removed

        def _finished(self, trial: Any) -> None:
            group = (trial.last_result or {}).get(PLACEMENT_GROUP_KEY)
            if group:
                self.finished.add(group)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finished(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finished(trial)

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if self.finished:
                self._remove_idle()

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            # The last trials' groups too: in a long-lived driver (a notebook, a test session) they would
            # stay reserved until it exits. Their actors are being torn down; give that a bounded wait.
            deadline = time.monotonic() + 30.0
            while self.finished and time.monotonic() < deadline:
                self._remove_idle()
                if self.finished:
                    time.sleep(0.5)

        def _remove_idle(self) -> None:
            available = ray.available_resources()
            for group_hex in list(self.finished):
                group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_hex)))
                table = ray.util.placement_group_table(group)
                if table.get("state") in (None, "REMOVED"):
                    self.finished.discard(group_hex)
                elif _group_idle(table, group_hex, available):
                    ray.util.remove_placement_group(group)
                    self.finished.discard(group_hex)
                    print(f"removed the placement group {group_hex[:12]} of a stopped Ray Train trial", flush=True)

    return TrainPlacementGroupJanitor()


def _group_idle(table: dict[str, Any], group_hex: str, available: dict[str, float]) -> bool:
    """Whether no task or actor holds any of the group's bundles: Ray exposes each reserved bundle
    resource as ``<resource>_group_<bundle>_<group id>``, available in full when nothing uses it."""
    for index, bundle in (table.get("bundles") or {}).items():
        for name, amount in bundle.items():
            if available.get(f"{name}_group_{index}_{group_hex}", 0.0) < amount:
                return False
    return True
