"""small_cnn_moe's stacked execution (experts as one network) against expert-by-expert execution, the
towers' own conv and pooling autograd, and the options that make Krishnamurthy's studies run as the
reference notebooks did (fixed normalisation, training accuracy after the step, BatchNorm on the
evaluation batch, the FashionMNIST attentive gate's ReLU). Every equivalence runs in float64, where
two summation orders agree to ~1e-15 and a wrong weight, expert or order would be off by far more."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.models import create_model
from harness.models.small_cnn_moe import _MaxPool2x2, input_conv2d

TOWERS = {
    "mnist": {},
    "fashion_mnist": {
        "expert": {"conv": [1], "fc": [64, 32]},
        "gate_network": {"conv": [8], "fc": [512, 32], "batchnorm": [0]},
    },
    "cifar_like": {"expert": {"conv": [4, 6], "fc": [16], "padding": 1, "batchnorm": [1]}},
    "fc_only": {"expert": {"conv": [], "fc": [7, 5]}},
}
TOL = 1e-12  # float64: the two paths differ only in summation order


def _pair(gate: str, towers: dict, **options):
    models = []
    for execution in ("modules", "stacked"):
        torch.manual_seed(0)
        models.append(
            create_model("small_cnn_moe", gate=gate, expert_execution=execution, **towers, **options).double()
        )
    return models


@pytest.mark.parametrize("towers", TOWERS.values(), ids=TOWERS.keys())
@pytest.mark.parametrize("gate", ["gap_fc", "attentive"])
def test_stacked_experts_equal_the_expert_modules_in_outputs_gradients_and_state(gate, towers):
    modules, stacked = _pair(gate, towers)
    assert modules.state_dict().keys() == stacked.state_dict().keys()  # checkpoints load either way
    x = torch.randn(48, 1, 28, 28, dtype=torch.float64)
    labels = torch.randint(0, 10, (48,))
    outputs = []
    for model in (modules, stacked):
        out = model(x)
        F.cross_entropy(out.logits, labels).backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=0, atol=TOL)
    for (name, a), b in zip(modules.named_parameters(), stacked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=TOL, msg=name)
    for (name, a), b in zip(modules.named_buffers(), stacked.buffers()):  # BatchNorm statistics per expert
        torch.testing.assert_close(b, a, rtol=0, atol=TOL, msg=name)
    modules.eval(), stacked.eval()
    a, b = modules(x), stacked(x)
    assert torch.equal(a.expert_classes, b.expert_classes)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=TOL)


def test_stacked_execution_is_used_only_where_every_expert_sees_every_token():
    calls = []

    def counting(experts, x):
        calls.append(len(experts))
        from harness.models.small_cnn_moe import stacked_experts_forward

        return stacked_experts_forward(experts, x)

    dense = create_model("small_cnn_moe", num_experts=4)
    dense.moe.expert_stack = counting
    dense(torch.randn(8, 1, 28, 28))
    assert calls == [4]
    sparse = create_model("small_cnn_moe", num_experts=4, k=2)
    sparse.moe.expert_stack = counting
    x = torch.randn(8, 1, 28, 28)
    sparse(x).logits.sum().backward()
    assert calls == [4]  # top-2: dispatched per expert, so an expert without tokens gets no gradient
    sparse.eval()
    sparse(x)  # evaluation still needs every expert's prediction (expert_classes): one stacked pass
    assert calls == [4, 4]


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("batch", [6, 0])  # 0: an expert that received no token
def test_input_conv_weight_gradient_equals_the_generic_one(padding, channels, batch):
    x = torch.randn(batch, channels, 11, 9, dtype=torch.float64)
    weight, bias = torch.randn(5, channels, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    weights = [weight.clone().requires_grad_() for _ in range(2)]
    biases = [bias.clone().requires_grad_() for _ in range(2)]
    grad = torch.randn(batch, 5, 9 + 2 * padding, 7 + 2 * padding, dtype=torch.float64)
    (F.conv2d(x, weights[0], biases[0], padding=padding) * grad).sum().backward()
    out = input_conv2d(x, weights[1], biases[1], padding)
    torch.testing.assert_close(out, F.conv2d(x, weights[0], biases[0], padding=padding), rtol=0, atol=TOL)
    (out * grad).sum().backward()
    torch.testing.assert_close(weights[1].grad, weights[0].grad, rtol=0, atol=TOL)
    torch.testing.assert_close(biases[1].grad, biases[0].grad, rtol=0, atol=TOL)


@pytest.mark.parametrize("shape", [(3, 2, 6, 6), (2, 3, 7, 5)])
def test_pooling_matches_max_pool2d_with_ties_and_odd_sizes(shape):
    # Integer-valued inputs tie often: max_pool2d's gradient goes to the first maximum in scan order.
    h = torch.randint(0, 3, shape).double()
    reference, ours = h.clone().requires_grad_(), h.clone().requires_grad_()
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=torch.float64)
    (F.max_pool2d(reference, 2) * grad).sum().backward()
    pooled = _MaxPool2x2.apply(ours)
    assert torch.equal(pooled, F.max_pool2d(h, 2))
    (pooled * grad).sum().backward()
    assert torch.equal(ours.grad, reference.grad)


@pytest.mark.parametrize("execution", ["stacked", "modules"])
def test_trains_under_bf16_autocast(execution):
    """``train.amp: bf16`` (and auto on CUDA): the towers' own conv falls back to PyTorch's under autocast."""
    torch.manual_seed(0)
    model = create_model("small_cnn_moe", expert_execution=execution)
    x, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).logits, labels)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.moe.experts[0].parameters())
