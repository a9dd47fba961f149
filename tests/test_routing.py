import math

import pytest
import torch

from harness.moe import MoESpec, TopKRouter, expert_capacity
from harness.moe.routing import capacity_keep_mask, sinkhorn_log


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exactly_k_nonzeros_per_row_and_rows_sum_to_one(k):
    router = TopKRouter(4, MoESpec(num_experts=5, k=k))
    routing = router(torch.randn(16, 5), torch.randn(16, 4, 2, 2))
    assert ((routing.gates > 0).sum(dim=1) == k).all()
    torch.testing.assert_close(routing.gates.sum(dim=1), torch.ones(16))
    torch.testing.assert_close(routing.probs.sum(dim=1), torch.ones(16))
    assert routing.dispatch_mask.sum() == 16 * k
    assert int(routing.dropped) == 0


def test_weights_are_softmax_over_top_k_logits_only():
    router = TopKRouter(4, MoESpec(num_experts=4, k=2))
    logits = torch.tensor([[3.0, 1.0, 0.0, -2.0]])
    routing = router(logits, torch.zeros(1, 4))
    expected = torch.softmax(torch.tensor([3.0, 1.0]), 0)
    torch.testing.assert_close(routing.gates[0, :2], expected)
    assert routing.indices.tolist() == [[0, 1]]


def test_expert_mask_excludes_switched_off_experts():
    router = TopKRouter(4, MoESpec(num_experts=4, k=2))
    mask = torch.tensor([True, False, False, False])
    routing = router(torch.tensor([[9.0, 1.0, 0.0, -1.0]] * 3), torch.zeros(3, 4), mask)
    assert (routing.gates[:, 0] == 0).all()
    assert (routing.indices != 0).all()


def test_noise_only_in_training_and_learnable():
    router = TopKRouter(4, MoESpec(num_experts=6, k=2, noisy=True))
    logits, x = torch.randn(32, 6), torch.randn(32, 4, 3, 3)
    router.train()
    a, b = router(logits, x), router(logits, x)
    assert a.noise_std is not None and a.noise_std.shape == (32, 6)
    assert not torch.equal(a.noisy_logits, b.noisy_logits)
    router.eval()
    c = router(logits, x)
    assert c.noisy_logits is None
    assert torch.equal(c.indices, logits.topk(2, dim=1).indices)


def test_capacity_formula():
    assert expert_capacity(10, 4, 2, 1.0) == 5
    assert expert_capacity(10, 4, 1, 1.25) == math.ceil(1.25 * 10 / 4)


def test_capacity_keeps_first_choices_before_second_choices():
    indices = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 2]])
    keep = capacity_keep_mask(indices, num_experts=3, capacity=2)
    # Expert 0's first choices come from tokens 0, 1, 3: token 3 overflows. Expert 1 takes token 2's
    # first choice, then token 0's second; token 1's second choice overflows, as does token 2's (expert 0).
    assert keep.tolist() == [[True, True], [True, False], [True, False], [False, True]]


def test_capacity_drops_and_counts_overflow():
    router = TopKRouter(4, MoESpec(num_experts=4, k=1, capacity_factor=1.0))  # capacity ceil(8/4) = 2
    logits = torch.tensor([[5.0, 0, 0, 0]] * 8)
    routing = router(logits, torch.zeros(8, 4))
    assert routing.dispatch_mask[:, 0].sum() == 2
    assert int(routing.dropped) == 6
    assert routing.dispatch_mask[:2, 0].all()  # batch order decides who fits


def test_evaluation_has_its_own_capacity_factor():
    logits, x = torch.tensor([[5.0, 0, 0, 0]] * 8), torch.zeros(8, 4)
    unlimited = TopKRouter(
        4, MoESpec(num_experts=4, k=1, capacity_factor=1.0)
    )  # eval_capacity_factor None: no dropping
    limited = TopKRouter(
        4, MoESpec(num_experts=4, k=1, capacity_factor=1.0, eval_capacity_factor=2.0)
    )  # capacity ceil(2*8/4) = 4
    assert int(unlimited(logits, x).dropped) == 6  # training: the training factor
    unlimited.eval(), limited.eval()
    free = unlimited(logits, x)
    assert int(free.dropped) == 0 and free.capacity_factor is None
    assert free.dispatch_mask[:, 0].all()
    assert int(limited(logits, x).dropped) == 4
    assert limited(logits, x).capacity_factor == 2.0


@pytest.mark.parametrize("eval_factor, drops", [(None, False), (0.5, True)])
def test_padded_dispatch_at_evaluation_equals_the_loop(eval_factor, drops):
    """A model trained with a capacity factor evaluates every token (or its evaluation limit) through the
    padded dispatch exactly as the reference loop does."""
    from harness.models import create_model

    torch.manual_seed(0)
    options = dict(
        num_classes=10, num_experts=4, k=1, expert_width=8, capacity_factor=0.5, eval_capacity_factor=eval_factor
    )
    loop = create_model("resnet18_moe", dispatch="loop", **options).eval()
    padded = create_model("resnet18_moe", dispatch="padded", **options).eval()
    padded.load_state_dict(loop.state_dict())
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        reference, fast = loop(x), padded(x)
    torch.testing.assert_close(fast.logits, reference.logits, rtol=1e-5, atol=1e-5)
    # 2 slots per expert (ceil(0.5 * 16 / 4)) keep at most 8 of the 16 tokens; no limit keeps them all.
    assert (sum(int(r.dropped) for r in fast.routings) >= 8) == drops
    assert (sum(int(r.dropped) for r in fast.routings) == 0) != drops


def test_k_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="k must be in 1..3"):
        TopKRouter(4, MoESpec(num_experts=3, k=4))


# --- today's routing methods (issue 22) ---------------------------------------------------------------------


def test_expert_choice_each_expert_takes_its_top_c_tokens_hand_worked():
    """E = 3, k = 1, N = 3: C = ceil(1 * 3 * 1 / 3) = 1 token per expert. Softmax rows: t0 [5, 4, 4] ->
    [.576, .212, .212]; t1 uniform [1/3] * 3; t2 [0, -5, -5] -> [.987, .007, .007]. Expert 0 takes t2,
    experts 1 and 2 both take t1; t0 is taken by nobody (dropped)."""
    router = TopKRouter(4, MoESpec(num_experts=3, k=1, capacity_factor=1.0, routing="expert_choice"))
    logits = torch.tensor([[5.0, 4.0, 4.0], [0.0, 0.0, 0.0], [0.0, -5.0, -5.0]])
    routing = router(logits, torch.zeros(3, 4, 1, 1))
    assert routing.dispatch_mask.tolist() == [[False, False, False], [False, True, True], [True, False, False]]
    probs = torch.softmax(logits, dim=1)
    torch.testing.assert_close(routing.gates, probs * routing.dispatch_mask)
    assert int(routing.dropped) == 1 and routing.capacity == 1 and routing.expert_choice


def test_expert_choice_trains_through_the_padded_dispatch_like_the_loop():
    from harness.moe import LocalDispatcher, PaddedDispatcher, build_moe_layer

    torch.manual_seed(0)
    experts = [torch.nn.Conv2d(4, 3, 1) for _ in range(4)]
    layer = build_moe_layer(experts, 4, 3, k=2, routing="expert_choice", capacity_factor=1.0)
    assert isinstance(layer.dispatcher, PaddedDispatcher)  # auto: C slots per expert, static shapes
    x = torch.randn(10, 4, 2, 2)
    results = []
    for dispatcher in (layer.dispatcher, LocalDispatcher()):
        layer.dispatcher = dispatcher
        layer.zero_grad()
        out = layer(x).output
        out.pow(2).sum().backward()  # the gate learns through the chosen pairs' scores
        results.append((out, [p.grad.clone() for p in layer.parameters()]))
    (padded, padded_grads), (loop, loop_grads) = results
    torch.testing.assert_close(padded, loop)
    for a, b in zip(padded_grads, loop_grads):
        torch.testing.assert_close(a, b)
    assert layer.gate.fc.weight.grad.abs().sum() > 0
    assert layer(x).routing.dispatch_mask.sum(dim=0).tolist() == [5, 5, 5, 5]  # ceil(1 * 10 * 2 / 4)


def test_balanced_assignment_spreads_tokens_in_training_only():
    """Every token prefers expert 0, by a shrinking margin (2.0 .. 1.7): plain top-1 sends all four there;
    Sinkhorn balancing gives each expert two, the two least attached to expert 0 going to expert 1.
    Evaluation is plain top-k."""
    router = TopKRouter(4, MoESpec(num_experts=2, k=1, sinkhorn_iterations=50, routing="balanced_assignment"))
    logits = torch.tensor([[2.0, 0.0], [1.9, 0.0], [1.8, 0.0], [1.7, 0.0]])
    x = torch.zeros(4, 4, 1, 1)
    assert router.train()(logits, x).indices[:, 0].tolist() == [0, 0, 1, 1]
    assert router.eval()(logits, x).indices[:, 0].tolist() == [0, 0, 0, 0]
    log_p = sinkhorn_log(logits, 50)
    torch.testing.assert_close(log_p.exp().sum(dim=1), torch.ones(4))
    torch.testing.assert_close(log_p.exp().sum(dim=0), torch.full((2,), 2.0), atol=1e-4, rtol=0)


def test_bias_balancing_moves_by_the_sign_rule_and_changes_only_the_choice():
    """b_i += u * sign(mean load - load_i); the bias picks the experts, the unbiased logits weight them."""
    from harness.moe.collective import LOCAL

    router = TopKRouter(4, MoESpec(num_experts=4, k=2, bias_update_rate=0.5))
    router.update_bias(torch.tensor([6.0, 2.0, 2.0, 2.0]))  # mean 3
    assert router.balance_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    # once per step from all of the step's calls (e.g. 5 FPN levels): two calls, one update
    router.balance_bias.zero_()
    x = torch.zeros(2, 4, 1, 1)
    for _ in range(2):
        router.record_load(router(torch.tensor([[3.0, 2.0, 0.0, 0.0], [3.0, 0.0, 2.0, 0.0]]), x))
    assert router.pending_load.tolist() == [4.0, 2.0, 2.0, 0.0] and router.balance_bias.abs().sum() == 0
    router.apply_pending_load(LOCAL)  # mean 2: sign(2 - load) = [-1, 0, 0, 1]
    assert router.balance_bias.tolist() == [-0.5, 0.0, 0.0, 0.5] and router.pending_load.sum() == 0
    # an expert a constraint switched off keeps its bias; the mean is over the live ones
    router.update_bias(torch.tensor([4.0, 2.0, 2.0, 0.0]), live=torch.tensor([True, True, True, False]))
    assert router.balance_bias.tolist() == [-1.0, 0.5, 0.5, 0.5]  # live mean 8/3
    router.balance_bias.copy_(torch.tensor([-0.5, 0.5, 0.5, 0.5]))
    assert "balance_bias" in router.state_dict()  # saved in checkpoints
    logits = torch.tensor([[2.0, 1.9, 1.2, 0.0]])
    routing = router(logits, torch.zeros(1, 4, 1, 1))
    assert routing.indices[0].tolist() == [1, 2]  # biased scores 1.5, 2.4, 1.7, 0.5
    torch.testing.assert_close(routing.weights[0], torch.softmax(torch.tensor([1.9, 1.2]), dim=0))
