import math

import pytest
import torch

from harness.metrics import affinity, mutual_information_bits, utilization_metrics
from harness.metrics.utilization import contingency
from harness.moe import MoESpec


def one_hot(assignment, num_experts):
    return torch.nn.functional.one_hot(torch.as_tensor(assignment), num_experts).float()


def test_perfect_specialization_with_uniform_labels_gives_log2_e_bits():
    labels = torch.arange(400) % 4
    metrics = utilization_metrics(one_hot(labels, 4), labels, 4)
    assert metrics["mutual_info_bits"] == pytest.approx(2.0)
    assert metrics["usage_entropy_bits"] == pytest.approx(2.0)
    assert metrics["sample_entropy_bits"] == pytest.approx(0.0)
    assert metrics["importance_cv"] == pytest.approx(0.0)
    assert metrics["living_experts"] == 4


def test_independent_routing_gives_about_zero_mutual_information():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (20000,), generator=g)
    experts = torch.randint(0, 4, (20000,), generator=g)
    metrics = utilization_metrics(one_hot(experts, 4), labels, 10)
    assert 0 <= metrics["mutual_info_bits"] < 0.01


def test_collapse():
    metrics = utilization_metrics(one_hot([1] * 10, 4))
    assert metrics["importance_cv"] == pytest.approx(math.sqrt(3))  # population std / mean
    assert metrics["load_cv"] == pytest.approx(math.sqrt(3))
    assert metrics["living_experts"] == 1
    assert metrics["usage_entropy_bits"] == pytest.approx(0.0)
    assert metrics["kl_uniform_bits"] == pytest.approx(2.0)  # log2 E
    assert "mutual_info_bits" not in metrics


def test_dense_uniform_gates_have_maximal_sample_entropy():
    metrics = utilization_metrics(torch.full((6, 8), 1 / 8))
    assert metrics["sample_entropy_bits"] == pytest.approx(3.0)
    assert metrics["usage_entropy_bits"] == pytest.approx(3.0)
    assert metrics["load_cv"] == pytest.approx(0.0)


def test_living_experts_threshold():
    gates = torch.tensor([[0.5, 0.495, 0.005, 0.0]] * 3)
    assert utilization_metrics(gates)["living_experts"] == 2


def test_mutual_information_of_a_hand_table():
    # Expert 0 always takes label 0; expert 1 takes labels 0 and 1 evenly. p(E) = (.5, .5), p(Y) = (.75, .25)
    counts = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    h_y = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    h_y_given_e = 0.5 * 0 + 0.5 * 1.0
    assert mutual_information_bits(counts) == pytest.approx(h_y - h_y_given_e)
    assert contingency(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]), 2, 2).tolist() == counts.tolist()


def test_affinity_rows_are_each_experts_split_over_groups():
    gates = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    groups = torch.tensor([0, 1, 1])
    table = affinity(gates, groups, num_groups=2)
    assert table.shape == (3, 2)
    torch.testing.assert_close(table[0], torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(table[1], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert table[2].sum() == 0  # expert 2 received nothing


def test_router_stats_hand_worked():
    """Top-2 over 3 experts (the third switched off), 2 slots per expert: first choices fill experts 0 and
    1 (2 tokens each), so all 4 second choices drop: loads [2, 2, 0] -> max / mean = 2 / (4/3) = 1.5,
    dropped 4/8; mean |logit| over the 8 finite logits = 18 / 8. Expert choice counts the tokens no expert
    took instead."""
    from harness.metrics import RouterStats
    from harness.moe import TopKRouter

    logits = torch.tensor(
        [[3.0, 2.0, float("-inf")], [3.0, 1.0, float("-inf")], [1.0, 3.0, float("-inf")], [2.0, 3.0, float("-inf")]]
    )
    router = TopKRouter(1, MoESpec(num_experts=3, k=2, capacity_factor=0.6))  # ceil(0.6 * 2 * 4 / 3) = 2 per expert
    routing = router(logits, torch.zeros(4, 1, 1, 1))
    stats = RouterStats(3)
    stats.update(routing)
    figures = stats.compute()
    assert figures["max_load_ratio"] == pytest.approx(1.5)
    assert figures["dropped_fraction"] == pytest.approx(0.5)
    assert figures["router_logit_abs_mean"] == pytest.approx(18.0 / 8)
    chooser = TopKRouter(1, MoESpec(num_experts=3, k=1, routing="expert_choice"))
    choice = chooser(torch.tensor([[5.0, 4.0, 4.0], [0.0, 0.0, 0.0], [0.0, -5.0, -5.0]]), torch.zeros(3, 1, 1, 1))
    stats = RouterStats(3)
    stats.update(choice)
    assert stats.compute()["dropped_fraction"] == pytest.approx(1 / 3)  # token 0 taken by nobody


def test_expert_similarity_known_answers_and_from_an_evaluation():
    """Mean pairwise cosine of the experts' parameter vectors: 1 for identical rows, 0 for orthogonal, -1 for
    opposite, the mean over pairs otherwise; an evaluation of a model whose experts are copies reports 1."""
    import torch

    from harness.config import validate_run
    from harness.data import ClassificationData
    from harness.metrics import mean_pairwise_cosine
    from harness.models import create_model
    from harness.tasks.classification import evaluate

    assert mean_pairwise_cosine(torch.tensor([[1.0, 2.0], [2.0, 4.0]])) == pytest.approx(1.0, abs=1e-12)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [0.0, 3.0]])) == 0.0
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-1.0, abs=1e-12)
    # pairs (0,1): 1, (0,2): 0, (1,2): 0 -> 1/3
    assert mean_pairwise_cosine(torch.eye(2)[[0, 0, 1]]) == pytest.approx(1 / 3, abs=1e-12)
    assert math.isnan(mean_pairwise_cosine(torch.ones(1, 3)))
    config = validate_run(
        {"model": {"name": "small_cnn_moe"}, "moe": {"num_experts": 3, "k": 3}, "train": {"device": "cpu"}}
    )
    torch.manual_seed(0)
    model = create_model("small_cnn_moe", num_classes=10, moe=config.moe.spec())
    data = ClassificationData(
        torch.zeros(4, 1, 28, 28, dtype=torch.uint8),
        torch.zeros(4, dtype=torch.long),
        torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8),
        torch.arange(8) % 10,
        10,
    )
    fresh = evaluate(model, data, config, torch.device("cpu"))["moe0_expert_similarity"]
    for expert in model.moe.experts[1:]:
        expert.load_state_dict(model.moe.experts[0].state_dict())
    copies = evaluate(model, data, config, torch.device("cpu"))["moe0_expert_similarity"]
    assert copies == pytest.approx(1.0, abs=1e-12) and abs(fresh) < 0.5
    # Experts with BatchNorm (every scale 1 at init): independently initialised kernels are near orthogonal
    # (|cos| ~ 1/sqrt(P), P > 10^4 here), which the scales would hide (about 0.7 with them counted).
    from harness.moe.parallel import expert_parameter_vectors

    resnet = create_model("resnet18_moe", num_classes=10, num_experts=4, k=2, expert_width=16)
    layer = next(m for m in resnet.modules() if hasattr(m, "experts"))
    assert abs(mean_pairwise_cosine(expert_parameter_vectors(layer))) < 0.05


def test_a_layer_that_routed_nothing_has_no_balance_figures():
    """Every gate zero (a dead ReLU router): 0 living experts and NaN balance, never a perfect 0."""
    metrics = utilization_metrics(torch.zeros(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), num_classes=3)
    assert metrics["living_experts"] == 0.0
    assert all(math.isnan(v) for k, v in metrics.items() if k != "living_experts"), metrics
