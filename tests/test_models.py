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
    assert expert[0].conv1.out_channels == expert[0].conv2.out_channels == default_expert_width(position)
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


def test_reference_expert_widths_and_layout():
    """NarrowResNet18Expert in Pavlitska et al.'s code: widths 25 / 50 / 90 / 180; at stage 4
    BasicBlock(256, 180, stride 2) + 1x1 shortcut (753,480 parameters) then BasicBlock(180, 512) + 1x1
    shortcut (3,283,968): 4,037,448."""
    assert [default_expert_width(p) for p in (1, 2, 3, 4)] == [25, 50, 90, 180]
    model = create_model("resnet18_moe", num_experts=2, k=1, position=4)
    assert sum(p.numel() for p in model.stages[3].moe.experts[0].parameters()) == 4_037_448


def test_global_gating_reads_only_the_image():
    """gate_input="image": every MoE stage's gate is a linear head on one shared conv of the input image
    (no padding), so changing a stage's input (here: the stem's weights) leaves the routing unchanged."""
    model = create_model(
        "resnet18_moe", num_classes=5, num_experts=4, k=2, position=[1, 4], gate_input="image", expert_width=8
    ).eval()
    assert model.image_gate.conv.padding == (0, 0) and model.image_gate.conv.in_channels == 3
    assert all(stage.moe.gate.fc.in_features == 256 for stage in (model.stages[0], model.stages[3]))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = [r.gates for r in model(images).routings]
        model.stem[0].weight.mul_(-2.0)
        after = [r.gates for r in model(images).routings]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gate", ["gap_fc", "conv_gap_fc", "attentive"])
def test_small_cnn_moe_outputs_mixture_log_probs(gate):
    model = create_model("small_cnn_moe", num_experts=5, gate=gate)
    out = model(torch.randn(3, 1, 28, 28))
    torch.testing.assert_close(out.logits.exp().sum(dim=1), torch.ones(3), rtol=1e-5, atol=1e-5)
    assert out.routings[0].gates.shape == (3, 5)
    assert (out.routings[0].gates > 0).all()  # k = E: dense expectation gate


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_small_cnn_moe_has_the_reference_networks():
    """Krishnamurthy et al.'s MNIST expert (conv 1 ch, fc 169 -> 5 -> 32 -> 10): 10 + 850 + 192 + 330 =
    1,382 parameters; gate (conv 1 ch, fc 169 -> 128 -> 32 -> 5): 10 + 21,760 + 4,128 + 165 = 26,063;
    FashionMNIST expert 13,300; CIFAR-100 expert 911,012 (counted from the reference's notebooks)."""
    mnist = create_model("small_cnn_moe", num_classes=10, num_experts=5)
    assert _count(mnist.moe.experts[0]) == 1_382
    assert _count(mnist.gate_tower) + _count(mnist.moe.gate) == 26_063
    fashion = create_model("small_cnn_moe", expert={"conv": [1], "fc": [64, 32]})
    assert _count(fashion.moe.experts[0]) == 13_300
    cifar = create_model(
        "small_cnn_moe",
        num_classes=100,
        num_experts=2,
        in_channels=3,
        image_size=32,
        expert={"conv": [16, 32, 64, 128], "fc": [1024, 256], "padding": 1, "batchnorm": [1, 3]},
    )
    assert _count(cifar.moe.experts[0]) == 911_012
    assert cifar(torch.randn(2, 3, 32, 32)).logits.shape == (2, 100)


def test_single_expert_baseline_is_the_expert_alone():
    """E = 1: the gate's only weight is 1, so the model's output is its one expert's (log-)probabilities."""
    model = create_model("small_cnn_moe", num_experts=1).eval()
    images = torch.randn(4, 1, 28, 28)
    out = model(images)
    torch.testing.assert_close(out.logits, torch.log(model.moe.experts[0](images) + 1e-7))
    assert out.routings[0].gates.shape == (4, 1) and (out.routings[0].gates == 1).all()
