import torch
from torch import nn

from harness.moe import LocalDispatcher, MoELayer, MoESpec, build_moe_layer, combine_dense
from harness.moe.gates import GapFcGate
from harness.moe.routing import TopKRouter


def conv_experts(num_experts, channels=4):
    return [nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Tanh()) for _ in range(num_experts)]


def test_k_equal_e_is_the_dense_weighted_sum_of_all_experts():
    experts = conv_experts(3)
    layer = build_moe_layer(experts, in_channels=4, expert_hidden_dim=4, k=3)
    x = torch.randn(5, 4, 6, 6)
    out = layer(x)
    weights = torch.softmax(layer.gate(x), dim=1)
    expected = sum(weights[:, i, None, None, None] * experts[i](x) for i in range(3))
    torch.testing.assert_close(out.output, expected)
    torch.testing.assert_close(out.routing.gates, weights)


def test_sparse_output_uses_only_selected_experts():
    experts = conv_experts(4)
    layer = build_moe_layer(experts, 4, 4, k=1)
    x = torch.randn(6, 4, 5, 5)
    out = layer(x)
    chosen = out.routing.indices[:, 0]
    for n in range(6):
        expected = experts[int(chosen[n])](x[n : n + 1])[0]  # weight 1 for k = 1
        torch.testing.assert_close(out.output[n], expected)


def test_gradients_reach_gate_and_experts():
    experts = conv_experts(4)
    layer = build_moe_layer(experts, 4, 4, k=2, noisy=True)
    layer.train()
    out = layer(torch.randn(32, 4, 5, 5))
    out.output.pow(2).mean().backward()
    assert layer.gate.fc.weight.grad.abs().sum() > 0
    used = out.routing.dispatch_mask.any(dim=0)
    for i, expert in enumerate(experts):
        grad = expert[0].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == bool(used[i])
    assert used.sum() >= 2


def test_local_dispatch_matches_dense_combine():
    experts = conv_experts(4)
    router = TopKRouter(4, MoESpec(num_experts=4, k=2, capacity_factor=0.75))
    x = torch.randn(12, 4, 3, 3)
    routing = router(torch.randn(12, 4), x)
    sparse = LocalDispatcher()(x, routing, experts)
    dense = combine_dense(torch.stack([e(x) for e in experts], dim=1), routing)
    torch.testing.assert_close(sparse, dense)
    assert int(routing.dropped) > 0


def test_dropped_tokens_contribute_nothing():
    experts = conv_experts(2)
    gate = GapFcGate(4, 2)
    nn.init.zeros_(gate.fc.weight)
    gate.fc.bias.data = torch.tensor([5.0, 0.0])  # everyone wants expert 0
    layer = MoELayer(experts, gate, TopKRouter(4, MoESpec(num_experts=2, k=1, capacity_factor=1.0)))  # capacity 4 of 8
    out = layer(torch.randn(8, 4, 3, 3))
    assert int(out.routing.dropped) == 4
    assert out.output[4:].abs().sum() == 0 and out.output[:4].abs().sum() > 0


def test_attentive_layer_runs_every_expert_and_trains_the_attention():
    experts = conv_experts(3)
    layer = build_moe_layer(experts, 4, expert_hidden_dim=4, k=2, gate="attentive", attention_dim=8)
    x = torch.randn(6, 4, 5, 5)
    out = layer(x)
    expected = combine_dense(torch.stack([e(x) for e in experts], dim=1), out.routing)
    torch.testing.assert_close(out.output, expected)
    out.output.sum().backward()
    assert layer.gate.query.weight.grad.abs().sum() > 0
    assert layer.gate.key.weight.grad.abs().sum() > 0


def test_hard_constraint_masks_next_batch_in_training_only():
    experts = conv_experts(4)
    layer = build_moe_layer(experts, 4, 4, k=1, constraint={"type": "relative_importance", "threshold": 0.5})
    layer.gate.fc.bias.data = torch.tensor([10.0, 0.0, 0.0, 0.0])
    x = torch.randn(16, 4, 3, 3)
    layer.train()
    first = layer(x)
    assert (first.routing.indices == 0).all()  # no history yet: nothing masked
    second = layer(x)
    assert second.routing.expert_mask.tolist() == [True, False, False, False]
    assert (second.routing.gates[:, 0] == 0).all()
    state = layer.constraint.running.clone()
    layer.eval()
    third = layer(x)
    assert third.routing.expert_mask is None and (third.routing.indices == 0).all()
    assert torch.equal(layer.constraint.running, state)  # eval does not update the constraint
    assert "constraint.running" in layer.state_dict()
