"""Our trials against Krishnamurthy et al.'s released per-run CSVs (harness/reference_runs.py): the file
names a configuration maps to, the CSV's quirks, and the comparison's numbers against hand computations."""

from __future__ import annotations

import math
import pathlib

import pandas as pd
import pytest

from harness.analysis.reference_runs import (
    compare_samples,
    comparison_summary,
    holm,
    paper_findings,
    read_reference_runs,
    reference_comparison,
    reference_name,
    runs_of,
    trial_reference_name,
)
from harness.errors import HarnessError

RUNS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "krishnamurthy-runs"

# A fixture in the reference's format (FashionMNIST's header: "val error", "experts usage").
FIXTURE = """filename,train error,val error,mutual information,sample entropy,experts usage
fmnist_single_model_0,0.13,0.14,,,
fmnist_single_model_1,0.12,0.16,,,
fmnist_with_reg_importance_0.2_10_5_models.pt,0.03,0.04,2.3,0.10,2.32
fmnist_with_reg_importance_0.2_10_5_models.pt,0.03,0.05,2.2,0.20,2.31
fmnist_with_reg_importance_0.2_10_5_models.pt,0.03,0.06,2.1,0.30,2.30
fmnist_with_reg_importance_0.2_10_5_models.pt,0.03,0.07,2.0,0.40,2.29
fmnist_with_reg_importance_0.4_10_5_models.pt,0.03,0.99,0.0,0.00,0.00
"""


@pytest.fixture
def fixture_csv(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "fmnist_results.csv"
    path.write_text(FIXTURE)
    return path


def test_file_names_of_the_studies_rows() -> None:
    # Each row of search_spaces/mnist.yaml and fashion_mnist.yaml, written out as the reference names it.
    assert reference_name("mnist", 1, False, 0, 0, 0) == "mnist_single_model_hidden_32"
    assert reference_name("mnist", 5, False, 0, 0, 0) == "mnist_without_reg_hidden_32_10_5_models.pt"
    assert reference_name("mnist", 5, False, 0.2, 0, 0) == "mnist_with_reg_hidden_32_importance_0.2_10_5_models.pt"
    assert (
        reference_name("mnist", 5, False, 0, 1e-6, 1e-6)
        == "mnist_with_reg_hidden_32_sample_sim_same_1e-06_sample_sim_diff_1e-06_10_5_models.pt"
    )
    assert reference_name("mnist", 5, True, 0, 0, 0) == "mnist_with_attention_hidden_32_10_5_models.pt"
    assert reference_name("mnist", 5, True, 0.2, 0, 0) == "mnist_with_attn_reg_hidden_32_importance_0.2_10_5_models.pt"
    assert (
        reference_name("mnist", 5, True, 0, 1e-6, 1e-2)
        == "mnist_with_attn_sample_sim_reg_hidden_32_sample_sim_same_1e-06_sample_sim_diff_0.01_10_5_models.pt"
    )
    assert reference_name("fashion_mnist", 1, False, 0, 0, 0) == "fmnist_single_model"
    assert reference_name("fashion_mnist", 5, True, 0.8, 0, 0) == "fmnist_with_attn_reg_importance_0.8_10_5_models.pt"
    assert (
        reference_name("fashion_mnist", 5, True, 0, 1e-6, 1e-6)
        == "fmnist_with_attn_reg_sample_sim_same_1e-06_sample_sim_diff_1e-06_10_5_models.pt"
    )
    with pytest.raises(HarnessError, match="not 'cifar100'"):
        reference_name("cifar100", 20, False, 0, 0, 0)


@pytest.mark.skipif(not RUNS.is_dir(), reason="needs ../shared/data/krishnamurthy-runs (the reference's CSVs)")
@pytest.mark.parametrize("study, csv", [("mnist", "mnist_results.csv"), ("fashion_mnist", "fmnist_results.csv")])
def test_every_row_of_the_studies_finds_its_ten_reference_runs(study: str, csv: str) -> None:
    from harness.config.study import flatten, read_yaml
    from harness.tuning.search import expand_trials, parse_sweep

    raw = read_yaml(pathlib.Path(__file__).resolve().parents[1] / "search_spaces" / f"{study}.yaml")
    reference = read_reference_runs(RUNS / csv)
    trials = expand_trials(raw["base"], parse_sweep(raw["sweep"]))
    names = {trial_reference_name(flatten(t.config.model_dump(), "config.")) for t in trials}
    assert len(names) == 7
    for name in names:
        assert len(runs_of(reference, name)) == 10, name


def test_reading_renames_the_reference_columns(fixture_csv: pathlib.Path) -> None:
    frame = read_reference_runs(fixture_csv)
    assert {"test error", "I(E;Y)", "H_s", "H_u"} <= set(frame.columns)
    assert len(runs_of(frame, "fmnist_single_model")) == 2
    assert len(runs_of(frame, "fmnist_with_reg_importance_0.2_10_5_models.pt")) == 4


def test_a_file_that_is_not_a_results_csv_is_one_line_naming_it(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "final.csv"
    bad.write_text("filename,accuracy\nx,1\n")
    with pytest.raises(HarnessError, match=r"final\.csv: no column test error, I\(E;Y\), H_s, H_u"):
        read_reference_runs(bad)
    with pytest.raises(HarnessError, match="missing.csv: no such file"):
        read_reference_runs(tmp_path / "missing.csv")


def test_sample_comparison_against_hand_computed_values() -> None:
    # Ours all below theirs: U = 0; exact two-sided p = 2 / C(7, 3) = 2/35.
    row = compare_samples(pd.Series([0.03, 0.01, 0.02]), pd.Series([0.04, 0.07, 0.05, 0.06]))
    assert row["ours_median"] == 0.02 and row["ref_median"] == pytest.approx(0.055, abs=1e-15)
    assert (row["ref_min"], row["ref_max"], row["ref_n"], row["ours_n"]) == (0.04, 0.07, 4, 3)
    assert row["U"] == 0.0
    assert row["p"] == pytest.approx(2 / 35, rel=1e-12)
    assert row["inside_range"] == 0.0
    # Ties count 1/2: pairs (ours > theirs) of [1, 2, 3] vs [2, 4]: 3>2 once, 2=2 half: U = 1.5.
    tied = compare_samples(pd.Series([1.0, 2.0, 3.0]), pd.Series([2.0, 4.0]))
    assert tied["U"] == 1.5 and tied["inside_range"] == 1.0
    empty = compare_samples(pd.Series([math.nan]), pd.Series([1.0]))
    assert empty["ours_n"] == 0 and math.isnan(empty["p"])


def test_comparison_per_method_and_metric(fixture_csv: pathlib.Path) -> None:
    reference = read_reference_runs(fixture_csv)
    name = "fmnist_with_reg_importance_0.2_10_5_models.pt"
    per_trial = pd.DataFrame(
        {
            "method": ["classic + importance (0.2)"] * 2 + ["single expert"],
            "reference_name": [name, name, "fmnist_single_model"],
            "test error": [0.055, 0.065, 0.15],
            "I(E;Y)": [2.25, 2.35, math.nan],
            "H_s": [0.5, 0.6, math.nan],
            "H_u": [2.30, 2.30, math.nan],
        }
    )
    table = reference_comparison(per_trial, reference).set_index(["method", "metric"])
    error = table.loc[("classic + importance (0.2)", "test error")]
    # The 0.4 run (test error 0.99) is another configuration and must not be counted.
    assert (error["ref_n"], error["ref_median"], error["ref_max"]) == (4, pytest.approx(0.055), 0.07)
    assert error["ours_median"] == pytest.approx(0.06)
    # Pairs ours > theirs: 0.055 beats 0.04, 0.05 (2); 0.065 beats 0.04, 0.05, 0.06 (3): U = 5.
    assert error["U"] == 5.0
    h_s = table.loc[("classic + importance (0.2)", "H_s")]
    assert h_s["U"] == 8.0 and h_s["inside_range"] == 0.0  # ours above every reference run
    assert h_s["p"] == pytest.approx(2 / 15, rel=1e-12)  # exact: 2 of C(6, 2) = 15 orderings this extreme
    # The single expert: only its test error (no routing figures on either side).
    assert list(table.loc["single expert"].index) == ["test error"]


def test_a_study_with_no_finished_trial_is_one_line(tmp_path: pathlib.Path, fixture_csv: pathlib.Path) -> None:
    from harness.report import write_reference_comparison
    from harness.storage import Location

    # an interim study whose trials are all still running: no epochs recorded yet
    trials = pd.DataFrame({"trial": ["t0000"], "study": ["s"], "status": ["incomplete"]})
    epochs = pd.DataFrame(columns=["trial", "epoch"])
    with pytest.raises(HarnessError, match="no finished MNIST or FashionMNIST trial to hold against"):
        write_reference_comparison(
            Location(str(tmp_path)), {"trials": trials, "epochs": epochs}, read_reference_runs(fixture_csv), fixture_csv
        )


def test_holm_adjustment_by_hand() -> None:
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to the running maximum 0.06
    adjusted = holm(pd.Series([0.01, 0.04, math.nan, 0.03]))
    assert adjusted[[0, 1, 3]].tolist() == pytest.approx([0.03, 0.06, 0.06], abs=1e-15)
    assert math.isnan(adjusted[2])
    assert holm(pd.Series([0.6, 0.9])).tolist() == [1.0, 1.0]  # capped at 1 (uncapped: 1.2, 1.2)


def test_comparison_summary_counts() -> None:
    comparison = pd.DataFrame({"p": [0.001, 0.03, 0.5, math.nan], "inside_range": [1.0, 0.0, 1.0, math.nan]}).assign(
        p_holm=lambda f: holm(f["p"])
    )  # Holm: 0.003, 0.06, 0.5
    assert comparison_summary(comparison) == (
        "Medians inside the reference's range: 2 of 3. Tests finding a difference at p < 0.05: 2 of 3; "
        "after Holm's correction for 3 tests: 1."
    )


def test_findings_on_our_seeds_and_the_reference_runs_by_hand() -> None:
    """The paper's findings computed the same way on both sides, against exact Mann-Whitney p-values:
    4 vs 4 fully separated: 2 / C(8, 4) = 2/70; 3 vs 4: 2 / C(7, 3) = 2/35, the smallest p 3 vs 4 can
    give, so too few runs for p < 0.05."""
    classic = "fmnist_without_reg_10_5_models.pt"
    importance = "fmnist_with_reg_importance_0.2_10_5_models.pt"
    attentive = "fmnist_with_attention_10_5_models.pt"
    reference = pd.DataFrame(
        {
            "filename": [f"fmnist_single_model_{i}" for i in range(3)] + [classic] * 4 + [importance] * 4,
            "test error": [0.20, 0.21, 0.22] + [0.10, 0.11, 0.12, 0.13] + [0.10] * 4,
            "I(E;Y)": [math.nan] * 3 + [1.0, 1.1, 1.2, 1.3] + [1.0, 1.1, 1.2, 1.3],
            "H_s": [math.nan] * 11,
            "H_u": [math.nan] * 3 + [1.5, 1.6, 1.7, 1.8] + [1.9, 2.0, 2.1, 2.2],
        }
    )
    four = range(4)
    per_trial = pd.DataFrame(
        [
            {"method": "single expert", "reference_name": "fmnist_single_model", "test error": 0.2 + i / 100}
            for i in four
        ]
        + [
            {"method": "classic gate", "reference_name": classic, "test error": 0.1 + i / 100, "I(E;Y)": 1.0 + i / 10}
            | {"H_u": 1.5 + i / 10}
            for i in four
        ]
        + [
            {"method": "classic + importance (0.2)", "reference_name": importance, "test error": 0.1, "I(E;Y)": 2.0}
            | {"H_u": 1.0 + i / 10}
            for i in four
        ]
        # the attentive gate: a test error like the classic gate's (one run swapped in order), no reference runs
        + [{"method": "attentive gate", "reference_name": attentive, "test error": e} for e in (0.1, 0.12, 0.11, 0.13)]
    ).assign(H_s=math.nan)  # krishnamurthy_trials' columns, all of them
    table = paper_findings(per_trial, reference).set_index(["finding", "from", "to"])
    mixture = table.loc[("a mixture beats the single expert", "single expert", "classic gate")]
    assert mixture["ours_p"] == pytest.approx(2 / 70, rel=1e-12) and mixture["ours_verdict"] == "holds"
    assert (mixture["ours_from"], mixture["ours_to"]) == (pytest.approx(0.215), pytest.approx(0.115))
    assert mixture["ref_p"] == pytest.approx(2 / 35, rel=1e-12)  # 3 vs 4 separated: 2 / C(7, 3)
    assert mixture["ref_verdict"] == "too few runs"  # 2/35 > 0.05 is the smallest p 3 vs 4 can give
    # ours: importance lowers H_u (reversed, p = 2/70); the reference's runs: it raises it (holds)
    usage = table.loc[("importance raises H_u", "classic gate", "classic + importance (0.2)")]
    assert usage["ours_verdict"] == "reversed" and usage["ours_p"] == pytest.approx(2 / 70, rel=1e-12)
    assert usage["ref_verdict"] == "holds" and usage["ref_to"] == pytest.approx(2.05)
    # equal samples: U at its null mean, p = 1; the reference has no attentive runs
    same = table.loc[("the attentive gate leaves the test error unchanged", "classic gate", "attentive gate")]
    assert same["ours_p"] == pytest.approx(1.0) and same["ours_verdict"] == "no difference found"
    assert same["ref_verdict"] == "no runs" and math.isnan(same["ref_p"])
    # Holm over our side's 4 tested rows, p sorted: I(E;Y)'s (ties: normal approximation, 0.021), the two
    # 2/70 rows, 1. The 2/70 rows: max(4 x 0.021, 3 x 2/70) and max(that, 2 x 2/70): both 3 x 2/70.
    assert table["ours_p_holm"].notna().sum() == 4
    assert mixture["ours_p_holm"] == usage["ours_p_holm"] == pytest.approx(3 * 2 / 70, rel=1e-12)
    # only the findings whose two methods ran
    assert sorted(set(table.index.get_level_values(0))) == [
        "a mixture beats the single expert",
        "importance raises H_u",
        "importance raises I(E;Y)",
        "the attentive gate leaves the test error unchanged",
        "the attentive gate lowers H_s",
        "the attentive gate raises I(E;Y)",
    ]


def test_too_few_runs_to_reach_the_level() -> None:
    from harness.analysis.reference_runs import _verdict

    # 3 vs 3 fully separated: p = 1/10, the smallest 3 vs 3 can give: no verdict either way
    p, verdict = _verdict(pd.Series([1.0, 2.0, 3.0]), pd.Series([4.0, 5.0, 6.0]), "higher", 0.05)
    assert p == pytest.approx(0.1) and verdict == "too few runs"
    assert _verdict(pd.Series([1.0, 2.0, 3.0]), pd.Series([1.0, 2.0, 3.0]), "same", 0.05)[1] == "too few runs"
    # 4 vs 4 can: 2/70
    assert _verdict(pd.Series([1.0, 2, 3, 4]), pd.Series([5.0, 6, 7, 8]), "higher", 0.05)[1] == "holds"
    assert _verdict(pd.Series([1.0, 2, 3, 4]), pd.Series([5.0, 6, 7, 8]), "lower", 0.05)[1] == "reversed"
