"""Pareto fronts of a study's methods: which methods no other beats on both the task metric (higher is
better) and balance (importance CV, lower is better), on the seeds' means."""

from __future__ import annotations

import pandas as pd

BALANCE_METRIC = "moe0_importance_cv"


def pareto_front(points: pd.DataFrame, maximise: str, minimise: str) -> pd.Series:
    """``points``: one row per method with columns ``maximise`` and ``minimise`` -> a bool Series (same
    index): True where no other row is at least as good on both and strictly better on one. Rows with a
    missing value are never on the front. Identical rows are both on it."""
    valid = points[[maximise, minimise]].notna().all(axis=1)
    up, down = points[maximise], points[minimise]
    front = pd.Series(False, index=points.index)
    for i in points.index[valid]:
        others = points.index[valid & (points.index != i)]
        dominated = (
            (up[others] >= up[i]) & (down[others] <= down[i]) & ((up[others] > up[i]) | (down[others] < down[i]))
        )
        front[i] = not dominated.any()
    return front


def method_means(comparison: pd.DataFrame, task_metric: str) -> pd.DataFrame:
    """The comparison table (one row per method and metric) as one row per method: the method's ``sweep.*``
    columns, ``<task_metric>``, ``<task_metric>_std``, ``moe0_importance_cv`` and its ``_std`` (means and
    standard deviations over seeds), and ``pareto`` (on the front of the two means)."""
    groups = [c for c in comparison.columns if c.startswith("sweep.")]
    rows = comparison[comparison["metric"].isin((task_metric, BALANCE_METRIC))]
    methods: dict[tuple, dict] = {}  # the methods that ran, in the table's order
    for _, row in rows.iterrows():
        key = tuple(row[g] for g in groups)
        entry = methods.setdefault(
            key, {**dict(zip(groups, key)), task_metric: float("nan"), BALANCE_METRIC: float("nan")}
        )
        entry[row["metric"]], entry[f"{row['metric']}_std"] = row["mean"], row["std"]
    wide = pd.DataFrame(
        list(methods.values()),
        columns=[*groups, task_metric, f"{task_metric}_std", BALANCE_METRIC, f"{BALANCE_METRIC}_std"],
    )
    wide["pareto"] = pareto_front(wide, task_metric, BALANCE_METRIC).astype(bool)
    return wide
