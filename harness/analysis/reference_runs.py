"""Our trials held against every run Krishnamurthy et al. released, not only their final table.

The reference repository (``aistats2023-1554/moe``, ``results/{mnist,fmnist}_results.csv``) lists each
run of each configuration: the file name encodes the gate, the regulariser and its weights (10 runs per
configuration; the single-expert runs are ``<prefix>_single_model..._<i>``). For each of our methods this
module finds the reference runs of the same configuration by that file name (:func:`reference_name`), and
per metric (test error, I(E;Y), H_s, H_u) compares the two samples: medians and ranges, and a two-sided
Mann-Whitney U test (:func:`scipy.stats.mannwhitneyu`; exact p-values for small samples without ties).

Quirks of the reference's files, handled here: the columns are called ``test error`` (MNIST) or ``val
error`` (FashionMNIST, where it is the test set too) and ``expert usage`` or ``experts usage``; their
I(E;Y) is between the selected expert and the class that expert predicts (our
``moe0_expert_prediction_mutual_info_bits``); every entropy is in bits. The ``*_final_results.csv`` rows
are single runs (per category the run with the lowest training error over a whole grid of weights), and
its ``new_`` rows are distilled models this project does not train; neither is used here.
"""

from __future__ import annotations

import math
import pathlib
import re
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from ..errors import HarnessError

# The reference CSV's column -> our per-trial column (paper.py's names).
REFERENCE_COLUMNS = {
    "test error": "test error",
    "val error": "test error",  # FashionMNIST: the 10,000 test images as well
    "mutual information": "I(E;Y)",
    "sample entropy": "H_s",
    "expert usage": "H_u",
    "experts usage": "H_u",
}
COMPARED = ("test error", "I(E;Y)", "H_s", "H_u")
PREFIXES = {"mnist": ("mnist", "_hidden_32"), "fashion_mnist": ("fmnist", "")}


def reference_name(
    data: str, num_experts: int, attentive: bool, importance: float, beta_s: float, beta_d: float, num_classes: int = 10
) -> str:
    """The reference's file name for a configuration (its ``generate_plot_file``), e.g. ``mnist_with_reg_
    hidden_32_importance_0.2_10_5_models.pt``; the single expert's runs are this name plus ``_<i>``."""
    if data not in PREFIXES:
        raise HarnessError(f"reference runs exist for {', '.join(PREFIXES)}, not {data!r}")
    prefix, hidden = PREFIXES[data]
    if num_experts == 1:
        return f"{prefix}_single_model{hidden}"
    tail = f"_{num_classes}_{num_experts}_models.pt"
    similarity = f"_sample_sim_same_{beta_s}_sample_sim_diff_{beta_d}"
    if not attentive:
        if beta_s or beta_d:
            return f"{prefix}_with_reg{hidden}{similarity}{tail}"
        if importance:
            return f"{prefix}_with_reg{hidden}_importance_{importance}{tail}"
        return f"{prefix}_without_reg{hidden}{tail}"
    if beta_s or beta_d:
        # MNIST's attentive + sample-similarity files carry their own prefix.
        middle = "_with_attn_sample_sim_reg" if data == "mnist" else "_with_attn_reg"
        return f"{prefix}{middle}{hidden}{similarity}{tail}"
    if importance:
        return f"{prefix}_with_attn_reg{hidden}_importance_{importance}{tail}"
    return f"{prefix}_with_attention{hidden}{tail}"


def trial_reference_name(trial: dict[str, Any]) -> str:
    """:func:`reference_name` for a trial from its flattened config (``config.<key>`` columns)."""
    return reference_name(
        trial["config.data.name"],
        int(trial["config.moe.num_experts"]),
        trial.get("config.moe.gate.type") == "attentive",
        float(trial.get("config.moe.losses.importance") or 0.0),
        float(trial.get("config.moe.losses.sample_similarity.beta_s") or 0.0),
        float(trial.get("config.moe.losses.sample_similarity.beta_d") or 0.0),
    )


def read_reference_runs(path: str | pathlib.Path) -> pd.DataFrame:
    """The reference's per-run CSV with our column names (``filename``, ``test error``, ``I(E;Y)``, ``H_s``,
    ``H_u``, ``train error``); a missing file or column is a one-line :class:`HarnessError` naming it."""
    path = pathlib.Path(path)
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise HarnessError(f"--reference-runs: {path}: no such file") from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise HarnessError(f"--reference-runs: {path}: not a readable CSV ({exc})") from None
    frame = frame.rename(columns=REFERENCE_COLUMNS)
    missing = [c for c in ("filename", *COMPARED) if c not in frame]
    if missing:
        raise HarnessError(f"--reference-runs: {path}: no column {', '.join(missing)} (is it a *_results.csv?)")
    return frame


def runs_of(reference: pd.DataFrame, name: str) -> pd.DataFrame:
    """The reference runs of one configuration: its file name exactly, or ``name_<i>`` (single expert)."""
    single = reference["filename"].str.fullmatch(re.escape(name) + r"_\d+")
    return reference[(reference["filename"] == name) | single]


def compare_samples(ours: pd.Series, theirs: pd.Series) -> dict[str, float]:
    """Two samples of one metric: each one's n, median, min and max, and the two-sided Mann-Whitney U test
    (``U`` counts the pairs in which ours is larger, ties as 1/2; ``p`` its p-value); NaN without data."""
    ours, theirs = ours.dropna().astype(float), theirs.dropna().astype(float)
    row: dict[str, float] = {}
    for side, values in (("ref", theirs), ("ours", ours)):
        row[f"{side}_n"] = float(len(values))
        row[f"{side}_median"] = float(values.median()) if len(values) else math.nan
        row[f"{side}_min"] = float(values.min()) if len(values) else math.nan
        row[f"{side}_max"] = float(values.max()) if len(values) else math.nan
    if len(ours) and len(theirs):
        test = mannwhitneyu(ours.to_numpy(), theirs.to_numpy(), alternative="two-sided")
        row["U"], row["p"] = float(test.statistic), float(test.pvalue)
    else:
        row["U"] = row["p"] = math.nan
    row["inside_range"] = (
        float(row["ref_min"] <= row["ours_median"] <= row["ref_max"]) if len(ours) and len(theirs) else math.nan
    )
    return row


def holm(p_values: pd.Series) -> pd.Series:
    """Holm's step-down adjustment for testing ``m`` p-values at once (NaN stays NaN and is not counted):
    the i-th smallest becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``; reject where it is below the
    level, and the chance of any false rejection stays below that level."""
    valid = p_values.dropna().sort_values(kind="stable")
    m = len(valid)
    steps = pd.Series([min(1.0, (m - j) * p) for j, p in enumerate(valid)], index=valid.index)
    return steps.cummax().reindex(p_values.index)


def reference_comparison(per_trial: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per method and metric (:data:`COMPARED`), our seeds against the reference's runs of the same
    configuration (:func:`compare_samples`). ``per_trial``: one row per finished trial with ``method``,
    ``reference_name`` and the metric columns (``paper.krishnamurthy_trials``)."""
    rows = []
    for (method, name), group in per_trial.groupby(["method", "reference_name"], sort=False):
        theirs = runs_of(reference, name)
        for metric in COMPARED:
            if len(theirs) and theirs[metric].isna().all():
                continue  # the reference's single expert has no routing figures (ours are 0 by definition)
            rows.append(
                {
                    "method": method,
                    "reference": name,
                    "metric": metric,
                    **compare_samples(group[metric], theirs[metric]),
                }
            )
    table = pd.DataFrame(rows)
    if not table.empty:
        table["p_holm"] = holm(table["p"])  # every figure of the study at once
    return table


def comparison_summary(comparison: pd.DataFrame, level: float = 0.05) -> str:
    """One sentence: how many of our medians lie inside the reference's run-to-run range, how many tests
    find a difference at ``level``, and how many still do after Holm's correction for all of them."""
    tested = comparison.dropna(subset=["p"])
    inside = comparison["inside_range"].dropna()
    below, holm_below = int((tested["p"] < level).sum()), int((tested["p_holm"] < level).sum())
    return (
        f"Medians inside the reference's range: {int(inside.sum())} of {len(inside)}. Tests finding a difference "
        f"at p < {level:g}: {below} of {len(tested)}; after Holm's correction for {len(tested)} tests: {holm_below}."
    )


# The paper's findings as a change of one metric from one kind of method to another: (finding, metric,
# from, to, direction of the change). A kind is a method's name without its weights
# (paper.krishnamurthy_method), e.g. "classic + importance".
KRISHNAMURTHY_FINDINGS = (
    ("a mixture beats the single expert", "test error", "single expert", "classic gate", "lower"),
    ("importance raises H_u", "H_u", "classic gate", "classic + importance", "higher"),
    ("importance raises H_u", "H_u", "attentive gate", "attentive + importance", "higher"),
    ("importance raises I(E;Y)", "I(E;Y)", "classic gate", "classic + importance", "higher"),
    ("importance raises I(E;Y)", "I(E;Y)", "attentive gate", "attentive + importance", "higher"),
    ("sample similarity raises I(E;Y)", "I(E;Y)", "classic gate", "classic + sample similarity", "higher"),
    ("sample similarity raises I(E;Y)", "I(E;Y)", "attentive gate", "attentive + sample similarity", "higher"),
    ("the attentive gate lowers H_s", "H_s", "classic gate", "attentive gate", "lower"),
    ("the attentive gate lowers H_s", "H_s", "classic + importance", "attentive + importance", "lower"),
    ("the attentive gate lowers H_s", "H_s", "classic + sample similarity", "attentive + sample similarity", "lower"),
    ("the attentive gate raises I(E;Y)", "I(E;Y)", "classic gate", "attentive gate", "higher"),
    ("the attentive gate raises I(E;Y)", "I(E;Y)", "classic + importance", "attentive + importance", "higher"),
    ("the attentive gate leaves the test error unchanged", "test error", "classic gate", "attentive gate", "same"),
)


def method_kind(method: str) -> str:
    """``classic + importance (0.2) -> classic + importance``: a method's name without its weights."""
    return re.sub(r" \(.*\)$", "", method)


def _verdict(before: pd.Series, after: pd.Series, direction: str, level: float) -> tuple[float, str]:
    """The two-sided Mann-Whitney p of ``after`` against ``before`` and what it says of the finding:
    ``holds`` (p < level and ``after`` tends to be on the ``direction`` side: U above its null mean
    n_before n_after / 2 for ``higher``), ``reversed`` (p < level, the other side) or ``not separated``;
    for ``same``: ``no difference found`` (p >= level) or ``differs``. ``too few runs`` where no outcome
    could reach p < level: the exact test's smallest p is 2 / C(n_before + n_after, n_before) (1/3 for 2 vs
    2, 1/10 for 3 vs 3), so "not separated" or "no difference found" would be certain, not evidence."""
    before, after = before.dropna().astype(float), after.dropna().astype(float)
    if before.empty or after.empty:
        return math.nan, "no runs"
    test = mannwhitneyu(after.to_numpy(), before.to_numpy(), alternative="two-sided")
    p = float(test.pvalue)
    if 2 / math.comb(len(before) + len(after), len(before)) >= level:
        return p, "too few runs"
    if direction == "same":
        return p, "no difference found" if p >= level else "differs"
    null_mean = len(before) * len(after) / 2
    if p >= level or test.statistic == null_mean:
        return p, "not separated"
    return p, "holds" if (test.statistic > null_mean) == (direction == "higher") else "reversed"


def paper_findings(per_trial: pd.DataFrame, reference: pd.DataFrame, level: float = 0.05) -> pd.DataFrame:
    """Each of the paper's findings (:data:`KRISHNAMURTHY_FINDINGS`) tested the same way on our seeds and
    on the reference's runs of the same two configurations: medians before and after, the two-sided
    Mann-Whitney p, Holm's adjustment of it over the table's rows (per side), and the verdict
    (:func:`_verdict`, on the unadjusted p); one row per pair of methods the study ran on one data set."""
    kinds = per_trial.assign(kind=per_trial["method"].map(method_kind))
    if "data" not in kinds:
        kinds = kinds.assign(data="")
    rows = []
    for finding, metric, source, target, direction in KRISHNAMURTHY_FINDINGS:
        for data, runs in kinds.groupby("data", sort=False):
            pairs = [
                (a, b)
                for a in runs[runs["kind"] == source].groupby(["method", "reference_name"], sort=False)
                for b in runs[runs["kind"] == target].groupby(["method", "reference_name"], sort=False)
            ]
            for ((method_a, name_a), group_a), ((method_b, name_b), group_b) in pairs:
                row = {"finding": finding, "metric": metric, "data": data, "from": method_a, "to": method_b}
                sides = (("ours", group_a[metric], group_b[metric]),)
                sides += (("ref", runs_of(reference, name_a)[metric], runs_of(reference, name_b)[metric]),)
                for side, before, after in sides:
                    row[f"{side}_from"] = float(before.median()) if before.notna().any() else math.nan
                    row[f"{side}_to"] = float(after.median()) if after.notna().any() else math.nan
                    row[f"{side}_p"], row[f"{side}_verdict"] = _verdict(before, after, direction, level)
                rows.append(row)
    table = pd.DataFrame(rows)
    for side in ("ours", "ref") if rows else ():
        table[f"{side}_p_holm"] = holm(table[f"{side}_p"])
    return table


def paper_findings_markdown(findings: pd.DataFrame) -> str:
    """The findings as a markdown table: per finding and pair of methods, each side's medians before ->
    after, p (and Holm's p) and verdict; a line saying so when no pair of the paper's methods ran."""
    if findings.empty:
        return "_No pair of methods that a finding compares ran in this study._"
    lines = [
        "| finding | metric | from -> to | ours: medians (p; Holm) | ours | reference runs: medians (p; Holm) "
        "| reference |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(r: pd.Series, side: str) -> str:
        before, after, p, p_holm = (r[f"{side}_{key}"] for key in ("from", "to", "p", "p_holm"))
        medians = "-" if math.isnan(before) or math.isnan(after) else f"{before:.3f} -> {after:.3f}"
        return medians + ("" if math.isnan(p) else f" ({p:.2g}; {p_holm:.2g})")

    for _, r in findings.iterrows():
        lines.append(
            f"| {r['finding']} | {r['metric']} | {r['from']} -> {r['to']} | {cell(r, 'ours')} | "
            f"{r['ours_verdict']} | {cell(r, 'ref')} | {r['ref_verdict']} |"
        )
    return "\n".join(lines)


def comparison_markdown(comparison: pd.DataFrame) -> str:
    """The comparison as a markdown table: medians [min, max] (n) per side, U and p, and whether our
    median falls inside the reference's range."""
    lines = [
        "| method | metric | reference: median [min, max] (n) | ours: median [min, max] (n) | U | p | p (Holm) | "
        "ours inside their range |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def side(r: pd.Series, prefix: str) -> str:
        if not r[f"{prefix}_n"]:
            return "-"
        low, high, n = r[f"{prefix}_min"], r[f"{prefix}_max"], int(r[f"{prefix}_n"])
        return f"{r[f'{prefix}_median']:.4f} [{low:.4f}, {high:.4f}] ({n})"

    for _, r in comparison.iterrows():
        inside = "-" if np.isnan(r["inside_range"]) else ("yes" if r["inside_range"] else "**no**")
        p = "-" if np.isnan(r["p"]) else f"{r['p']:.3g}"
        p_holm = "-" if np.isnan(r["p_holm"]) else f"{r['p_holm']:.3g}"
        u = "-" if np.isnan(r["U"]) else f"{r['U']:g}"
        sides = f"{side(r, 'ref')} | {side(r, 'ours')}"
        lines.append(f"| {r['method']} | {r['metric']} | {sides} | {u} | {p} | {p_holm} | {inside} |")
    return "\n".join(lines)
