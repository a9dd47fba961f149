import pytest
import torch

from harness.moe import AttentiveGate, ConvGapFcGate, GapFcGate, build_gate


@pytest.mark.parametrize("gate_type", ["gap_fc", "conv_gap_fc"])
def test_gate_returns_logits_per_token(gate_type):
    gate = build_gate(gate_type, in_channels=8, num_experts=5, expert_hidden_dim=16, hidden_channels=12)
    logits = gate(torch.randn(3, 8, 6, 6))
    assert logits.shape == (3, 5)


def test_gap_fc_depends_only_on_pooled_features():
    gate = GapFcGate(4, 3)
    x = torch.randn(2, 4, 5, 5)
    shuffled = x.flatten(2)[:, :, torch.randperm(25)].view_as(x)  # same channel means
    torch.testing.assert_close(gate(x), gate(shuffled))


def test_conv_gate_accepts_vector_tokens():
    gate = ConvGapFcGate(6, 4, hidden_channels=8)
    assert gate(torch.randn(3, 6)).shape == (3, 4)


def test_attentive_gate_scores_are_scaled_dot_products():
    gate = AttentiveGate(in_channels=4, num_experts=3, expert_hidden_dim=5, attention_dim=2)
    x = torch.randn(2, 4, 3, 3)
    hidden = torch.randn(2, 3, 5)
    q = x.mean(dim=(2, 3)) @ gate.query.weight.t()
    k = hidden @ gate.key.weight.t()
    expected = (q[:, None, :] * k).sum(-1) / 2**0.5
    torch.testing.assert_close(gate(x, hidden), expected)
    assert gate.needs_expert_hidden


def test_unknown_gate_lists_valid_ones():
    with pytest.raises(ValueError, match="attentive, conv_gap_fc, gap_fc"):
        build_gate("softmax", 4, 2, 4)
