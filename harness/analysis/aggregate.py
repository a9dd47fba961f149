"""``python -m harness.analysis.aggregate results/<study>``: Tune's experiment folder -> Parquet tables.

Reads only what the sweep left on disk (``study.json`` and Tune's trial folders), so it can run again at
any time and gives the same tables. ``folder`` may be a path or a URI (:mod:`harness.storage`); every table
is written atomically.

Tables (columns in the README): ``trials`` (one row per trial, errored ones included), ``epochs`` (trial x
epoch), ``experts`` (trial x MoE layer x expert), ``affinity`` (trial x layer x expert x labelling x group)
and ``comparison`` (per combination of swept values except the seed: n, mean, std, 95% CI of each key
metric over the seeds, clipped to the metric's range, none below 3 seeds).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pathlib
import re
import sys
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..config import flatten, resolve_entry, trial_config
from ..errors import ConfigError, HarnessError
from ..metrics.utilization import ALIVE_SHARE
from ..storage import Location

SCHEMA_VERSION = 1
TABLES = ("trials", "epochs", "experts", "affinity", "comparison")
STUDY_FILE = "study.json"
# Tune's own bookkeeping in every result; only the wall time is kept (as wall_time_s).
_TUNE_KEYS = {
    "timestamp",
    "checkpoint_dir_name",
    "should_checkpoint",
    "done",
    "training_iteration",
    "trial_id",
    "date",
    "time_this_iter_s",
    "pid",
    "hostname",
    "node_ip",
    "time_since_restore",
    "iterations_since_restore",
    "config",
    "experiment_tag",
    "checkpoint_path",
}


def write_study_file(
    folder: Location,
    name: str,
    base: dict[str, Any],
    trials: list[dict[str, Any]],
    swept: list[str],
    search: dict[str, Any] | None = None,
) -> None:
    """What the sweep intends to run: base config, trials (name + overrides) and the swept keys. A searched
    sweep (``search``: the ``sweep.search`` section) lists its grid points as ``trials``; its trials are
    found in the study folder, each with the values the searcher chose (Tune's ``params.json``)."""
    study = {"name": name, "base": base, "trials": trials, "swept": swept, **({"search": search} if search else {})}
    (folder / STUDY_FILE).write_text(json.dumps(study, indent=1))


def write_parquet(frame: pd.DataFrame, target: Location) -> None:
    """Serialise in memory, then write at once: readers see the old table or the new one, never half."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    target.write_bytes(buffer.getvalue())


def _read_results(trial_dir: Location) -> list[dict[str, Any]]:
    """Tune's ``result.json``: one JSON object per report. While the sweep runs, Tune may be appending the
    last line: a last line that does not parse yet is left for the next read."""
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    results = []
    for i, line in enumerate(lines):
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return results


def _error_message(trial_dir: Location) -> str | None:
    """The one line that says what went wrong: the harness's own error when it raised one, else the last
    line of the traceback Tune saved."""
    path = trial_dir / "error.txt"
    if not path.exists():
        return None
    text = path.read_text()
    ours = re.findall(r"harness\.errors\.\w+: (.+)", text)
    if ours:
        return ours[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def _trial_status(trial_dir: Location, results: list[dict[str, Any]], epochs: int) -> str:
    """``ok`` once the trial reported its last epoch (also when an earlier attempt left an ``error.txt``
    and ``--resume`` finished it), else ``error`` when Tune saved an error, else ``incomplete``."""
    if results and int(results[-1].get("epoch", 0)) >= epochs:
        return "ok"
    if (trial_dir / "error.txt").exists():
        return "error"
    return "incomplete"


@dataclass
class TrialRecord:
    """What the sweep left on disk for one trial."""

    index: int
    name: str
    values: dict[str, Any]
    config: dict[str, Any]
    results: list[dict[str, Any]]  # Tune's reports, one per epoch (the last one kept if repeated)
    status: str
    error: str | None
    search: str = "grid"  # who chose the swept values: grid (expanded before the sweep) or optuna


def load_trials(folder: Location) -> tuple[str, list[TrialRecord]]:
    """The study's name and its trials, from ``study.json`` and Tune's trial folders."""
    study_path = folder / STUDY_FILE
    if not study_path.exists():
        raise HarnessError(f"{folder}: not a study folder (no {STUDY_FILE}); run python -m harness.sweep first")
    study = json.loads(study_path.read_text())
    entries = study["trials"]
    if study.get("search"):  # the searcher's trials so far, from their folders
        entries = [
            resolve_entry(json.loads((folder / name / "params.json").read_text()))
            for name in folder.list_dirs()
            if (folder / name / "params.json").exists()
        ]
    records = []
    for index, trial in enumerate(entries):
        try:
            config = trial_config(study["base"], trial["overrides"]).model_dump(mode="json")
        except ConfigError:  # values a searcher chose that the schema refuses: the trial errored with this,
            config = trial_config(study["base"], {}).model_dump(mode="json")  # its row shows the base config
        trial_dir = folder / trial["name"]
        by_epoch = {r.get("epoch"): r for r in _read_results(trial_dir)}  # a resumed trial may repeat one
        results = [by_epoch[e] for e in sorted(by_epoch, key=lambda e: e or 0)]
        status = _trial_status(trial_dir, results, config["train"]["epochs"])
        records.append(
            TrialRecord(
                index,
                trial["name"],
                trial.get("values", {}),
                config,
                results,
                status,
                _error_message(trial_dir) if status == "error" else None,
                trial.get("search", "grid"),
            )
        )
    return study["name"], records


def _cell(value: Any) -> Any:
    """One type per column: lists and mappings as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


# Result entries that are not per-epoch figures: timing, placement records, Ray bookkeeping.
NOT_METRICS = ("time_total_s", "placement", "affinity", "train_placement_group")


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in _TUNE_KEYS and k not in NOT_METRICS}


# Metrics whose best epoch (highest value) trials.parquet records beside the last epoch's value.
BEST_OF = ("val_top1", "val_top5", "val_ap")


def _gpus(config: dict[str, Any], last: dict[str, Any]) -> float:
    """GPUs the trial held: each worker that reported a GPU holds its ``resources_per_worker`` share."""
    share = (config["distributed"].get("resources_per_worker") or {}).get("GPU", 1.0)
    workers = json.loads(last.get("placement") or "[]")
    return share * sum(1 for w in workers if w.get("gpu_id") is not None)


# A layer has collapsed when one expert takes more than this share of its importance, or at most one expert
# is alive (above ALIVE_SHARE of it): the router has stopped being a mixture.
COLLAPSE_SHARE = 0.9


def collapsed_flags(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"moe<i>_collapsed": 1.0 | 0.0}`` for every MoE layer of a trial's last-epoch ``metrics`` with at
    least two experts (from ``moe<i>_expert<j>_importance_share`` and ``moe<i>_living_experts``; see
    :data:`COLLAPSE_SHARE`); a single-expert layer gets none."""
    flags = {}
    for key in metrics:
        layer = re.fullmatch(r"(moe\d+)_living_experts", key)
        if layer is None:
            continue
        prefix = layer.group(1)
        shares = [v for k, v in metrics.items() if re.fullmatch(rf"{prefix}_expert\d+_importance_share", k)]
        if len(shares) < 2 or not all(isinstance(v, (int, float)) and not math.isnan(v) for v in shares):
            continue
        collapsed = max(shares) > COLLAPSE_SHARE or metrics[key] <= 1
        flags[f"{prefix}_collapsed"] = 1.0 if collapsed else 0.0
    return flags


def trials_table(study: str, records: list[TrialRecord], trial_times: dict[str, list] | None = None) -> pd.DataFrame:
    """One row per trial: status, error, swept values, full config, last epoch's metrics; with the sweep's
    ``trial_times`` (trial -> [[start, end], ...]) also the trial's wall time and overhead."""
    trial_times = trial_times or {}
    rows = []
    for r in records:
        last = r.results[-1] if r.results else {}
        row: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "study": study,
            "trial": r.name,
            "trial_index": r.index,
            "status": r.status,
            "error": r.error,
            "search": r.search,
            "epochs": len(r.results),
            "wall_time_s": last.get("time_total_s"),
        }
        row["gpu_hours"] = _gpus(r.config, last) * (row["wall_time_s"] or 0.0) / 3600
        segments = trial_times.get(r.name, [])
        if segments and all(end is not None for _, end in segments):
            row["trial_wall_s"] = sum(end - start for start, end in segments)
            row["train_loop_s"] = sum(res.get("epoch_s", 0.0) for res in r.results)
            row["overhead_s"] = row["trial_wall_s"] - row["train_loop_s"]
        row.update({f"sweep.{k}": _cell(v) for k, v in r.values.items()})
        row.update({f"config.{k}": _cell(v) for k, v in flatten(r.config).items()})
        row.update({k: v for k, v in _metrics(last).items() if k not in row})
        row.update(collapsed_flags(row))
        for metric in BEST_OF:
            scores = [(res[metric], res.get("epoch")) for res in r.results if isinstance(res.get(metric), (int, float))]
            if scores:
                row[f"best_{metric}"], row[f"best_{metric}_epoch"] = max(scores)
        row["placement"] = last.get("placement")
        rows.append(row)
    # A study without errors still writes ``error`` as strings (all missing), not Arrow's null type.
    return pd.DataFrame(rows).astype({"error": "string", "search": "string"}) if rows else pd.DataFrame(rows)


def epochs_table(study: str, records: list[TrialRecord]) -> pd.DataFrame:
    """One row per trial and epoch with every metric reported then."""
    rows = [
        {
            "schema_version": SCHEMA_VERSION,
            "study": study,
            "trial": r.name,
            **{f"sweep.{k}": _cell(v) for k, v in r.values.items()},
            **_metrics(result),
        }
        for r in records
        for result in r.results
    ]
    return pd.DataFrame(rows, columns=None if rows else ["schema_version", "study", "trial", "epoch"])


EXPERT_COLUMNS = [
    "schema_version",
    "study",
    "trial",
    "layer",
    "expert",
    "importance_share",
    "load_share",
    "alive",
    "rank",
    "node_id",
    "gpu_id",
]
AFFINITY_COLUMNS = ["schema_version", "study", "trial", "layer", "expert", "group_kind", "group", "share"]


def experts_table(study: str, records: list[TrialRecord]) -> pd.DataFrame:
    """One row per trial, MoE layer and expert (last epoch): importance and load share, alive, and where
    the expert lived (rank, node, GPU)."""
    rows = []
    for r in records:
        if not r.results:
            continue
        last = r.results[-1]
        owners = {}
        for worker in json.loads(last.get("placement") or "[]"):
            for layer, ids in worker["experts"].items():
                owners.update({(int(layer), e): worker for e in ids})
        keys = [re.fullmatch(r"moe(\d+)_expert(\d+)_importance_share", k) for k in last]
        for match in filter(None, keys):
            layer, expert = int(match[1]), int(match[2])
            share = last[match[0]]
            worker = owners.get((layer, expert), {})
            rows.append(
                {
                    "schema_version": SCHEMA_VERSION,
                    "study": study,
                    "trial": r.name,
                    "layer": layer,
                    "expert": expert,
                    "importance_share": share,
                    "load_share": last.get(f"moe{layer}_expert{expert}_load_share"),
                    "alive": share > ALIVE_SHARE,
                    "rank": worker.get("rank"),
                    "node_id": worker.get("node_id"),
                    "gpu_id": worker.get("gpu_id"),
                }
            )
    # Nullable integers: rank and GPU are unknown for some runs (no GPU on CPU), and the column must keep
    # its type whatever the rows hold (an all-None column would be written with Arrow's null type).
    return pd.DataFrame(rows, columns=EXPERT_COLUMNS).astype({"rank": "Int64", "gpu_id": "Int64"})


def affinity_table(study: str, records: list[TrialRecord]) -> pd.DataFrame:
    """One row per trial, layer, expert, labelling (``class``, ``superclass``, ...) and group: the share of
    the expert's gate mass that came from that group (last epoch)."""
    rows = []
    for r in records:
        if not r.results or not r.results[-1].get("affinity"):
            continue
        for layer, kinds in json.loads(r.results[-1]["affinity"]).items():
            for kind, matrix in kinds.items():
                for expert, shares in enumerate(matrix):
                    rows.extend(
                        {
                            "schema_version": SCHEMA_VERSION,
                            "study": study,
                            "trial": r.name,
                            "layer": int(layer),
                            "expert": expert,
                            "group_kind": kind,
                            "group": group,
                            "share": share,
                        }
                        for group, share in enumerate(shares)
                    )
    return pd.DataFrame(rows, columns=AFFINITY_COLUMNS)


# Metrics compared across methods (those a study reports; per MoE layer for moe<i>_...).
COMPARED = (
    "val_top1",
    "val_top5",
    "val_ap",
    "val_ap50",
    "val_ap75",
    "val_ap_small",
    "val_ap_medium",
    "val_ap_large",
    "images_per_s",
)
COMPARED_MOE = (
    "collapsed",
    "expert_similarity",
    "routing_fluctuation",
    "importance_cv",
    "load_cv",
    "living_experts",
    "usage_entropy_bits",
    "sample_entropy_bits",
    "kl_uniform_bits",
    "mutual_info_bits",
    "expert_prediction_mutual_info_bits",
    "superclass_mutual_info_bits",
    "object_size_mutual_info_bits",
    "fpn_level_mutual_info_bits",
    "max_load_ratio",
    "dropped_fraction",
    "router_logit_abs_mean",
)
# Test-time k figures (train.test_time_k): val_top1_k<k>, val_ap_k<k>, val_ap50_k<k>.
COMPARED_TEST_TIME_K = r"val_(top1|ap|ap50)_k\d+"
# Two-sided 95% Student t quantiles for 1..30 degrees of freedom; the normal 1.96 beyond.
_T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


# The fewest seeds an interval is given for: with two, the t interval is the mean +- 12.7 sd / sqrt(2),
# about +-9 sample sds, wider than any difference a reader could act on.
MIN_SEEDS_FOR_CI = 3
# The one list of metrics with a range; every interval, table or printed, is clipped through
# metric_range. In [0, 1]: accuracies (top-k, also at a test-time k), COCO APs and ARs, fractions and
# shares, error rates (the paper tables' "train error", "test error").
_UNIT_RANGE = re.compile(
    r"(train|val|best_val)_(top\d+|ap(50|75)?|ar\d*|ap_\w+|ar_\w+)(_k\d+)?"
    r"|\w+_(fraction|share)|(train|test)[ _]error|moe\d+_(collapsed|routing_fluctuation)"
)
# Never negative: coefficients of variation, counts, ratios of counts, magnitudes, entropies, KL
# divergences and mutual informations (plug-in estimates: never below 0 either), throughput.
_NON_NEGATIVE = re.compile(
    r"moe\d+_(importance_cv|load_cv|living_experts|max_load_ratio|router_logit_abs_mean|\w+_bits)"
    r"|images_per_s"
)


def t95(dof: int) -> float:
    """The two-sided 95% Student t quantile for ``dof`` degrees of freedom (the normal 1.96 beyond 30)."""
    if dof < 1:
        raise ValueError(f"t95: degrees of freedom must be >= 1, got {dof}")
    return _T95[dof - 1] if dof <= len(_T95) else 1.96


def metric_range(name: str, num_experts: int | None = None) -> tuple[float, float] | None:
    """The values metric ``name`` can take, ``(lo, hi)`` (``hi`` may be infinite), or None when it has no
    bound (losses, learning rates, times). ``moe<i>_living_experts`` is a count in [0, ``num_experts``]
    (unbounded above when ``num_experts`` is not given)."""
    if _UNIT_RANGE.fullmatch(name):
        return 0.0, 1.0
    if re.fullmatch(r"moe\d+_expert_similarity", name):  # a mean of cosines
        return -1.0, 1.0
    if num_experts is not None and re.fullmatch(r"moe\d+_living_experts", name):
        return 0.0, float(num_experts)
    if _NON_NEGATIVE.fullmatch(name):
        return 0.0, math.inf
    return None


def ci95(values: Any, bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """The 95% confidence interval of the mean of ``values`` (one per seed; missing ones dropped): Student
    t, clipped to ``bounds`` (the metric's range, :func:`metric_range`). The true mean lies in the range,
    so the clipped interval covers it whenever the unclipped one does. ``(nan, nan)`` for fewer than
    :data:`MIN_SEEDS_FOR_CI` values. A mean outside ``bounds`` (COCO's AP of -1: no object of that size in
    the validation set) is a sentinel, not a measurement: its interval is left unclipped."""
    values = pd.to_numeric(pd.Series(values, dtype=float), errors="coerce").dropna()
    n = len(values)
    if n < MIN_SEEDS_FOR_CI:
        return math.nan, math.nan
    mean = float(values.mean())
    half = t95(n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None and bounds[0] <= mean <= bounds[1]:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return low, high


def group_num_experts(frame: pd.DataFrame) -> int | None:
    """E of a group of trials (rows of ``trials.parquet``) when they all share one, else None: the upper
    bound of their living-experts count (:func:`metric_range`)."""
    column = frame.get("config.moe.num_experts")
    values = set(column.dropna()) if column is not None else set()
    return int(values.pop()) if len(values) == 1 else None


def comparison_table(study: str, trials: pd.DataFrame) -> pd.DataFrame:
    """Per combination of swept values except the seed (finished trials only): for each key metric
    ``n``, ``mean``, ``std`` (sample) and the 95% confidence interval of the mean (:func:`ci95`: Student t
    clipped to the metric's range; NaN for fewer than 3 seeds). A one-expert group (the single-expert
    baseline) has no routing figures here: its balance and information are constants, not measurements,
    and would rank it the most balanced method."""
    groups = [c for c in trials.columns if c.startswith("sweep.") and c != "sweep.seed"]
    metrics = (
        [m for m in COMPARED if m in trials]
        + [c for c in trials.columns if re.fullmatch(r"moe\d+_(" + "|".join(COMPARED_MOE) + ")", c)]
        + [c for c in trials.columns if re.fullmatch(COMPARED_TEST_TIME_K, c)]
    )
    columns = ["schema_version", "study", *groups, "metric", "n", "mean", "std", "ci95_low", "ci95_high"]
    finished = trials[trials["status"] == "ok"]
    rows = []
    for key, frame in finished.groupby(groups, dropna=False, sort=False) if groups else [((), finished)]:
        key = key if isinstance(key, tuple) else (key,)
        num_experts = group_num_experts(frame)
        for metric in metrics:
            if num_experts == 1 and re.match(r"moe\d+_", metric):
                continue
            values = pd.to_numeric(frame[metric], errors="coerce").dropna()
            n = len(values)
            if n == 0:
                continue
            mean = float(values.mean())
            std = float(values.std(ddof=1)) if n > 1 else float("nan")
            low, high = ci95(values, metric_range(metric, num_experts))
            rows.append([SCHEMA_VERSION, study, *key, metric, n, mean, std, low, high])
    return pd.DataFrame(rows, columns=columns)


# Not *.json: at --resume, Tune copies the experiment folder's top-level *.json and *.pkl into its staging
# folder and uploads them back over the originals at every state sync, which would put back the times of
# the first run and drop every later one.
TRIAL_TIMES_FILE = "trial_times.jsonl"


def read_trial_times(folder: Location) -> dict[str, list[list[float | None]]]:
    """``trial -> [[start, end], ...]`` (wall clock; ``end`` null where the driver did not see the run end)
    from the study's ``trial_times.jsonl``, one JSON object per line: ``{"trial": ..., "segments": [...]}``.
    A study begun before the file was named so keeps writing ``trial_times.json`` when resumed (its
    callbacks come back from its first run): that file is read where the new one is absent."""
    path, legacy = folder / TRIAL_TIMES_FILE, folder / "trial_times.json"
    if path.exists():
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {line["trial"]: line["segments"] for line in lines}
    return json.loads(legacy.read_text()) if legacy.exists() else {}


def trials_finished_since(times: dict[str, list[list[float | None]]], since: float) -> int:
    """How many trials of :func:`read_trial_times`' ``times`` have a run segment that ended at or after
    ``since`` (wall clock): the trials a resumed sweep finished itself, not those it found finished."""
    return sum(any(end is not None and end >= since for _, end in segments) for segments in times.values())


def write_trial_times(folder: Location, times: dict[str, list[list[float | None]]]) -> None:
    """Replace the study's ``trial_times.jsonl`` with ``times`` (:func:`read_trial_times`' form)."""
    lines = (json.dumps({"trial": trial, "segments": segments}) for trial, segments in times.items())
    (folder / TRIAL_TIMES_FILE).write_text("".join(line + "\n" for line in lines))


def _build_tables(folder: Location, study: str, records: list[TrialRecord]) -> dict[str, pd.DataFrame]:
    """Every table from the trials' records (:func:`load_trials`), written into ``folder``."""
    trials = trials_table(study, records, read_trial_times(folder))
    tables = {
        "trials": trials,
        "epochs": epochs_table(study, records),
        "experts": experts_table(study, records),
        "affinity": affinity_table(study, records),
        "comparison": comparison_table(study, trials),
    }
    for name, frame in tables.items():
        write_parquet(frame, folder / f"{name}.parquet")
    return tables


def _has_trial_folders(folder: Location, records: list[TrialRecord]) -> bool:
    """Whether any of the study's trials left its folder here (a published copy keeps only the tables)."""
    return any((folder / record.name).exists() for record in records)


def _holds_published_trials(folder: Location) -> bool:
    path = folder / "trials.parquet"
    return path.exists() and len(pd.read_parquet(io.BytesIO(path.read_bytes()))) > 0


def aggregate(folder: Location | str | pathlib.Path) -> dict[str, pd.DataFrame]:
    """Build every table of the study in ``folder`` (a path or URI) and write it there; returns them by name.
    A folder with the tables but none of the trials' folders (a published copy) is refused: rebuilt from
    no trials, its tables would be emptied (:func:`study_tables` reads such a copy as it is)."""
    folder = folder if isinstance(folder, Location) else Location(folder)
    study, records = load_trials(folder)
    if not _has_trial_folders(folder, records) and _holds_published_trials(folder):
        raise HarnessError(
            f"{folder}: holds a study's tables but none of its trials' folders; rebuilt, the tables would be "
            "emptied (python -m harness.report reads such a copy as it is)"
        )
    return _build_tables(folder, study, records)


# The tables a published copy must hold; ``comparison`` is derived from ``trials`` and recomputed.
STORED_TABLES = ("trials", "epochs", "experts", "affinity")


def study_tables(folder: Location | str | pathlib.Path) -> dict[str, pd.DataFrame]:
    """The study's tables for a reader: rebuilt (and written) from its trials' folders where the sweep left
    them, else read from its Parquet files, writing nothing. A published copy (``results/mnist_krishnamurthy``,
    tables downloaded from a bucket) keeps the tables without the trials' folders; rebuilt from no trials,
    its tables would be emptied. Read, ``comparison`` is recomputed from ``trials`` by this version's rules."""
    folder = folder if isinstance(folder, Location) else Location(folder)
    if (folder / STUDY_FILE).exists():
        study, records = load_trials(folder)
        if _has_trial_folders(folder, records) or not (folder / "trials.parquet").exists():
            return _build_tables(folder, study, records)
    elif not (folder / "trials.parquet").exists():
        raise HarnessError(f"{folder}: not a study folder (no {STUDY_FILE}); run python -m harness.sweep first")
    tables = {}
    for name in STORED_TABLES:
        path = folder / f"{name}.parquet"
        if not path.exists():
            raise HarnessError(f"{path}: missing; a study's tables are {', '.join(STORED_TABLES)} (.parquet)")
        tables[name] = pd.read_parquet(io.BytesIO(path.read_bytes()))
    trials = tables["trials"]
    study = trials["study"].iloc[0] if len(trials) else folder.name
    tables["comparison"] = comparison_table(study, trials) if "status" in trials else pd.DataFrame()
    return tables


def summary(tables: dict[str, pd.DataFrame], swept_keys: list[str], metrics: tuple[str, ...]) -> str:
    """A short comparison: one line per trial with its swept values, status and key metrics."""
    trials = tables["trials"]
    columns = ["trial", "status"] + [f"sweep.{k}" for k in swept_keys if f"sweep.{k}" in trials]
    columns += [m for m in metrics if m in trials]
    view = trials[columns].rename(columns=lambda c: c.removeprefix("sweep."))
    counts = trials["status"].value_counts().to_dict()
    head = f"{len(trials)} trials: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    errors = [f"  {t}: {e}" for t, e in zip(trials["trial"], trials["error"]) if isinstance(e, str)]
    return "\n".join(
        [head, view.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
        + (["errors:"] + errors if errors else [])
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.aggregate", description="Write a study's Parquet tables.")
    parser.add_argument("folder", help="the study's results folder, e.g. results/quickstart")
    args = parser.parse_args(argv)
    try:
        tables = aggregate(args.folder)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, frame in tables.items():
        print(f"{Location(args.folder) / name}.parquet: {len(frame)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
