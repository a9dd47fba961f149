import pytest
import torch

from harness.models import MODELS, create_model
from harness.models.resnet_moe import MoEStage, default_expert_width


def test_registry_lists_models_and_rejects_unknown():
    assert {"resnet18", "resnet18_moe", "small_cnn_moe"} <= set(MODELS)
    with pytest.raises(ValueError, match="valid: .*resnet18_moe"):
        create_model("resnet19")


def test_dense_resnet18_shapes():
    out = create_model("resnet18", num_classes=10)(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 10) and out.routings == []


@pytest.mark.parametrize("position", [1, 2, 3, 4])
def test_resnet18_moe_each_position(position):
    model = create_model("resnet18_moe", num_classes=7, num_experts=3, k=2, position=position)
    assert isinstance(model.stages[position - 1], MoEStage)
    expert = model.stages[position - 1].moe.experts[0]
    assert expert[0].conv1.out_channels == default_expert_width(position)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.logits.shape == (4, 7)
    assert len(out.routings) == 1 and out.routings[0].gates.shape == (4, 3)


def test_resnet18_moe_residual_and_several_positions():
    model = create_model("resnet18_moe", num_experts=4, k=1, position=[2, 4], residual=True, expert_width=16)
    assert model.stages[1].skip is not None
    out = model(torch.randn(2, 3, 32, 32))
    assert len(out.routings) == 2
    out.logits.sum().backward()
    assert model.stages[3].skip[0].weight.grad is not None


def test_paper_expert_width_for_layer4():
    assert default_expert_width(4) == 180


@pytest.mark.parametrize("gate", ["gap_fc", "conv_gap_fc", "attentive"])
def test_small_cnn_moe_outputs_mixture_log_probs(gate):
    model = create_model("small_cnn_moe", num_experts=5, gate=gate)
    out = model(torch.randn(3, 1, 28, 28))
    torch.testing.assert_close(out.logits.exp().sum(dim=1), torch.ones(3), rtol=1e-5, atol=1e-5)
    assert out.routings[0].gates.shape == (3, 5)
    assert (out.routings[0].gates > 0).all()  # k = E: dense expectation gate
