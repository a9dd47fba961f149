"""``python -m harness.report results/<study>``: plots and a markdown summary from a study's Parquet tables.

Writes ``results/<study>/report.md`` and ``results/<study>/plots/*.png``:
- ``affinity_<labelling>.png``: expert x group routed share (superclasses, or classes when there are at
  most 20), one panel per method (its first trial: experts are not aligned across seeds, so they are not
  averaged);
- ``importance_over_epochs.png``: each expert's importance share per epoch, one panel per method;
- ``accuracy_vs_balance.png``: validation top-1 (detection: COCO AP) against importance CV, every finished
  trial with more than one expert, by method;
- ``reference_runs.png`` (with ``--reference-runs``): our seeds against the reference's released runs,
  one panel per compared metric;
- ``ap_by_size.png`` (detection): mean AP per COCO size bucket and method with 95% confidence intervals
  (from 3 seeds);
- ``affinity_object_size.png`` / ``affinity_fpn_level.png`` (detection): expert x size bucket / FPN level.

``python -m harness.report --paper krishnamurthy|pavlitska results/<study>`` prints (and writes
``paper_<name>.md``) a table in that paper's layout instead, with the published values side by side.
"""

from __future__ import annotations

import argparse
import io
import math
import pathlib
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .analysis.aggregate import COLLAPSE_SHARE, MIN_SEEDS_FOR_CI, study_tables  # noqa: E402
from .analysis.pareto import BALANCE_METRIC, method_means, pareto_front  # noqa: E402
from .errors import HarnessError  # noqa: E402
from .metrics.names import main_metric  # noqa: E402
from .storage import Location  # noqa: E402

MAX_PANELS = 12
MAX_GROUPS_SHOWN = 20


def _method_columns(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if c.startswith("sweep.") and c != "sweep.seed"]


def _method_labels(trials: pd.DataFrame) -> pd.Series:
    """A short label per trial naming its swept values except the seed."""
    columns = _method_columns(trials)
    if not columns:
        return pd.Series(["all"] * len(trials), index=trials.index)
    return trials[columns].astype(str).agg(" / ".join, axis=1)


def _first_trial_per_method(trials: pd.DataFrame) -> dict[str, str]:
    ok = trials["status"] == "ok"  # the two columns needed, not a copy of the whole (wide) table
    finished = trials.loc[ok, ["trial", "trial_index"]].assign(method=_method_labels(trials)[ok])
    return {
        method: frame.sort_values("trial_index")["trial"].iloc[0]
        for method, frame in finished.groupby("method", sort=False)
    }


def _save(fig: plt.Figure, target: Location) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    target.write_bytes(buffer.getvalue())


def _panels(count: int) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(count, 4)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.axis("off")
    return fig, flat[:count]


def plot_affinity(affinity: pd.DataFrame, firsts: dict[str, str], kind: str, path: Location) -> bool:
    """Expert x group heatmaps of layer 0 for labelling ``kind``; False when there is nothing to draw."""
    data = affinity[(affinity["group_kind"] == kind) & (affinity["layer"] == 0)]
    methods = [(m, t) for m, t in firsts.items() if t in set(data["trial"])][:MAX_PANELS]
    if not methods:
        return False
    fig, axes = _panels(len(methods))
    for ax, (method, trial) in zip(axes, methods):
        matrix = data[data["trial"] == trial].pivot(index="expert", columns="group", values="share")
        image = ax.imshow(matrix.to_numpy(), aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"{method}\n({trial})", fontsize=8)
        ax.set_xlabel(kind)
        ax.set_ylabel("expert")
        ax.set_yticks(range(len(matrix.index)))
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"Routed share per expert and {kind} (rows sum to 1)")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_importance_over_epochs(epochs: pd.DataFrame, firsts: dict[str, str], path: Location) -> bool:
    share_columns = sorted(c for c in epochs.columns if c.startswith("moe0_expert") and c.endswith("_importance_share"))
    methods = [(m, t) for m, t in firsts.items() if t in set(epochs["trial"])][:MAX_PANELS]
    if not share_columns or not methods:
        return False
    fig, axes = _panels(len(methods))
    for ax, (method, trial) in zip(axes, methods):
        frame = epochs[epochs["trial"] == trial].sort_values("epoch")
        for column in share_columns:
            if frame[column].notna().any():
                ax.plot(frame["epoch"], frame[column], marker="o", label=column.split("_")[1])
        ax.set_title(f"{method}\n({trial})", fontsize=8)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("importance share")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.suptitle("Importance share per expert (MoE layer 0)")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_accuracy_vs_balance(trials: pd.DataFrame, path: Location) -> bool:
    """The Pareto plot: task metric (top-1, or COCO AP for detection) against layer 0's importance CV. Each
    trial a faint dot; each method its mean over seeds with one standard deviation as error bars; the
    methods on the Pareto front (:func:`~harness.analysis.pareto.pareto_front` of the means: no other method
    has a higher task metric and a lower CV) ringed and joined by a line. Single-expert trials are left
    out: with one expert the CV is 0 by definition, not a balance achieved."""
    finished = trials[trials["status"] == "ok"]
    if "config.moe.num_experts" in finished:
        finished = finished[finished["config.moe.num_experts"] != 1]
    task = main_metric(finished)
    if finished.empty or BALANCE_METRIC not in finished or task not in finished:
        return False
    labels = _method_labels(finished)
    per_method = finished[[task, BALANCE_METRIC]].assign(method=labels).groupby("method", sort=False)
    means, spread = per_method.mean(), per_method.std().fillna(0.0)
    front = pareto_front(means, task, BALANCE_METRIC)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    # Beyond ten methods tab10's colours repeat: a marker per block of ten keeps every method distinct.
    colours, markers = plt.get_cmap("tab10").colors, "osD^vP*X"
    for i, method in enumerate(means.index):
        rows, colour, marker = finished[labels == method], colours[i % 10], markers[(i // 10) % len(markers)]
        ax.scatter(rows[BALANCE_METRIC], rows[task], s=12, color=colour, marker=marker, alpha=0.3)
        ax.errorbar(
            means.loc[method, BALANCE_METRIC],
            means.loc[method, task],
            xerr=spread.loc[method, BALANCE_METRIC],
            yerr=spread.loc[method, task],
            fmt=marker,
            color=colour,
            markersize=7,
            capsize=3,
            label=method + (" (Pareto)" if front[method] else ""),
        )
    on_front = means[front].sort_values(BALANCE_METRIC)
    ax.plot(on_front[BALANCE_METRIC], on_front[task], color="black", linewidth=1, zorder=0)
    ax.scatter(on_front[BALANCE_METRIC], on_front[task], s=160, facecolors="none", edgecolors="black")
    ax.set_xlabel("importance CV (layer 0, validation; 0 = perfectly balanced)")
    ax.set_ylabel("validation top-1" if task == "val_top1" else "validation COCO AP")
    ax.set_title("mean +- std over seeds; ringed: the Pareto front", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)  # beside: covers no point
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_reference_runs(per_trial: pd.DataFrame, reference: pd.DataFrame, path: Location) -> bool:
    """Our seeds against the reference's released runs of the same configuration, one panel per compared
    metric (test error, I(E;Y), H_s, H_u): a row per configuration (method, and data set when the study
    has several), each run a point (the reference's above the row's line, ours below), each side's median
    a vertical bar. ``per_trial``: one row per finished trial with ``method``, ``reference_name`` and the
    metric columns (``paper.krishnamurthy_trials``)."""
    from .analysis.reference_runs import COMPARED, runs_of

    # a row per configuration (its reference file name names the data set too)
    rows = per_trial[["method", "reference_name"]].drop_duplicates()
    if rows.empty:
        return False
    several_data_sets = "data" in per_trial and per_trial["data"].nunique() > 1
    labels = [
        f"{method} [{name.split('_')[0]}]" if several_data_sets else method
        for method, name in zip(rows["method"], rows["reference_name"])
    ]
    fig, axes = plt.subplots(1, len(COMPARED), figsize=(4.2 * len(COMPARED), 0.55 * len(rows) + 1.6), sharey=True)
    sides = (("reference runs", 0.17, "tab:gray", "x"), ("our seeds", -0.17, "tab:blue", "o"))
    for ax, metric in zip(axes, COMPARED):
        for row, (method, name) in enumerate(zip(rows["method"], rows["reference_name"])):
            y = len(rows) - 1 - row  # the first configuration on top
            theirs = runs_of(reference, name)[metric]
            if len(theirs) and theirs.isna().all():
                continue  # as in the comparison: the reference's single expert has no routing figures
            ours = per_trial.loc[(per_trial["method"] == method) & (per_trial["reference_name"] == name), metric]
            samples = (theirs, ours)
            for (label, offset, colour, marker), values in zip(sides, samples):
                values = values.dropna().astype(float)
                if values.empty:
                    continue
                ax.scatter(
                    values,
                    np.full(len(values), y + offset),
                    s=14,
                    color=colour,
                    marker=marker,
                    alpha=0.7,
                    label=label if row == 0 else None,
                )
                median = values.median()
                ax.plot([median, median], [y + offset - 0.13, y + offset + 0.13], color=colour, linewidth=2)
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), list(reversed(labels)), fontsize=8)
    handles, sides_shown = axes[0].get_legend_handles_labels()
    fig.legend(handles, sides_shown, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("each run a point, each side's median a bar", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, path)
    return True


SIZE_METRICS = ("val_ap_small", "val_ap_medium", "val_ap_large")


def plot_ap_by_size(comparison: pd.DataFrame, path: Location) -> bool:
    """Detection: mean AP per COCO size bucket and method, with 95% confidence intervals over seeds (none
    below 3 seeds)."""
    data = comparison[comparison["metric"].isin(SIZE_METRICS)]
    if data.empty:
        return False
    groups = [c for c in data.columns if c.startswith("sweep.")]
    label = data[groups].astype(str).agg(", ".join, axis=1) if groups else pd.Series("all", index=data.index)
    methods = list(dict.fromkeys(label))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(methods):
        rows = data[label == method].set_index("metric").reindex(list(SIZE_METRICS))
        low = (rows["mean"] - rows["ci95_low"]).fillna(0).clip(lower=0)
        high = (rows["ci95_high"] - rows["mean"]).fillna(0).clip(lower=0)
        ax.bar(np.arange(3) + i * width, rows["mean"], width, yerr=[low, high], label=method, capsize=3)
    ax.set_xticks(np.arange(3) + width * (len(methods) - 1) / 2, ["small", "medium", "large"])
    ax.set_ylabel("COCO AP (mean over seeds, 95% CI from 3 seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def comparison_markdown(comparison: pd.DataFrame) -> str:
    """One row per method, one column per metric: ``mean ± std (n)``."""
    if comparison.empty:
        return "_No finished trials to compare._"
    groups = [c for c in comparison.columns if c.startswith("sweep.")]

    def cell(row: pd.Series) -> str:
        spread = "" if np.isnan(row["std"]) else f" ± {row['std']:.3g}"
        return f"{row['mean']:.3g}{spread} ({row['n']})"

    frame = comparison.assign(cell=comparison.apply(cell, axis=1))
    if groups:
        wide = frame.pivot_table(
            index=groups, columns="metric", values="cell", aggfunc="first", sort=False
        ).reset_index()
    else:
        wide = frame.pivot_table(columns="metric", values="cell", aggfunc="first")
    wide.columns = [str(c).removeprefix("sweep.") for c in wide.columns]
    metrics = [str(c) for c in frame["metric"].unique()]
    wide[metrics] = wide[metrics].fillna("-")  # a method without the metric (a single expert's routing)
    return _markdown_table(wide)


def _method_name(row: pd.Series, groups: list[str]) -> str:
    return ", ".join(f"{g.removeprefix('sweep.')}={row[g]}" for g in groups) or "the base config"


def _ci(row: pd.Series) -> str:
    """A comparison row's mean with its 95% CI; below MIN_SEEDS_FOR_CI seeds (no interval in the table)
    the seeds' range instead."""
    n = int(row["n"])
    if n >= MIN_SEEDS_FOR_CI and not pd.isna(row["ci95_low"]):
        return f"{row['mean']:.4g} (95% CI {row['ci95_low']:.4g} to {row['ci95_high']:.4g}, n={n})"
    if n == 2:  # two values a <= b: mean (a + b) / 2, sample sd (b - a) / sqrt(2), so a, b = mean -+ sd / sqrt(2)
        low, high = row["mean"] - row["std"] / math.sqrt(2), row["mean"] + row["std"] / math.sqrt(2)
        return f"{row['mean']:.4g} (n=2: too few seeds for an interval; range {low:.4g} to {high:.4g})"
    return f"{row['mean']:.4g} (n={n}: too few seeds for an interval)"


def findings(comparison: pd.DataFrame) -> str:
    """A short paragraph from the comparison table: the best method by the main metric (COCO AP for
    detection, else top-1 accuracy) with its confidence interval, whether its interval overlaps the
    runner-up's, the most balanced method (lowest importance CV of the first MoE layer), and the methods on
    the Pareto front of the two (:mod:`harness.analysis.pareto`)."""
    if comparison.empty:
        return "No trial finished, so there is nothing to compare."
    groups = [c for c in comparison.columns if c.startswith("sweep.")]
    main = main_metric(set(comparison["metric"]))
    ranked = comparison[comparison["metric"] == main].sort_values("mean", ascending=False)
    if ranked.empty:
        return f"No finished trial reported {main}."
    best = ranked.iloc[0]
    text = [f"Best by {main}: {_method_name(best, groups)}, {_ci(best)}."]
    if len(ranked) > 1:
        second = ranked.iloc[1]
        if pd.isna(best["ci95_low"]) or pd.isna(second["ci95_high"]):
            verdict = "; too few seeds to tell whether the data separate the two."
        elif best["ci95_low"] <= second["ci95_high"]:
            verdict = "; the intervals overlap, so the data do not separate the two."
        else:
            verdict = "."
        text.append(f"Runner-up: {_method_name(second, groups)}, {_ci(second)}{verdict}")
    balance = comparison[comparison["metric"] == BALANCE_METRIC].sort_values("mean")
    if not balance.empty:
        most = balance.iloc[0]
        text.append(f"Most balanced (lowest {BALANCE_METRIC}): {_method_name(most, groups)}, {_ci(most)}.")
        means = method_means(comparison, main)
        front = means[means["pareto"]].sort_values(main, ascending=False)
        if not front.empty:
            names = "; ".join(_method_name(row, groups) for _, row in front.iterrows())
            text.append(
                f"Pareto front (no other method has both a higher mean {main} and a lower mean {BALANCE_METRIC}): "
                f"{names}."
            )
    return " ".join(text)


def collapsed_section(trials: pd.DataFrame) -> list[str]:
    """The report's "Collapsed runs" lines: the rule, then each finished trial with a collapsed MoE layer
    (``moe<i>_collapsed``, :func:`~harness.analysis.aggregate.collapsed_flags`) and its method, or that
    none collapsed; nothing for a study without such a column (dense or single-expert models)."""
    flags = [c for c in trials.columns if re.fullmatch(r"moe\d+_collapsed", c)]
    if not flags:
        return []
    finished = trials[trials["status"] == "ok"]
    labels = _method_labels(finished)
    lines = [
        "## Collapsed runs",
        "",
        f"A layer has collapsed when one expert takes more than {COLLAPSE_SHARE:.0%} of its importance on the "
        "validation set, or at most one expert is alive (above 1% of it).",
        "",
    ]
    hits = [
        f"- `{row['trial']}` ({labels[i]}): " + ", ".join(f.removesuffix("_collapsed") for f in flags if row[f] == 1)
        for i, row in finished.iterrows()
        if any(row[f] == 1 for f in flags)
    ]
    return lines + (hits or ["None of the finished runs."]) + [""]


def write_report(
    folder: Location | pathlib.Path | str, tables: dict[str, pd.DataFrame] | None = None
) -> tuple[dict[str, pd.DataFrame], Location]:
    """Plots and ``report.md`` for the study in ``folder``, from ``tables`` or else the study's tables
    (:func:`~harness.analysis.aggregate.study_tables`: rebuilt where its trials' folders are there, else read
    as published). Returns the tables and the report's path."""
    folder = folder if isinstance(folder, Location) else Location(folder)
    tables = tables if tables is not None else study_tables(folder)
    trials = tables["trials"]
    plots = folder / "plots"
    firsts = _first_trial_per_method(trials)
    made: list[tuple[str, str]] = []
    for kind in ("superclass", "class", "object_size", "fpn_level"):
        groups = tables["affinity"].loc[tables["affinity"]["group_kind"] == kind, "group"]
        if groups.empty or groups.max() + 1 > MAX_GROUPS_SHOWN:
            continue
        if plot_affinity(tables["affinity"], firsts, kind, plots / f"affinity_{kind}.png"):
            made.append((f"Expert x {kind} affinity", f"plots/affinity_{kind}.png"))
    if plot_importance_over_epochs(tables["epochs"], firsts, plots / "importance_over_epochs.png"):
        made.append(("Importance share per expert over epochs", "plots/importance_over_epochs.png"))
    if plot_accuracy_vs_balance(trials, plots / "accuracy_vs_balance.png"):
        made.append(("Accuracy vs balance", "plots/accuracy_vs_balance.png"))
    if plot_ap_by_size(tables["comparison"], plots / "ap_by_size.png"):
        made.append(("COCO AP by object size", "plots/ap_by_size.png"))

    counts = trials["status"].value_counts().to_dict()
    lines = [
        f"# Study `{trials['study'].iloc[0]}`",
        "",
        f"{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".",
        "",
        "## What this study found",
        "",
        findings(tables["comparison"]),
        "",
        "## Comparison (mean ± std over seeds, (n) finished trials)",
        "",
        comparison_markdown(tables["comparison"]),
        "",
    ]
    lines += collapsed_section(trials)
    errors = trials[trials["status"] == "error"]
    if not errors.empty:
        lines += ["## Errored trials", "", *[f"- `{t}`: {e}" for t, e in zip(errors["trial"], errors["error"])], ""]
    for title, relative in made:
        lines += [f"## {title}", "", f"![{title}]({relative})", ""]
    report = folder / "report.md"
    report.write_text("\n".join(lines))
    return tables, report


def write_reference_comparison(
    folder: Location, tables: dict[str, pd.DataFrame], reference: pd.DataFrame, reference_runs: str | pathlib.Path
) -> tuple[str, Location]:
    """Our trials (the study's ``tables``) against the reference's per-run CSV ``reference_runs``, read as
    ``reference`` (:mod:`harness.analysis.reference_runs`): writes ``reference_runs.md`` and ``reference_runs.csv``
    into the study folder; returns the markdown and its path."""
    from .analysis.paper import krishnamurthy_trials
    from .analysis.reference_runs import (
        comparison_markdown,
        comparison_summary,
        paper_findings,
        paper_findings_markdown,
        reference_comparison,
    )

    per_trial = krishnamurthy_trials(tables["trials"], tables["epochs"]).dropna(subset=["reference_name"])
    if per_trial.empty:
        raise HarnessError(f"{folder}: no finished MNIST or FashionMNIST trial to hold against {reference_runs}")
    comparison = reference_comparison(per_trial, reference)
    runs_per_configuration = comparison.groupby("reference", sort=False)["ref_n"].max()
    unmatched = runs_per_configuration[runs_per_configuration == 0].index
    plotted = plot_reference_runs(per_trial, reference, folder / "plots" / "reference_runs.png")
    text = "\n".join(
        [
            f"# Study `{tables['trials']['study'].iloc[0]}` against the reference's runs "
            f"(`{pathlib.Path(reference_runs).name}`)",
            "",
            comparison_summary(comparison),
            "",
            comparison_markdown(comparison),
            "",
            "Per trial its last epoch; the reference's runs of the same configuration matched by file name. U: "
            "Mann-Whitney U of ours against theirs (pairs where ours is larger, ties 1/2); p: two-sided; p (Holm): "
            "adjusted for testing every row of this table at once. Errors are fractions, information in bits.",
            "",
            *([f"No reference runs named: {', '.join(f'`{n}`' for n in unmatched)}.", ""] if len(unmatched) else []),
            *(["![Our seeds against the reference's runs](plots/reference_runs.png)", ""] if plotted else []),
            "## The paper's findings, tested on our seeds and on the reference's runs alike",
            "",
            paper_findings_markdown(paper_findings(per_trial, reference)),
            "",
            "Each finding compares two methods on one metric: the medians before -> after and a two-sided "
            "Mann-Whitney p, computed the same way on our seeds and on the reference's runs of the same two "
            "configurations. holds: p < 0.05 and the second method's values tend the paper's way (its U above "
            "half the pairs); reversed: p < 0.05 the other way; not separated: p >= 0.05; for an unchanged test "
            "error, no difference found: p >= 0.05; too few runs: no outcome could reach p < 0.05 with so few "
            "runs. Holm: p adjusted for every row of this table on that side; the verdicts use the unadjusted p, "
            "one finding at a time.",
            "",
        ]
    )
    (folder / "reference_runs.csv").write_text(comparison.to_csv(index=False))
    path = folder / "reference_runs.md"
    path.write_text(text)
    return text, path


def write_paper_table(
    folder: Location | pathlib.Path | str, paper: str, tables: dict[str, pd.DataFrame] | None = None
) -> tuple[str, Location]:
    """The study's tables (unless given: :func:`~harness.analysis.aggregate.study_tables`), then
    ``paper_<paper>.md`` with the paper-style table; returns its text and path."""
    from .analysis.paper import CIFAR100_SUPERCLASSES, krishnamurthy_table, pavlitska_table

    folder = folder if isinstance(folder, Location) else Location(folder)
    tables = tables if tables is not None else study_tables(folder)
    if paper == "krishnamurthy":
        frame = krishnamurthy_table(tables["trials"], tables["epochs"])
        note = (
            "Per trial its last epoch (training error: running accuracy in train mode over that epoch); "
            "mean [95% CI] (n seeds), the interval clipped to the metric's range; below 3 seeds, too few "
            "for an interval, mean (min..max, n). Errors are fractions, information in bits."
        )
    else:
        # Real CIFAR-100 superclasses get their names; generated ones are numbered.
        real = tables["trials"].get("config.data.name", pd.Series(dtype=str)).eq("cifar100").any()
        frame = pavlitska_table(tables["trials"], tables["affinity"], CIFAR100_SUPERCLASSES if real else None)
        note = (
            "Mean [95% CI] (n seeds), the interval clipped to the metric's range; below 3 seeds, too few for "
            "an interval, mean (min..max, n). Top-3 superclasses by routed share, layer 0, first seed."
        )
    if frame.empty:
        raise HarnessError(f"{folder}: no finished trial with the metrics the {paper} table needs")
    text = "\n".join(
        [
            f"# {paper.capitalize()} et al. layout: study `{tables['trials']['study'].iloc[0]}`",
            "",
            _markdown_table(frame),
            "",
            note,
            "",
        ]
    )
    path = folder / f"paper_{paper}.md"
    path.write_text(text)
    return text, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description="Plots and report.md for a study.")
    parser.add_argument("folder", help="the study's results folder, e.g. results/quickstart")
    parser.add_argument(
        "--paper",
        choices=["krishnamurthy", "pavlitska"],
        help="print a table in that paper's layout (published values side by side) instead",
    )
    parser.add_argument(
        "--reference-runs",
        metavar="CSV",
        help="with --paper krishnamurthy: also hold the trials against the reference's per-run "
        "results (e.g. mnist_results.csv), written to reference_runs.md / .csv",
    )
    args = parser.parse_args(argv)
    if args.reference_runs and args.paper != "krishnamurthy":
        parser.error("--reference-runs needs --paper krishnamurthy")
    try:
        tables = None
        if args.reference_runs:
            from .analysis.reference_runs import read_reference_runs

            reference = read_reference_runs(args.reference_runs)  # a bad CSV stops before any table is rebuilt
            folder = Location(args.folder)
            tables = study_tables(folder)  # once, for both tables
            table, path = write_reference_comparison(folder, tables, reference, args.reference_runs)
            print(table)
            print(f"wrote {path}")
        if args.paper:
            table, path = write_paper_table(args.folder, args.paper, tables)
            print(table)
            print(f"wrote {path}")
            return 0
        _, report = write_report(args.folder)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report} and {report.parent / 'plots'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
