"""The paper tables' method naming and statistics, on hand-made result frames (no Ray)."""

import pandas as pd

from harness.analysis.paper import KRISHNAMURTHY_PUBLISHED, krishnamurthy_method, krishnamurthy_table, pavlitska_table


def _config(gate, importance=0.0, beta_s=0.0, beta_d=0.0, experts=5):
    return {
        "config.moe.gate.type": gate,
        "config.moe.num_experts": experts,
        "config.moe.losses.importance": importance,
        "config.moe.losses.sample_similarity.beta_s": beta_s,
        "config.moe.losses.sample_similarity.beta_d": beta_d,
    }


def test_the_papers_seven_rows_map_to_the_published_values():
    rows = [
        _config("gap_fc", experts=1),
        _config("gap_fc"),
        _config("gap_fc", 0.2),
        _config("gap_fc", beta_s=1e-6, beta_d=1e-6),
        _config("attentive"),
        _config("attentive", 0.2),
        _config("attentive", beta_s=1e-6, beta_d=1e-2),
    ]
    assert [krishnamurthy_method(r) for r in rows] == list(KRISHNAMURTHY_PUBLISHED["mnist"])


def test_each_trial_contributes_its_last_epoch_and_the_data_sets_published_row():
    """The trained model's figures (last epoch, as the reference's collect_results), the reference's I(E;Y)
    (not the true-label one), and the published value of the trials' own data set."""
    trials = pd.DataFrame(
        [{"trial": t, "status": "ok", "config.data.name": "mnist", **_config("gap_fc", 0.2)} for t in ("t0", "t1")]
    )
    epochs = pd.DataFrame(
        [
            {
                "trial": "t0",
                "epoch": 1,
                "train_top1": 0.97,
                "val_top1": 0.99,
                "moe0_expert_prediction_mutual_info_bits": 0.1,
                "moe0_mutual_info_bits": 9.0,
                "moe0_sample_entropy_bits": 0.5,
                "moe0_usage_entropy_bits": 2.0,
            },
            {
                "trial": "t0",
                "epoch": 2,
                "train_top1": 0.95,
                "val_top1": 0.90,
                "moe0_expert_prediction_mutual_info_bits": 2.0,
                "moe0_mutual_info_bits": 9.0,
                "moe0_sample_entropy_bits": 0.1,
                "moe0_usage_entropy_bits": 2.2,
            },
            {
                "trial": "t1",
                "epoch": 1,
                "train_top1": 0.97,
                "val_top1": 0.94,
                "moe0_expert_prediction_mutual_info_bits": 2.2,
                "moe0_mutual_info_bits": 9.0,
                "moe0_sample_entropy_bits": 0.3,
                "moe0_usage_entropy_bits": 2.3,
            },
        ]
    )
    table = krishnamurthy_table(trials, epochs)
    assert table["method"].tolist() == ["classic + importance (0.2)"]
    # two seeds: too few for an interval, so the mean and the seeds' range (test error 1 - 0.90, 1 - 0.94)
    assert table.loc[0, "test error"] == "0.080 (0.060..0.100, 2)"
    assert table.loc[0, "train error (paper)"] == "0.015"
    assert table.loc[0, "I(E;Y)"] == "2.100 (2.000..2.200, 2)"  # the last epoch's 2.0 and 2.2, not epoch 1's 0.1
    fashion = krishnamurthy_table(trials.assign(**{"config.data.name": "fashion_mnist"}), epochs)
    assert fashion.loc[0, "train error (paper)"] == "0.031"
    unknown = krishnamurthy_table(trials.assign(**{"config.data.name": "synthetic_cifar"}), epochs)
    assert unknown.loc[0, "train error (paper)"] == "-"


def test_three_seeds_give_the_interval_clipped_to_the_metrics_range():
    """Train errors [0.01, 0.02, 0.0]: mean 0.01, sd 0.01, half width t(2) 4.303 * 0.01 / sqrt(3) =
    0.0248434: -0.0148434 to 0.0348434, clipped at 0; I(E;Y) [1, 2, 3] bits: half 2.4843382, clipped at 0."""
    trials = pd.DataFrame(
        [{"trial": f"t{i}", "status": "ok", "config.data.name": "mnist", **_config("gap_fc", 0.2)} for i in range(3)]
    )
    epochs = pd.DataFrame(
        [
            {
                "trial": f"t{i}",
                "epoch": 1,
                "train_top1": top1,
                "val_top1": 0.9,
                "moe0_expert_prediction_mutual_info_bits": bits,
                "moe0_sample_entropy_bits": 0.1,
                "moe0_usage_entropy_bits": 2.0,
            }
            for i, (top1, bits) in enumerate(((0.99, 1.0), (0.98, 2.0), (1.0, 3.0)))
        ]
    )
    table = krishnamurthy_table(trials, epochs)
    assert table.loc[0, "train error"] == "0.010 [0.000, 0.035] (3)"
    assert table.loc[0, "I(E;Y)"] == "2.000 [0.000, 4.484] (3)"
    assert table.loc[0, "H_s"] == "0.100 [0.100, 0.100] (3)"


def test_pavlitska_living_experts_are_clipped_at_the_number_of_experts():
    """Living experts [3, 4, 4] of E = 4: mean 3.667, half width 4.303 / 3 = 1.434, so 2.232 to 5.101,
    clipped at 4; accuracy [0.98, 0.99, 1.0]: 0.965 to 1.015, clipped at 1."""
    trials = pd.DataFrame(
        [
            {
                "trial": f"t{i}",
                "trial_index": i,
                "status": "ok",
                "sweep.seed": i,
                "config.moe.num_experts": 4,
                "val_top1": top1,
                "moe0_living_experts": living,
            }
            for i, (top1, living) in enumerate(((0.98, 3), (0.99, 4), (1.0, 4)))
        ]
    )
    affinity = pd.DataFrame(columns=["trial", "layer", "expert", "group_kind", "group", "share"])
    row = pavlitska_table(trials, affinity).iloc[0]
    assert row["living experts"] == "3.667 [2.232, 4.000] (3)"
    assert row["accuracy"] == "0.990 [0.965, 1.000] (3)"
