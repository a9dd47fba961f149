"""Paper-style tables from a study's Parquet results, with the published values side by side.

- ``krishnamurthy`` (arXiv 2302.14703, MNIST, whole-model experts): per method train error, test error,
  I(E;Y), H_s, H_u in bits; per trial its last epoch (the trained model, as the reference's
  ``collect_results``), then the mean over seeds with its 95% CI (:func:`harness.analysis.aggregate.ci95`; the paper
  instead reports the single run with the lowest training error of a whole hyper-parameter grid). I(E;Y)
  is the reference code's: between the top-1 expert and the class that expert predicts
  (``moe0_expert_prediction_mutual_info_bits``).
- ``pavlitska`` (arXiv 2204.10598, CIFAR-100 ResNet-18 MoE): per method accuracy and balance metrics, and
  each expert's top-3 CIFAR-100 superclasses (by routed share, layer 0, the method's first trial).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from .aggregate import MIN_SEEDS_FOR_CI, ci95, group_num_experts, metric_range

# Krishnamurthy et al.'s published rows per data set: train error, test error, I(E;Y), H_s, H_u, from the
# reference's results/{mnist,fmnist,cifar100}_final_results.csv (the single expert has no routing figures).
NO_ROUTING = (math.nan, math.nan, math.nan)
KRISHNAMURTHY_PUBLISHED: dict[str, dict[str, tuple[float, ...]]] = {
    "mnist": {  # Table 1, E = 5
        "single expert": (0.097, 0.096, *NO_ROUTING),
        "classic gate": (0.021, 0.038, 2.022, 0.092, 2.172),
        "classic + importance (0.2)": (0.015, 0.032, 2.262, 0.061, 2.320),
        "classic + sample similarity (1e-6, 1e-6)": (0.015, 0.029, 2.244, 0.051, 2.246),
        "attentive gate": (0.019, 0.033, 1.797, 0.071, 2.055),
        "attentive + importance (0.2)": (0.013, 0.035, 2.260, 0.055, 2.266),
        "attentive + sample similarity (1e-6, 1e-2)": (0.013, 0.032, 2.275, 0.039, 2.321),
    },
    "fashion_mnist": {  # E = 5
        "single expert": (0.115, 0.132, *NO_ROUTING),
        "classic gate": (0.041, 0.104, 2.034, 0.081, 2.048),
        "classic + importance (0.2)": (0.031, 0.103, 2.301, 0.172, 2.321),
        "classic + sample similarity (1e-7, 1e-2)": (0.018, 0.095, 2.198, 0.110, 2.225),
        "attentive gate": (0.041, 0.098, 2.071, 0.114, 2.249),
        "attentive + importance (0.8)": (0.014, 0.098, 2.233, 0.101, 2.319),
        "attentive + sample similarity (1e-6, 1e-6)": (0.014, 0.096, 2.296, 0.109, 2.321),
    },
    "cifar100": {  # E = 20
        "single expert": (0.565, 0.575, *NO_ROUTING),
        "classic gate": (0.398, 0.460, 0.967, 0.306, 1.023),
        "classic + importance (0.2)": (0.408, 0.483, 4.177, 1.315, 3.981),
        "classic + sample similarity (1e-5, 1e-6)": (0.393, 0.457, 1.424, 0.381, 1.279),
        "attentive gate": (0.254, 0.450, 1.792, 0.463, 2.178),
        "attentive + importance (0.2)": (0.254, 0.447, 3.684, 1.036, 4.141),
        # trained without the loss in the reference (its betas were never passed on; docs/fidelity.md)
        "attentive + sample similarity (1e-4, 1e-6)": (0.238, 0.451, 3.117, 0.770, 3.357),
    },
}
KRISHNAMURTHY_COLUMNS = ("train error", "test error", "I(E;Y)", "H_s", "H_u")
CLASSIC_GATES = ("gap_fc", "conv_gap_fc")


def krishnamurthy_method(config: dict[str, Any]) -> str:
    """A trial's method in the paper's naming, from its flattened config (``config.<key>`` columns)."""
    if config.get("config.moe.num_experts") == 1:
        return "single expert"
    gate = "attentive" if config["config.moe.gate.type"] == "attentive" else "classic"
    importance = config.get("config.moe.losses.importance") or 0.0
    beta_s = config.get("config.moe.losses.sample_similarity.beta_s") or 0.0
    beta_d = config.get("config.moe.losses.sample_similarity.beta_d") or 0.0
    if beta_s or beta_d:
        return f"{gate} + sample similarity ({_short(beta_s)}, {_short(beta_d)})"
    if importance:
        return f"{gate} + importance ({_short(importance)})"
    return f"{gate} gate"


def _short(value: float) -> str:
    """``1e-06 -> 1e-6``, ``0.01 -> 1e-2``, ``0.2 -> 0.2``: numbers as the paper writes them."""
    text = f"{value:.0e}" if 0 < abs(value) < 0.1 else f"{value:g}"
    return text.replace("e-0", "e-").replace("e+0", "e+")


# The metric each Krishnamurthy column is, for its range (metric_range); the error columns are named for it.
_KRISHNAMURTHY_METRICS = {
    "I(E;Y)": "moe0_expert_prediction_mutual_info_bits",
    "H_s": "moe0_sample_entropy_bits",
    "H_u": "moe0_usage_entropy_bits",
}


def _mean_ci(values: pd.Series, metric: str, num_experts: int | None = None) -> str:
    """``0.080 [0.010, 0.150] (3)``: the mean and its 95% CI clipped to ``metric``'s range (n seeds); with
    fewer than :data:`MIN_SEEDS_FOR_CI` seeds no interval but the seeds' range, ``0.080 (0.060..0.100, 2)``."""
    values = values.dropna()
    n = len(values)
    if n == 0:
        return "-"
    if n < MIN_SEEDS_FOR_CI:
        spread = f"{values.min():.3f}..{values.max():.3f}, " if n > 1 else ""
        return f"{values.mean():.3f} ({spread}{n})"
    low, high = ci95(values, metric_range(metric, num_experts))
    return f"{values.mean():.3f} [{low:.3f}, {high:.3f}] ({n})"


def krishnamurthy_trials(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished trial: ``data``, ``method``, ``reference_name`` (the reference's file name for
    the configuration, MNIST and FashionMNIST only) and the paper's figures (:data:`KRISHNAMURTHY_COLUMNS`)
    at its last epoch (the trained model, as the reference's ``collect_results`` reports it)."""
    from .reference_runs import PREFIXES, trial_reference_name

    finished = trials[trials["status"] == "ok"]
    per_trial = []
    for _, trial in finished.iterrows():
        history = epochs[epochs["trial"] == trial["trial"]]
        if history.empty or "train_top1" not in history:
            continue
        final = history.loc[history["epoch"].idxmax()]
        config = trial.to_dict()
        per_trial.append(
            {
                "data": config.get("config.data.name"),
                "method": krishnamurthy_method(config),
                "reference_name": trial_reference_name(config) if config.get("config.data.name") in PREFIXES else None,
                "train error": 1 - final["train_top1"],
                "test error": 1 - final["val_top1"],
                **{column: final.get(metric) for column, metric in _KRISHNAMURTHY_METRICS.items()},
            }
        )
    # the columns also when no trial has finished yet, so callers can select and report "none"
    return pd.DataFrame(per_trial, columns=["data", "method", "reference_name", *KRISHNAMURTHY_COLUMNS])


def krishnamurthy_table(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """One row per method: ours as ``mean [95% CI] (n seeds)`` (:func:`_mean_ci`) and the published value
    for the trials' data set (``-`` where the paper has none)."""
    frame = krishnamurthy_trials(trials, epochs)
    if frame.empty:
        return pd.DataFrame(columns=["method", *KRISHNAMURTHY_COLUMNS])
    rows = []
    for (data, method), group in frame.groupby(["data", "method"], sort=False, dropna=False):
        row: dict[str, Any] = {"method": method}
        published = KRISHNAMURTHY_PUBLISHED.get(data, {}).get(method)
        for i, column in enumerate(KRISHNAMURTHY_COLUMNS):
            row[column] = _mean_ci(group[column], _KRISHNAMURTHY_METRICS.get(column, column))
            row[f"{column} (paper)"] = f"{published[i]:.3f}" if published and not math.isnan(published[i]) else "-"
        rows.append(row)
    return pd.DataFrame(rows)


def pavlitska_table(
    trials: pd.DataFrame, affinity: pd.DataFrame, superclass_names: list[str] | None = None
) -> pd.DataFrame:
    """One row per method (swept values except the seed): accuracy and balance (mean [95% CI] (n seeds),
    :func:`_mean_ci`) and each expert's top-3 superclasses in the method's first trial."""
    finished = trials[trials["status"] == "ok"]
    groups = [c for c in finished.columns if c.startswith("sweep.") and c != "sweep.seed"]
    rows = []
    keyed = finished.groupby(groups, sort=False, dropna=False) if groups else [((), finished)]
    for key, group in keyed:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = {g.removeprefix("sweep."): v for g, v in zip(groups, key)}
        for column, label in (
            ("val_top1", "accuracy"),
            ("moe0_importance_cv", "importance CV"),
            ("moe0_living_experts", "living experts"),
            ("moe0_kl_uniform_bits", "KL to uniform"),
            ("moe0_superclass_mutual_info_bits", "I(E;superclass)"),
        ):
            if column in group:
                row[label] = _mean_ci(group[column], column, group_num_experts(group))
        first = group.sort_values("trial_index")["trial"].iloc[0]
        share = affinity[
            (affinity["trial"] == first) & (affinity["group_kind"] == "superclass") & (affinity["layer"] == 0)
        ]
        tops = []
        for expert, rows_e in share.groupby("expert"):
            best = rows_e.sort_values("share", ascending=False).head(3)
            names = [superclass_names[g] if superclass_names else str(g) for g in best["group"]]
            tops.append(f"e{expert}: " + ", ".join(names))
        row["top-3 superclasses per expert"] = "; ".join(tops)
        rows.append(row)
    return pd.DataFrame(rows)


# CIFAR-100's superclass names in label order (the official ``meta`` file's coarse_label_names).
CIFAR100_SUPERCLASSES = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
]
