"""Report plots that need no Ray: the detection figures from hand-made comparison/affinity frames, the
Pareto plot's choice of trials, and the reference-runs plot."""

import matplotlib.image
import pandas as pd

from harness.report import (
    comparison_markdown,
    plot_accuracy_vs_balance,
    plot_affinity,
    plot_ap_by_size,
    plot_reference_runs,
)
from harness.storage import Location


def test_ap_by_size_and_size_affinity_plots(tmp_path):
    rows = []
    for method, base in (("importance_loss", 0.2), ("relative_importance", 0.1)):
        for i, metric in enumerate(("val_ap_small", "val_ap_medium", "val_ap_large")):
            mean = base + 0.1 * i
            rows.append(
                {
                    "sweep.method": method,
                    "metric": metric,
                    "n": 3,
                    "mean": mean,
                    "std": 0.01,
                    "ci95_low": mean - 0.02,
                    "ci95_high": mean + 0.02,
                }
            )
    rows.append(
        {
            "sweep.method": "importance_loss",
            "metric": "val_ap",
            "n": 3,
            "mean": 0.3,
            "std": 0.0,
            "ci95_low": 0.3,
            "ci95_high": 0.3,
        }
    )
    target = tmp_path / "ap_by_size.png"
    assert plot_ap_by_size(pd.DataFrame(rows), Location(target))
    assert matplotlib.image.imread(target).shape[0] > 100
    assert not plot_ap_by_size(pd.DataFrame(rows[-1:]), Location(tmp_path / "none.png"))  # no size metrics

    affinity = pd.DataFrame(
        [
            {
                "trial": "t0000",
                "layer": 0,
                "expert": e,
                "group_kind": "object_size",
                "group": g,
                "share": 1.0 if e == g else 0.0,
            }
            for e in range(3)
            for g in range(3)
        ]
    )
    assert plot_affinity(affinity, {"importance_loss": "t0000"}, "object_size", Location(tmp_path / "aff.png"))
    assert (tmp_path / "aff.png").read_bytes()[:4] == b"\x89PNG"


def _row(method, metric, mean, half, n=3):
    return {
        "sweep.method": method,
        "sweep.gate": "gap_fc",
        "metric": metric,
        "n": n,
        "mean": mean,
        "std": 0.01,
        "ci95_low": mean - half,
        "ci95_high": mean + half,
    }


def test_pareto_front_hand_worked():
    """A (0.9, CV 0.5) and B (0.8, 0.1) trade; C (0.7, 0.3) is beaten by B on both; D equals B; E has no CV."""
    from harness.analysis.pareto import pareto_front

    points = pd.DataFrame(
        {"acc": [0.9, 0.8, 0.7, 0.8, 0.95], "cv": [0.5, 0.1, 0.3, 0.1, float("nan")]}, index=list("ABCDE")
    )
    assert pareto_front(points, "acc", "cv").to_dict() == {"A": True, "B": True, "C": False, "D": True, "E": False}
    better_c = points.assign(acc=[0.9, 0.8, 0.85, 0.8, 0.95], cv=[0.5, 0.1, 0.05, 0.1, float("nan")])
    assert pareto_front(better_c, "acc", "cv").to_dict() == {"A": True, "B": False, "C": True, "D": False, "E": False}


def test_method_means_one_row_per_method_that_ran():
    """Two swept keys: only the combinations that ran (no made-up methods); no swept key: one row, with
    its standard deviations."""
    from harness.analysis.pareto import method_means

    rows = [
        _row("soft", "val_top1", 0.6, 0.01) | {"sweep.gate": "a"},
        _row("soft", "moe0_importance_cv", 0.3, 0.05) | {"sweep.gate": "a"},
        _row("hard", "val_top1", 0.5, 0.01) | {"sweep.gate": "b"},
        _row("hard", "moe0_importance_cv", 0.1, 0.02) | {"sweep.gate": "b"},
    ]
    two = method_means(pd.DataFrame(rows), "val_top1")
    assert two[["sweep.method", "sweep.gate"]].values.tolist() == [["soft", "a"], ["hard", "b"]]
    assert two["pareto"].tolist() == [True, True]
    one = method_means(pd.DataFrame(rows[:2]).drop(columns=["sweep.method", "sweep.gate"]), "val_top1")
    assert len(one) == 1 and one.loc[0, "moe0_importance_cv_std"] == 0.01 and bool(one.loc[0, "pareto"])


def test_findings_name_the_best_method_with_its_interval_and_the_most_balanced():
    from harness.report import findings

    comparison = pd.DataFrame(
        [
            _row("soft", "val_top1", 0.60, 0.01),
            _row("hard", "val_top1", 0.50, 0.01),
            _row("none", "val_top1", 0.55, 0.10),
            _row("soft", "moe0_importance_cv", 0.30, 0.05),
            _row("hard", "moe0_importance_cv", 0.05, 0.01),
        ]
    )
    text = findings(comparison)
    assert text.startswith("Best by val_top1: method=soft, gate=gap_fc, 0.6 (95% CI 0.59 to 0.61, n=3).")
    assert "Runner-up: method=none, gate=gap_fc, 0.55 (95% CI 0.45 to 0.65, n=3); the intervals overlap" in text
    assert (
        "Most balanced (lowest moe0_importance_cv): method=hard, gate=gap_fc, 0.05 (95% CI 0.04 to 0.06, n=3)." in text
    )
    # soft (0.60, CV 0.30) and hard (0.50, CV 0.05) trade accuracy for balance; none has no CV, so no place
    assert text.endswith(
        "Pareto front (no other method has both a higher mean val_top1 and a lower mean moe0_importance_cv): "
        "method=soft, gate=gap_fc; method=hard, gate=gap_fc."
    )
    apart = findings(comparison[comparison["sweep.method"] != "none"])
    assert "Runner-up: method=hard, gate=gap_fc, 0.5 (95% CI 0.49 to 0.51, n=3)." in apart and "overlap" not in apart
    detection = findings(
        pd.DataFrame([_row("soft", "val_ap", 0.3, 0.02, n=1) | {"ci95_low": float("nan"), "ci95_high": float("nan")}])
    )
    assert detection == "Best by val_ap: method=soft, gate=gap_fc, 0.3 (n=1: too few seeds for an interval)."
    assert findings(comparison.iloc[0:0]) == "No trial finished, so there is nothing to compare."


def test_collapsed_flag_rule_on_known_cases():
    """One expert above 90% of the importance, or at most one alive: collapsed; a single expert: no flag."""
    from harness.analysis.aggregate import collapsed_flags
    from harness.report import collapsed_section

    def layer(shares, living, i=0):
        return {
            f"moe{i}_living_experts": living,
            **{f"moe{i}_expert{j}_importance_share": s for j, s in enumerate(shares)},
        }

    assert collapsed_flags(layer([0.5, 0.5], 2)) == {"moe0_collapsed": 0.0}
    assert collapsed_flags(layer([0.95, 0.05], 2)) == {"moe0_collapsed": 1.0}
    # 20 experts, one with 85%: not above 90%, but the other 19 share 15% (0.8% each, below 1%): one alive
    assert collapsed_flags(layer([0.85] + [0.15 / 19] * 19, 1)) == {"moe0_collapsed": 1.0}
    assert collapsed_flags(layer([1.0], 1)) == {}
    assert collapsed_flags({**layer([0.5, 0.5], 2), **layer([0.91, 0.09], 2, i=1)}) == {
        "moe0_collapsed": 0.0,
        "moe1_collapsed": 1.0,
    }
    trials = pd.DataFrame(
        {"trial": ["t0", "t1"], "status": ["ok", "ok"], "sweep.method": ["a", "b"], "moe0_collapsed": [0.0, 1.0]}
    )
    section = "\n".join(collapsed_section(trials))
    assert "- `t1` (b): moe0" in section and "`t0`" not in section
    assert "None of the finished runs." in "\n".join(collapsed_section(trials.assign(moe0_collapsed=0.0)))


def test_balance_plot_leaves_out_single_experts(tmp_path):
    """One expert's importance CV is 0 by definition: a study of single experts has no balance to plot."""
    trials = pd.DataFrame(
        {
            "status": ["ok", "ok"],
            "sweep.row": ["single", "mixture"],
            "config.moe.num_experts": [1, 4],
            "val_top1": [0.8, 0.9],
            "moe0_importance_cv": [0.0, 0.4],
        }
    )
    assert not plot_accuracy_vs_balance(trials.iloc[:1], Location(str(tmp_path / "single.png")))
    assert not (tmp_path / "single.png").exists()
    assert plot_accuracy_vs_balance(trials, Location(str(tmp_path / "both.png")))
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_runs_plot(tmp_path):
    name = "fmnist_without_reg_10_5_models.pt"
    reference = pd.DataFrame(
        {
            "filename": [name, name],
            "test error": [0.1, 0.11],
            "I(E;Y)": [2.0, 2.1],
            "H_s": [0.1, 0.2],
            "H_u": [2.1, 2.2],
        }
    )
    per_trial = pd.DataFrame(
        {
            "method": ["classic gate"] * 3,
            "reference_name": [name] * 3,
            "test error": [0.1, 0.12, 0.11],
            "I(E;Y)": [1.9, 2.0, 2.2],
            "H_s": [0.1, 0.1, 0.1],
            "H_u": [2.0, 2.1, 2.3],
        }
    )
    path = tmp_path / "reference_runs.png"
    assert plot_reference_runs(per_trial, reference, Location(str(path)))
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100  # four panels side by side
    assert not plot_reference_runs(per_trial.iloc[:0], reference, Location(str(tmp_path / "none.png")))


def test_comparison_markdown_marks_a_metric_a_method_lacks():
    rows = [("single", "val_top1", 0.8), ("mixture", "val_top1", 0.9), ("mixture", "moe0_importance_cv", 0.3)]
    comparison = pd.DataFrame(
        [
            {"sweep.row": m, "metric": k, "n": 2, "mean": v, "std": 0.01, "ci95_low": None, "ci95_high": None}
            for m, k, v in rows
        ]
    )
    lines = comparison_markdown(comparison).splitlines()
    assert lines[0] == "| row | val_top1 | moe0_importance_cv |"
    assert lines[2] == "| single | 0.8 ± 0.01 (2) | - |"
    assert lines[3] == "| mixture | 0.9 ± 0.01 (2) | 0.3 ± 0.01 (2) |"
