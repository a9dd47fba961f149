import pytest
import torch

from harness.moe import AttentiveGate, ConvGapFcGate, GapFcGate, MoESpec, TopKRouter, build_gate


@pytest.mark.parametrize("gate_type", ["gap_fc", "conv_gap_fc", "relu_gap_fc"])
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
    with pytest.raises(ValueError, match="attentive, conv_gap_fc, gap_fc, relu_gap_fc"):
        build_gate("softmax", 4, 2, 4)


def test_conv_gap_fc_is_the_reference_conv_gate_unpadded_and_affine():
    """Pavlitska's ConvGate: 3x3 conv without padding and without a nonlinearity, so the whole gate is an
    affine map (it commutes with affine combinations of inputs)."""
    torch.manual_seed(0)
    gate = build_gate("conv_gap_fc", in_channels=4, num_experts=3, expert_hidden_dim=4, hidden_channels=8)
    assert gate.conv.padding == (0, 0)
    x1, x2 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(gate(0.3 * x1 + 0.7 * x2), 0.3 * gate(x1) + 0.7 * gate(x2))
    # the unpadded conv sees only the 4x4 interior windows: its mean is over those
    expected = gate.fc(torch.nn.functional.conv2d(x1, gate.conv.weight, gate.conv.bias).mean(dim=(2, 3)))
    torch.testing.assert_close(gate(x1), expected)


def test_relu_gap_fc_is_what_the_reference_fc_gate_computes():
    gate = build_gate("relu_gap_fc", in_channels=4, num_experts=3, expert_hidden_dim=4)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(gate(x), gate.fc(torch.relu(x).mean(dim=(2, 3))))


def test_noise_scale_is_pavlitskas():
    """softplus(W GAP(x) + 0.01), W without bias at default init."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 2)
    pavlitska = TopKRouter(4, MoESpec(num_experts=5, k=2, noisy=True))
    assert pavlitska.noise.bias is None and pavlitska.noise.weight.abs().sum() > 0
    expected = torch.nn.functional.softplus(x.mean(dim=(2, 3)) @ pavlitska.noise.weight.t() + 0.01)
    torch.testing.assert_close(pavlitska.noise_scale(x), expected)
