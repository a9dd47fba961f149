import math

import pytest
import torch

from harness.moe import (
    MeanImportanceConstraint,
    RelativeImportanceConstraint,
    importance_loss,
    kl_uniform_loss,
    load,
    load_loss,
    sample_similarity_loss,
    switch_loss,
)
from harness.moe.balancing import prob_in_top_k


def one_hot_gates(assignment, num_experts):
    return torch.nn.functional.one_hot(torch.tensor(assignment), num_experts).float()


def test_importance_loss_zero_for_uniform_and_large_for_collapse():
    uniform = torch.full((8, 4), 0.25)
    collapsed = one_hot_gates([0] * 8, 4)
    assert importance_loss(uniform) == pytest.approx(0.0, abs=1e-8)
    # Imp = [8, 0, 0, 0]: unbiased var 16, mean 2 -> CV^2 = 4.
    assert importance_loss(collapsed) == pytest.approx(4.0, rel=1e-6)


def test_importance_loss_has_gradient():
    logits = torch.randn(6, 3, requires_grad=True)
    importance_loss(torch.softmax(logits, 1)).backward()
    assert logits.grad.abs().sum() > 0


def test_kl_uniform_loss():
    assert kl_uniform_loss(torch.full((5, 4), 0.25)) == pytest.approx(0.0, abs=1e-7)
    assert kl_uniform_loss(one_hot_gates([2] * 5, 4)) == pytest.approx(math.log(4), rel=1e-6)


def test_switch_loss_is_one_when_balanced_and_e_when_collapsed():
    balanced = one_hot_gates([0, 1, 2, 3], 4)
    assert switch_loss(balanced, balanced) == pytest.approx(1.0)
    collapsed = one_hot_gates([1] * 4, 4)
    assert switch_loss(collapsed, collapsed) == pytest.approx(4.0)


def test_hard_load_counts_tokens():
    gates = one_hot_gates([0, 0, 1, 3], 4)
    assert load(gates).tolist() == [2, 1, 0, 1]
    assert load_loss(one_hot_gates([0, 1, 2, 3], 4)) == pytest.approx(0.0, abs=1e-8)


def test_prob_in_top_k_matches_monte_carlo():
    torch.manual_seed(1)
    clean = torch.tensor([[0.5, 0.0, -0.3, 0.2]])
    std = torch.tensor([[0.7, 0.4, 1.0, 0.5]])
    noisy = clean + torch.randn(1, 4) * std
    k = 2
    analytic = prob_in_top_k(clean, noisy, std, k)[0]
    # Definition: resample expert i's noise, others fixed; is i in the top k?
    draws = 200_000
    for i in range(4):
        resampled = noisy.repeat(draws, 1)
        resampled[:, i] = clean[0, i] + torch.randn(draws) * std[0, i]
        in_top = (resampled.topk(k, dim=1).indices == i).any(dim=1).float().mean()
        assert analytic[i] == pytest.approx(float(in_top), abs=0.01)


def test_load_loss_is_differentiable_and_ignores_switched_off_experts():
    clean = torch.randn(16, 4, requires_grad=True)
    std = torch.full((16, 4), 0.5, requires_grad=True)
    masked_clean = clean.masked_fill(torch.tensor([False, False, False, True]), float("-inf"))
    noisy = masked_clean + torch.randn(16, 4) * std
    probs = prob_in_top_k(masked_clean, noisy, std, k=1)
    assert torch.isfinite(probs).all()
    assert (probs[:, 3] == 0).all()
    load_loss(torch.zeros(16, 4), masked_clean, noisy, std, 1).backward()
    assert clean.grad.abs().sum() > 0 and std.grad.abs().sum() > 0


def test_sample_similarity_hand_worked_under_the_reference_scaling():
    """Only the beta_d term is divided by N^2, as the reference's ``reg_similarity`` line (E = N = 2)."""
    inputs = torch.tensor([[0.0], [2.0]])  # d = [[0, 2], [2, 0]]; max-normalised [[0, 1], [1, 0]]
    split = torch.eye(2)
    together = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # together: sum_nm p_0(n) p_0(m) d_nm = 2, S_same = 2 / E = 1, not divided by N^2
    assert sample_similarity_loss(inputs, together, 1.0, 1.0) == pytest.approx(1.0)
    assert sample_similarity_loss(inputs, together, 2.0, 0.0) == pytest.approx(2.0)
    # split: sum over i != j = 2, S_diff = 2 / (E^2 - E) = 1, divided by N^2 = 4
    assert sample_similarity_loss(inputs, split, 1.0, 1.0) == pytest.approx(-0.25)
    # raw distances (the reference commit behind its MNIST table): d_01 = 2
    assert sample_similarity_loss(inputs, together, 1.0, 1.0, distance="raw") == pytest.approx(2.0)
    # one of 2 data-parallel ranks (global batch 4): the unnormalised beta_s sum scales by (4 / 2)^2
    assert sample_similarity_loss(inputs, together, 1.0, 1.0, total_tokens=4) == pytest.approx(4.0)
    assert sample_similarity_loss(inputs, split, 1.0, 1.0, total_tokens=4) == pytest.approx(-0.25)


def test_sample_similarity_magnitude_of_the_issue_example():
    """N = 64, E = 5, uniform gates, beta_s = beta_d = 1e-6: the pull-together half dominates at ~1e-4."""
    inputs = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    probs = torch.full((64, 5), 0.2)
    flat = inputs.flatten(1)
    d = torch.cdist(flat, flat)
    d = d / d.max()
    # an independent sum over expert pairs, as the reference loops over them
    same = sum((probs[:, i, None] * probs[None, :, i] * d).sum() for i in range(5)) / 5
    diff = sum((probs[:, i, None] * probs[None, :, j] * d).sum() for i in range(5) for j in range(5) if i != j) / 20
    expected = 1e-6 * same - 1e-6 * diff / 64**2
    loss = sample_similarity_loss(inputs, probs, 1e-6, 1e-6)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert 5e-5 < float(loss) < 5e-4


def test_relative_importance_switches_dominant_expert_off_and_back_on():
    constraint = RelativeImportanceConstraint(num_experts=4, threshold=0.5, k=1)
    assert not constraint.mask().any()
    constraint.update(one_hot_gates([0] * 8, 4))  # R_0 = (8 - 2) / 2 = 3
    assert constraint.mask().tolist() == [True, False, False, False]
    balanced_without_0 = one_hot_gates([1, 1, 1, 2, 2, 3, 3, 3], 4)
    steps_off = 0
    while constraint.mask()[0]:
        constraint.update(balanced_without_0)  # R_0 drops by 1 per step
        steps_off += 1
    assert steps_off == 3  # 3 -> 2 -> 1 -> 0 <= 0.5
    assert torch.allclose(constraint.running[0], torch.tensor(0.0))


def test_mean_importance_constraint_uses_running_mean():
    constraint = MeanImportanceConstraint(num_experts=4, threshold=0.3, k=1)
    constraint.update(one_hot_gates([0] * 4, 4))  # m_0 = 1.0 > 0.25 + 0.3
    assert constraint.mask()[0]
    constraint.update(one_hot_gates([1, 2, 3, 1], 4))  # m_0 = 0.5 <= 0.55
    assert not constraint.mask()[0]
    assert int(constraint.steps) == 2


def test_constraint_never_switches_off_more_than_e_minus_k():
    constraint = RelativeImportanceConstraint(num_experts=4, threshold=0.1, k=2)
    constraint.running.copy_(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert constraint.mask().tolist() == [True, True, False, False]


def test_without_a_limit_every_violating_expert_is_off_and_gets_no_tokens():
    """Pavlitska's code: three of four experts over the threshold are all off, though k = 2; top-2 then
    selects one switched-off expert per token at weight 0, and it receives no token (no gradient)."""
    from harness.moe import build_moe_layer

    constraint = RelativeImportanceConstraint(num_experts=4, threshold=0.1)
    constraint.running.copy_(torch.tensor([0.4, 0.4, 0.4, -1.2]))  # increments sum to 0: one stays on
    assert constraint.mask().tolist() == [True, True, True, False]
    experts = [torch.nn.Conv2d(3, 3, 1) for _ in range(4)]
    layer = build_moe_layer(
        experts,
        in_channels=3,
        expert_hidden_dim=3,
        k=2,
        dispatch="loop",
        constraint={"type": "relative_importance", "threshold": 0.1, "limit": "none"},
    )
    layer.constraint.running.copy_(constraint.running)
    out = layer(torch.randn(6, 3, 4, 4))
    assert out.routing.gates[:, 3].eq(1).all() and out.routing.gates[:, :3].eq(0).all()
    assert out.routing.dispatch_mask.tolist() == [[False, False, False, True]] * 6
    out.output.sum().backward()
    assert [e.weight.grad is None for e in experts] == [True, True, True, False]
    limited = build_moe_layer(
        experts,
        in_channels=3,
        expert_hidden_dim=3,
        k=2,
        dispatch="loop",
        constraint={"type": "relative_importance", "threshold": 0.1, "limit": "e_minus_k"},
    )
    limited.constraint.running.copy_(constraint.running)
    assert limited.constraint.mask().sum() == 2  # the project's other choice: every token keeps k experts


def test_constraint_state_round_trips_through_state_dict():
    a = RelativeImportanceConstraint(4, 0.5)
    a.update(one_hot_gates([0, 0, 1, 2], 4))
    b = RelativeImportanceConstraint(4, 0.5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.running, b.running)


def test_threshold_must_be_positive():
    with pytest.raises(ValueError, match="threshold"):
        MeanImportanceConstraint(4, 0.0)


def test_router_z_loss_hand_worked():
    """logsumexp of [0, 0] is ln 2, of [ln 3, 0] is ln 4: mean of squares ((ln 2)^2 + (ln 4)^2) / 2;
    a switched-off expert (-inf) drops out. Weighted in weighted_aux_losses, summed over ranks."""
    from harness.moe import AuxWeights, MoESpec, TopKRouter, router_z_loss, weighted_aux_losses

    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(expected)
    masked = torch.tensor([[0.0, 0.0, float("-inf")], [math.log(3.0), 0.0, float("-inf")]])
    assert float(router_z_loss(masked)) == pytest.approx(expected)
    routing = TopKRouter(1, MoESpec(num_experts=2, k=1))(logits, torch.zeros(2, 1, 1, 1))
    losses = weighted_aux_losses(routing, None, AuxWeights(z_loss=0.1))
    assert float(losses["z_loss"]) == pytest.approx(0.1 * expected)


# ---------------------------------------------------------------------------------------------------------
# Balancing has its effect: the same seeded task, started with a gate that favours experts 0 and 1.

EFFECT_EXPERTS, EFFECT_CHANNELS = 4, 8


def _train_from_an_unbalanced_gate(
    importance: float = 0.0, constraint: dict | None = None, steps: int = 150
) -> dict[str, float]:
    """Train a top-2 MoE layer of 1x1-conv experts to fit one random 1x1 conv (any expert can: nothing but
    the balancing method spreads the tokens), starting from gate biases +3, +3, 0, 0. Returns
    :func:`utilization_metrics` of the last 50 training batches' gates (the routing the constraint
    shapes; at evaluation there is no mask)."""
    from harness.metrics import utilization_metrics
    from harness.moe import AuxWeights, build_moe_layer, weighted_aux_losses

    torch.manual_seed(0)
    experts = [torch.nn.Conv2d(EFFECT_CHANNELS, 1, 1) for _ in range(EFFECT_EXPERTS)]
    layer = build_moe_layer(experts, EFFECT_CHANNELS, 1, k=2, constraint=constraint, dispatch="loop")
    target = torch.nn.Conv2d(EFFECT_CHANNELS, 1, 1)
    with torch.no_grad():
        layer.gate.fc.bias.copy_(torch.tensor([3.0, 3.0, 0.0, 0.0]))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(0)
    late_gates = []
    for step in range(steps):
        x = torch.randn(64, EFFECT_CHANNELS, 1, 1, generator=data)
        out = layer(x)
        losses = weighted_aux_losses(out.routing, x, AuxWeights(importance=importance))
        loss = (out.output - target(x).detach()).pow(2).mean() + sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= steps - 50:
            late_gates.append(out.routing.gates.detach())
    return utilization_metrics(torch.cat(late_gates))


def test_importance_loss_balances_and_hard_constraints_keep_every_expert_alive():
    """Without balancing, experts 2 and 3 never get a token (the favoured pair fits the task alone); the
    importance loss (0.5) brings the importance CV close to 0, and each hard constraint keeps all four
    experts alive."""
    unbalanced = _train_from_an_unbalanced_gate()
    assert unbalanced["living_experts"] == 2 and unbalanced["importance_cv"] > 0.9
    balanced = _train_from_an_unbalanced_gate(importance=0.5)
    assert balanced["importance_cv"] < 0.1 and balanced["living_experts"] == EFFECT_EXPERTS
    for constraint in (
        {"type": "relative_importance", "threshold": 0.5},
        {"type": "mean_importance", "threshold": 0.1},
    ):
        constrained = _train_from_an_unbalanced_gate(constraint=constraint)
        assert constrained["living_experts"] == EFFECT_EXPERTS, constraint
        assert constrained["importance_cv"] < 0.5 * unbalanced["importance_cv"], constraint


def test_router_orthogonality_hand_worked_and_its_gradient_through_a_training_step():
    """SimBal's ||W W^T - I||_1 (E x D router weight W): 0 for orthonormal expert directions, 2 for two
    experts on one unit direction, |4 - 1| + |0 - 1| = 4 for one direction of length 2 and one of 0. In a
    training step it appears as ``router_orthogonality_loss`` (weight times the sum over MoE layers), and its
    gradient on the gate's weight is weight x 2 sign(W W^T - I) W (the sign matrix is symmetric)."""
    from harness.config import validate_run
    from harness.models import create_model
    from harness.moe import router_orthogonality_loss
    from harness.tasks.classification import forward

    assert float(router_orthogonality_loss(torch.eye(3)[:2])) == 0.0
    assert float(router_orthogonality_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))) == 2.0
    assert float(router_orthogonality_loss(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))) == 4.0
    raw = {
        "model": {"name": "small_cnn_moe"},
        "moe": {"num_experts": 3, "k": 3, "losses": {"router_orthogonality": 0.1}},
    }
    config = validate_run(raw)
    torch.manual_seed(0)
    model = create_model("small_cnn_moe", num_classes=10, moe=config.moe.spec()).double()
    batch = (torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))
    losses = forward(model, batch, config, None).losses
    w = model.moe.gate.fc.weight
    gram = w.detach() @ w.detach().t() - torch.eye(3, dtype=torch.float64)
    assert float(losses["router_orthogonality_loss"].detach()) == pytest.approx(
        0.1 * float(gram.abs().sum()), rel=1e-12
    )
    (grad,) = torch.autograd.grad(losses["router_orthogonality_loss"], [w])
    torch.testing.assert_close(grad, 0.1 * 2 * gram.sign() @ w.detach(), rtol=1e-12, atol=1e-12)
    off = validate_run({**raw, "moe": {**raw["moe"], "losses": {}}})
    assert "router_orthogonality_loss" not in forward(model, batch, off, None).losses


def test_router_orthogonality_needs_a_router_matrix():
    from harness.config import validate_run
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="router_orthogonality: the attentive gate has no router matrix"):
        validate_run({"moe": {"gate": {"type": "attentive"}, "losses": {"router_orthogonality": 0.1}}})
