"""The paper tables' method naming and statistics, on hand-made result frames (no Ray)."""

import pandas as pd

from harness.aggregate import t95
from harness.paper import KRISHNAMURTHY_PUBLISHED, krishnamurthy_method, krishnamurthy_table


def _config(gate, importance=0.0, beta_s=0.0, beta_d=0.0, experts=5):
    return {"config.moe.gate.type": gate, "config.moe.num_experts": experts, "config.moe.losses.importance": importance,
            "config.moe.losses.sample_similarity.beta_s": beta_s,
            "config.moe.losses.sample_similarity.beta_d": beta_d}


def test_the_papers_seven_rows_map_to_the_published_values():
    rows = [_config("gap_fc", experts=1), _config("gap_fc"), _config("gap_fc", 0.2), _config("gap_fc", beta_s=1e-6, beta_d=1e-6),
            _config("attentive"), _config("attentive", 0.2), _config("attentive", beta_s=1e-6, beta_d=1e-2)]
    assert [krishnamurthy_method(r) for r in rows] == list(KRISHNAMURTHY_PUBLISHED["mnist"])


def test_each_trial_contributes_its_last_epoch_and_the_data_sets_published_row():
    """The trained model's figures (last epoch, as the reference's collect_results), the reference's I(E;Y)
    (not the true-label one), and the published value of the trials' own data set."""
    trials = pd.DataFrame([{"trial": t, "status": "ok", "config.data.name": "mnist", **_config("gap_fc", 0.2)}
                           for t in ("t0", "t1")])
    epochs = pd.DataFrame([
        {"trial": "t0", "epoch": 1, "train_top1": 0.97, "val_top1": 0.99, "moe0_expert_prediction_mutual_info_bits": 0.1,
         "moe0_mutual_info_bits": 9.0, "moe0_sample_entropy_bits": 0.5, "moe0_usage_entropy_bits": 2.0},
        {"trial": "t0", "epoch": 2, "train_top1": 0.95, "val_top1": 0.90, "moe0_expert_prediction_mutual_info_bits": 2.0,
         "moe0_mutual_info_bits": 9.0, "moe0_sample_entropy_bits": 0.1, "moe0_usage_entropy_bits": 2.2},
        {"trial": "t1", "epoch": 1, "train_top1": 0.97, "val_top1": 0.94, "moe0_expert_prediction_mutual_info_bits": 2.2,
         "moe0_mutual_info_bits": 9.0, "moe0_sample_entropy_bits": 0.3, "moe0_usage_entropy_bits": 2.3},
    ])
    table = krishnamurthy_table(trials, epochs)
    assert table["method"].tolist() == ["classic + importance (0.2)"]
    half = t95(1) * pd.Series([0.10, 0.06]).std() / 2**0.5
    assert table.loc[0, "test error"] == f"{0.08:.3f} ± {half:.3f} (2)"
    assert table.loc[0, "train error (paper)"] == "0.015"
    assert table.loc[0, "I(E;Y)"].startswith("2.100 ± ")
    fashion = krishnamurthy_table(trials.assign(**{"config.data.name": "fashion_mnist"}), epochs)
    assert fashion.loc[0, "train error (paper)"] == "0.031"
    unknown = krishnamurthy_table(trials.assign(**{"config.data.name": "synthetic_cifar"}), epochs)
    assert unknown.loc[0, "train error (paper)"] == "-"
