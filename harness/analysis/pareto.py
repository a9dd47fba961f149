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
    if rows.empty:
        return pd.DataFrame(columns=[*groups, task_metric, BALANCE_METRIC, "pareto"])
    index = groups or None
    mean = rows.pivot_table(index=index, columns="metric", values="mean", aggfunc="first", sort=False, dropna=False)
    std = rows.pivot_table(index=index, columns="metric", values="std", aggfunc="first", sort=False, dropna=False)
    wide = mean.join(std.add_suffix("_std"))
    for column in (task_metric, BALANCE_METRIC):
        if column not in wide:
            wide[column] = float("nan")
            wide[f"{column}_std"] = float("nan")
    wide = wide.reset_index() if groups else wide.reset_index(drop=True)
    wide["pareto"] = pareto_front(wide, task_metric, BALANCE_METRIC)
    return wide
