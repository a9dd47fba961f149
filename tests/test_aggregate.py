"""Tables and report of a real small study (one tiny sweep on the shared Ray cluster)."""

import pathlib
import re

import matplotlib.image
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from harness.analysis.aggregate import SCHEMA_VERSION, TABLES, aggregate, study_tables
from harness.analysis.aggregate import main as aggregate_main
from harness.report import write_report
from harness.sweep import main as sweep_main

pytestmark = pytest.mark.ray
NUM_EXPERTS = 3


@pytest.fixture(scope="module")
def study(ray_cluster, tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("study")
    spec = {
        "name": "tables",
        "base": {
            "data": {
                "name": "synthetic_cifar",
                "root": str(root / "cache"),
                "batch_size": 16,
                "synthetic": {"train_per_class": 1, "test_per_class": 1},
            },
            "model": {"name": "small_cnn_moe"},
            "moe": {"num_experts": NUM_EXPERTS, "k": 2},
            "optim": {"name": "sgd", "lr": 0.01},
            "train": {"epochs": 2, "max_steps_per_epoch": 2, "check_every": 1},
        },
        "sweep": {
            "method": {
                "grid": [
                    {"name": "soft", "moe.losses.importance": 0.5},
                    {"name": "hard", "moe.constraint": {"type": "mean_importance", "threshold": 0.3}},
                    {"name": "broken", "optim.lr": 1.0e30},  # fails with a non-finite loss before any report
                ]
            },
            "seed": {"grid": [0, 1]},
        },
    }
    path = root / "tables.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert sweep_main([str(path), "--results-dir", str(root / "results")]) == 0
    return root / "results" / "tables"


def test_every_table_is_written_with_its_schema(study):
    tables = {name: pd.read_parquet(study / f"{name}.parquet") for name in TABLES}
    for name, frame in tables.items():
        assert (frame["schema_version"] == SCHEMA_VERSION).all(), name
    trials = tables["trials"]
    assert len(trials) == 6
    assert trials["sweep.method"].tolist() == ["soft", "soft", "hard", "hard", "broken", "broken"]
    assert trials["status"].tolist() == ["ok"] * 4 + ["error"] * 2
    # errored trials that never reported still have their row, with the reason
    broken = trials[trials["status"] == "error"]
    assert (broken["epochs"] == 0).all() and broken["error"].str.contains("non-finite loss").all()
    assert {"config.moe.num_experts", "val_top1", "moe0_importance_cv", "wall_time_s"} <= set(trials.columns)
    ok = trials[trials["status"] == "ok"]
    assert (ok["gpu_hours"] == 0).all()  # CPU only
    assert (ok["best_val_top1"] >= ok["val_top1"]).all() and ok["best_val_top1_epoch"].isin([1.0, 2.0]).all()

    epochs = tables["epochs"]
    assert len(epochs) == 4 * 2 and not epochs.duplicated(["trial", "epoch"]).any()

    experts = tables["experts"]
    assert len(experts) == 4 * NUM_EXPERTS
    assert set(experts.columns) >= {
        "trial",
        "layer",
        "expert",
        "importance_share",
        "load_share",
        "alive",
        "rank",
        "node_id",
    }
    shares = experts.groupby("trial")["importance_share"].sum()
    assert shares.round(6).eq(1.0).all() and (experts["rank"] == 0).all()

    affinity = tables["affinity"]
    # small_cnn_moe's experts are whole models: the class each predicts is a third labelling
    assert set(affinity["group_kind"]) == {"class", "superclass", "expert_prediction"}
    assert len(affinity) == 4 * NUM_EXPERTS * (100 + 20 + 100)
    row_sums = affinity.groupby(["trial", "expert", "group_kind"])["share"].sum()
    assert ((row_sums - 1).abs() < 1e-4).sum() >= 1 and ((row_sums.round(4) == 1) | (row_sums == 0)).all()

    comparison = tables["comparison"]
    assert set(comparison["sweep.method"]) == {"soft", "hard"}  # no finished trial: no row for "broken"
    top1 = comparison[(comparison["metric"] == "val_top1") & (comparison["sweep.method"] == "soft")].iloc[0]
    values = trials.loc[trials["sweep.method"] == "soft", "val_top1"]
    assert (
        top1["n"] == 2 and top1["mean"] == pytest.approx(values.mean()) and top1["std"] == pytest.approx(values.std())
    )
    # two seeds: too few for an interval (docs/results.md); the columns stay, null (intervals: test_intervals.py)
    assert pd.isna(top1["ci95_low"]) and pd.isna(top1["ci95_high"])


def _arrow_types(path: pathlib.Path) -> dict[str, str]:
    """Column name -> Arrow type as written (large_string and string alike: pandas versions differ)."""
    return {f.name: "string" if pa.types.is_large_string(f.type) else str(f.type) for f in pq.read_schema(path)}


STRING, INT, FLOAT = "string", "int64", "double"
# The columns every study's tables have, in order, with their Arrow types: what users' pandas code reads.
PINNED = {
    "trials": {
        "schema_version": INT,
        "study": STRING,
        "trial": STRING,
        "trial_index": INT,
        "status": STRING,
        "error": STRING,
        "search": STRING,
        "epochs": INT,
        "wall_time_s": FLOAT,
        "gpu_hours": FLOAT,
        "trial_wall_s": FLOAT,
        "train_loop_s": FLOAT,
        "overhead_s": FLOAT,
    },
    "epochs": {"schema_version": INT, "study": STRING, "trial": STRING},
    "experts": {
        "schema_version": INT,
        "study": STRING,
        "trial": STRING,
        "layer": INT,
        "expert": INT,
        "importance_share": FLOAT,
        "load_share": FLOAT,
        "alive": "bool",
        "rank": INT,
        "node_id": STRING,
        "gpu_id": INT,
    },
    "affinity": {
        "schema_version": INT,
        "study": STRING,
        "trial": STRING,
        "layer": INT,
        "expert": INT,
        "group_kind": STRING,
        "group": INT,
        "share": FLOAT,
    },
    "comparison": {
        "schema_version": INT,
        "study": STRING,
        "sweep.method": STRING,
        "metric": STRING,
        "n": INT,
        "mean": FLOAT,
        "std": FLOAT,
        "ci95_low": FLOAT,
        "ci95_high": FLOAT,
    },
}
# Columns after the pinned ones (trials, epochs): swept values keep their YAML type; every metric is a double.
METRIC = r"(lr|epoch|(train|val|best)_\w+|moe\d+_\w+|images_per_s|epoch_s|setup_s|restored_epoch)"


def test_table_schemas_are_pinned(study):
    for name, pinned in PINNED.items():
        types = _arrow_types(study / f"{name}.parquet")
        assert list(types)[: len(pinned)] == list(pinned), name
        assert {c: types[c] for c in pinned} == pinned, name
        rest = {c: t for c, t in types.items() if c not in pinned}
        if name in ("experts", "affinity", "comparison"):
            assert rest == {}, (name, rest)
            continue
        assert rest.pop("sweep.method") == STRING and rest.pop("sweep.seed") == INT, name
        metrics = {c: t for c, t in rest.items() if re.fullmatch(METRIC, c)}
        assert len(metrics) > 20 and set(metrics.values()) == {FLOAT}, (
            name,
            {c: t for c, t in metrics.items() if t != FLOAT},
        )
        if name == "trials":  # the collapse flag of every MoE layer (issue 34)
            assert metrics.get("moe0_collapsed") == FLOAT, name
        others = {c: t for c, t in rest.items() if c not in metrics and not c.startswith("config.")}
        assert others == ({"placement": STRING} if name == "trials" else {}), (name, others)


def test_aggregating_twice_gives_identical_tables(study):
    before = {name: pd.read_parquet(study / f"{name}.parquet") for name in TABLES}
    again = aggregate(study)
    for name in TABLES:
        pd.testing.assert_frame_equal(before[name], again[name])
        pd.testing.assert_frame_equal(before[name], pd.read_parquet(study / f"{name}.parquet"))


def test_a_crash_while_writing_leaves_the_previous_tables_intact(study, monkeypatch):
    import harness.storage

    before = pd.read_parquet(study / "trials.parquet")

    def die_before_rename(src, dst):  # the new table is fully written aside; the process dies here
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(harness.storage.os, "replace", die_before_rename)
    with pytest.raises(KeyboardInterrupt):
        aggregate(study)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(before, pd.read_parquet(study / "trials.parquet"))
    assert not list(study.glob(".trials.parquet.*"))  # no temporary file left behind


def test_tables_read_and_write_through_a_uri(study):
    tables = aggregate(f"file://{study}")
    pd.testing.assert_frame_equal(tables["trials"], pd.read_parquet(study / "trials.parquet"))


def test_report_writes_markdown_and_valid_pngs(study):
    _, report = write_report(study)
    text = report.read_text()
    assert text.startswith("# Study `tables`") and "6 trials: 2 error, 4 ok." in text
    found = text.split("## What this study found\n\n")[1].split("\n")[0]  # before the tables
    assert found.startswith("Best by val_top1: method=") and "Most balanced (lowest moe0_importance_cv)" in found
    assert text.index("## What this study found") < text.index("## Comparison")
    assert "| method | val_top1 | val_top5 | images_per_s | moe0_importance_cv |" in text
    assert "| soft | " in text and "| hard | " in text and "| broken | " not in text
    assert "`t0004`: non-finite loss" in text
    pngs = sorted((study / "plots").glob("*.png"))
    assert {p.name for p in pngs} == {
        "affinity_superclass.png",
        "importance_over_epochs.png",
        "accuracy_vs_balance.png",
    }
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({png.relative_to(study)})" in text


def test_aggregate_cli_refuses_a_folder_that_is_no_study(tmp_path, capsys):
    assert aggregate_main([str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {tmp_path}: not a study folder (no study.json); run python -m harness.sweep first"
    )


def test_paper_tables_print_from_the_parquet_results(study, capsys):
    from harness.report import main as report_main

    assert report_main(["--paper", "krishnamurthy", str(study)]) == 0
    out = capsys.readouterr().out
    assert "| method | train error | train error (paper) | test error |" in out
    # the hard-constraint trials have no loss: the classic-gate row; the paper has no synthetic_cifar table
    assert "| classic gate | " in out and "| classic + importance (0.5) | " in out
    assert "| 0.021 |" not in out and " | - | " in out
    assert (study / "paper_krishnamurthy.md").read_text().count("\n| classic") == 2
    assert report_main(["--paper", "pavlitska", str(study)]) == 0
    out = capsys.readouterr().out
    assert "| method | accuracy | importance CV |" in out and "e0: " in out and "e2: " in out


def test_an_aggregator_process_killed_mid_write_leaves_every_table_readable(study):
    """A real process dies (os._exit, no cleanup) at the worst moment: its first table fully written aside,
    not yet renamed. Every table must still read, equal to before; no temporary file stays visible as a table."""
    import subprocess
    import sys

    before = {name: pd.read_parquet(study / f"{name}.parquet") for name in TABLES}
    script = (
        "import os, sys; from harness.analysis.aggregate import main\n"
        "os.replace = lambda src, dst: os._exit(137)\n"
        f"sys.exit(main([{str(study)!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(study / f"{name}.parquet"), before[name])
    assert sorted(p.name for p in study.glob("*.parquet")) == sorted(f"{name}.parquet" for name in TABLES)


def test_comparison_compares_test_time_k_and_both_mutual_informations():
    """val_top1_k<k> (train.test_time_k) and the reference's I(E;Y) get comparison rows like val_top1."""
    from harness.analysis.aggregate import comparison_table

    trials = pd.DataFrame(
        [
            {
                "status": "ok",
                "sweep.method": "soft",
                "sweep.seed": seed,
                "val_top1": 0.5,
                "val_top1_k1": 0.4 + seed / 10,
                "val_top1_k2": 0.5,
                "moe0_mutual_info_bits": 1.0,
                "moe0_expert_prediction_mutual_info_bits": 2.0,
            }
            for seed in (0, 1)
        ]
    )
    table = comparison_table("s", trials)
    k1 = table[table["metric"] == "val_top1_k1"].iloc[0]
    assert k1["n"] == 2 and k1["mean"] == pytest.approx(0.45)
    assert {"val_top1_k2", "moe0_mutual_info_bits", "moe0_expert_prediction_mutual_info_bits"} <= set(table["metric"])


def test_a_single_expert_has_no_routing_figures_in_the_comparison():
    """One expert: importance CV 0 and mutual information 0 are constants, not measurements; they must not
    make the baseline "the most balanced method"."""
    from harness.analysis.aggregate import comparison_table

    trials = pd.DataFrame(
        [
            {
                "status": "ok",
                "sweep.method": method,
                "sweep.seed": seed,
                "config.moe.num_experts": experts,
                "val_top1": 0.5,
                "moe0_importance_cv": 0.0 if experts == 1 else 0.3,
            }
            for method, experts in (("single", 1), ("mixture", 4))
            for seed in (0, 1)
        ]
    )
    table = comparison_table("s", trials)
    assert table.loc[table["sweep.method"] == "single", "metric"].tolist() == ["val_top1"]
    assert table.loc[table["sweep.method"] == "mixture", "metric"].tolist() == ["val_top1", "moe0_importance_cv"]


@pytest.mark.parametrize("with_study_file", [False, True])
def test_report_of_a_published_copy_reads_its_tables_and_changes_none(study, tmp_path, with_study_file):
    """A copy with the tables but not the trials' folders (as results/ publishes a study, or tables taken
    from a bucket): the report is written from the tables; rebuilt from no trials they would be emptied."""
    import shutil

    copy = tmp_path / "tables"
    copy.mkdir()
    for name in TABLES:
        shutil.copy(study / f"{name}.parquet", copy)
    if with_study_file:
        shutil.copy(study / "study.json", copy)
    before = {name: (copy / f"{name}.parquet").read_bytes() for name in TABLES}
    _, report = write_report(copy)
    assert "6 trials: 2 error, 4 ok." in report.read_text()
    assert (copy / "plots" / "accuracy_vs_balance.png").exists()
    assert {name: (copy / f"{name}.parquet").read_bytes() for name in TABLES} == before


def test_stale_tables_beside_the_trials_are_rebuilt_and_a_published_copy_is_never(study, tmp_path):
    import shutil

    from harness.errors import HarnessError

    copy = tmp_path / "copy"
    shutil.copytree(study, copy)  # the trials' folders too
    pd.read_parquet(copy / "trials.parquet").iloc[:1].to_parquet(copy / "trials.parquet")  # stale
    assert len(study_tables(copy)["trials"]) == 6  # rebuilt from the trials' folders, and written
    assert len(pd.read_parquet(copy / "trials.parquet")) == 6
    published = tmp_path / "published"  # tables and study.json, no trial folders
    published.mkdir()
    for name in [f"{t}.parquet" for t in TABLES] + ["study.json"]:
        shutil.copy(study / name, published)
    before = {p.name: p.read_bytes() for p in published.iterdir()}
    with pytest.raises(HarnessError, match="holds a study's tables but none of its trials' folders"):
        aggregate(published)
    assert aggregate_main([str(published)]) == 2
    assert {p.name: p.read_bytes() for p in published.iterdir()} == before
