"""95% confidence intervals over seeds (no Ray): the t table against scipy, intervals against hand
computations with literal numbers, clipping to a metric's range, and no interval below 3 seeds, in the
comparison table and in what the report and the sweep print (``findings``)."""

import math

import pandas as pd
import pytest
from scipy import stats

from harness.analysis.aggregate import _T95, MIN_SEEDS_FOR_CI, ci95, comparison_table, metric_range, t95
from harness.report import findings


def test_the_t_table_holds_scipys_quantiles_to_three_decimals():
    for dof in range(1, len(_T95) + 1):
        assert t95(dof) == round(float(stats.t.ppf(0.975, dof)), 3), dof
    assert len(_T95) == 30 and t95(31) == 1.96
    with pytest.raises(ValueError, match="t95: degrees of freedom must be >= 1, got 0"):
        t95(0)


def test_metric_ranges():
    for name in (
        "val_top1",
        "val_top5",
        "val_top1_k3",
        "val_ap",
        "val_ap50",
        "val_ap_small",
        "val_ap_large",
        "val_ap50_k2",
        "moe0_dropped_fraction",
        "moe1_expert3_load_share",
        "train error",
        "test error",
    ):
        assert metric_range(name) == (0.0, 1.0), name
    assert metric_range("moe0_living_experts", num_experts=4) == (0.0, 4.0)
    for name in ("moe0_living_experts", "moe0_importance_cv", "moe2_usage_entropy_bits", "images_per_s"):
        assert metric_range(name) == (0.0, math.inf), name
    for name in ("train_loss", "val_loss", "epoch_s"):
        assert metric_range(name) is None, name


# By hand: t(0.975, 2) = 4.303, sqrt(3) = 1.7320508.
def test_an_accuracy_interval_is_clipped_at_one():
    """[0.98, 0.99, 1.0]: mean 0.99, sd 0.01, half width 4.303 * 0.01 / sqrt(3) = 0.0248434: 0.9651566 to
    1.0148434, clipped to 1."""
    assert ci95([0.98, 0.99, 1.0], metric_range("val_top1")) == pytest.approx((0.9651566, 1.0), abs=1e-7)
    assert ci95([0.98, 0.99, 1.0]) == pytest.approx((0.9651566, 1.0148434), abs=1e-7)  # no range: unclipped


def test_an_unbounded_metric_is_not_clipped():
    """A loss [0.1, 0.5, 0.9]: mean 0.5, sd 0.4, half width 4.303 * 0.4 / sqrt(3) = 0.9937352: its interval
    crosses 0 and 1 (a mean inside both, so any clipping would show)."""
    assert ci95([0.1, 0.5, 0.9], metric_range("train_loss")) == pytest.approx((-0.4937352, 1.4937352), abs=1e-7)


def test_non_negative_and_count_metrics_are_clipped_to_their_range():
    # importance CV [0, 0.1, 0.5]: mean 0.2, sd sqrt(0.07) = 0.2645751, half 4.303 * 0.2645751 / sqrt(3) = 0.6572941
    assert ci95([0.0, 0.1, 0.5], metric_range("moe0_importance_cv")) == pytest.approx((0.0, 0.8572941), abs=1e-7)
    # living experts [3, 4, 4] of E = 4: mean 3.6666667, sd sqrt(1/3), half 4.303 / 3 = 1.4343333
    living = [3, 4, 4]
    assert ci95(living, metric_range("moe0_living_experts", 4)) == pytest.approx((2.2323333, 4.0), abs=1e-7)
    assert ci95(living, metric_range("moe0_living_experts")) == pytest.approx((2.2323333, 5.101), abs=1e-7)


def test_fewer_than_three_seeds_give_no_interval_and_a_sentinel_is_not_clipped():
    assert MIN_SEEDS_FOR_CI == 3
    for values in ([0.5, 0.7], [0.5], [], [0.5, None, float("nan")]):
        low, high = ci95(values, (0.0, 1.0))
        assert math.isnan(low) and math.isnan(high), values
    # COCO's AP is -1 where the validation set has no object of a size: a sentinel, left as it is
    assert ci95([-1.0, -1.0, -1.0], metric_range("val_ap_small")) == (-1.0, -1.0)


def _trials() -> pd.DataFrame:
    rows = [("wide", seed, top1, living) for seed, top1, living in ((0, 0.98, 3), (1, 0.99, 4), (2, 1.0, 4))]
    rows += [("pair", seed, top1, 4) for seed, top1 in ((0, 0.5), (1, 0.7))]
    frame = pd.DataFrame(rows, columns=["sweep.method", "sweep.seed", "val_top1", "moe0_living_experts"])
    frame = frame.assign(status="ok", **{"config.moe.num_experts": 4})
    errored = {"sweep.method": "broken", "sweep.seed": 0, "status": "error", "config.moe.num_experts": 4}
    return pd.concat([frame, pd.DataFrame([errored])], ignore_index=True)


def test_the_comparison_table_holds_clipped_intervals_and_none_below_three_seeds():
    table = comparison_table("s", _trials())
    assert list(table.columns) == [
        "schema_version",
        "study",
        "sweep.method",
        "metric",
        "n",
        "mean",
        "std",
        "ci95_low",
        "ci95_high",
    ]
    rows = {(r["sweep.method"], r["metric"]): r for _, r in table.iterrows()}
    assert set(rows) == {(m, k) for m in ("wide", "pair") for k in ("val_top1", "moe0_living_experts")}
    wide = rows["wide", "val_top1"]
    assert (wide["n"], wide["mean"], wide["std"]) == (3, pytest.approx(0.99), pytest.approx(0.01))
    assert (wide["ci95_low"], wide["ci95_high"]) == pytest.approx((0.9651566, 1.0), abs=1e-7)
    living = rows["wide", "moe0_living_experts"]  # bounded by the trials' E = 4
    assert (living["ci95_low"], living["ci95_high"]) == pytest.approx((2.2323333, 4.0), abs=1e-7)
    pair = rows["pair", "val_top1"]  # sd of [0.5, 0.7]: 0.2 / sqrt(2) = 0.1414214
    assert (pair["n"], pair["mean"], pair["std"]) == (2, pytest.approx(0.6), pytest.approx(0.1414214, abs=1e-7))
    assert math.isnan(pair["ci95_low"]) and math.isnan(pair["ci95_high"])


def test_findings_show_the_clipped_interval_and_below_three_seeds_the_range():
    text = findings(comparison_table("s", _trials()))
    assert text == (
        "Best by val_top1: method=wide, 0.99 (95% CI 0.9652 to 1, n=3). "
        "Runner-up: method=pair, 0.6 (n=2: too few seeds for an interval; range 0.5 to 0.7); "
        "too few seeds to tell whether the data separate the two."
    )


def test_a_trial_resumed_to_its_last_epoch_is_ok_despite_an_earlier_attempts_error(tmp_path):
    """``--resume`` finishes a trial whose first attempt died (its ``error.txt`` stays): ok, without the old
    error; one that stopped short with an error: error; one that stopped short without: incomplete."""
    from harness.analysis.aggregate import _trial_status
    from harness.storage import Location

    trial = Location(str(tmp_path))
    done, short = [{"epoch": 1.0}, {"epoch": 2.0}], [{"epoch": 1.0}]
    assert _trial_status(trial, short, 2) == "incomplete"
    (tmp_path / "error.txt").write_text("RayActorError: The actor is unavailable")
    assert _trial_status(trial, done, 2) == "ok" and _trial_status(trial, short, 2) == "error"
