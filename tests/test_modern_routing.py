"""Soft MoE routing, ReMoE's ReLU routing with its adaptive L1 term, and shared experts (issue 34): each
formula against a case worked by hand, in float64. The expert-parallel equivalence of ReLU routing and
of a shared expert is in ``tests/ep_equivalence.py`` (``MODERN_CASES``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from harness.config import validate_run
from harness.errors import ConfigError
from harness.models.registry import create_model
from harness.moe import (
    AuxWeights,
    MoESpec,
    build_moe_layer,
    relu_l1_loss,
    soft_dispatch,
    update_balance_biases,
    weighted_aux_losses,
)
from harness.moe.routing import TopKRouter


@pytest.fixture(autouse=True)
def float64():
    """Every test here in float64: the figures are checked to float64 rounding."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class Scale(nn.Module):
    """``x -> factor * x``: an expert whose output says which expert ran."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * x


def _router(routing: str, num_experts: int = 2, k: int = 1, **options) -> TopKRouter:
    return TopKRouter(1, MoESpec(num_experts=num_experts, k=k, routing=routing, **options))


def test_soft_moe_hand_worked():
    """Two tokens (1 and 5), E = 2, one slot each; slot logits [[0, 0], [ln 3, 0]]. Dispatch (softmax over
    tokens): slot 0 takes (1/4, 3/4), slot 1 (1/2, 1/2), so the slots hold 4 and 3; experts x2 and x10 make
    8 and 30. Combine (softmax over slots): token 0 (1/2, 1/2) -> 19, token 1 (3/4, 1/4) -> 13.5."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    x = torch.tensor([1.0, 5.0]).view(2, 1, 1, 1)
    routing = _router("soft", slots_per_expert=1).train()(logits, x)
    assert torch.allclose(routing.slot_dispatch, torch.tensor([[0.25, 0.5], [0.75, 0.5]]), atol=1e-15)
    output = soft_dispatch(x, routing, [Scale(2.0), Scale(10.0)])
    assert torch.allclose(output.flatten(), torch.tensor([19.0, 13.5]), atol=1e-12)
    assert torch.allclose(routing.gates, torch.tensor([[0.5, 0.5], [0.75, 0.25]]), atol=1e-15)
    assert routing.dispatch_mask.all() and int(routing.dropped) == 0


def test_soft_moe_gives_each_expert_its_own_slots():
    """E = 3, p = 2: expert i runs on slots 2i and 2i + 1, and every token's output is the combine-weighted
    sum over all six slots' outputs (checked slot by slot); gates sum each expert's slots."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, 3)
    logits = torch.randn(5, 6)
    routing = _router("soft", num_experts=3, slots_per_expert=2)(logits, x)
    factors = [2.0, -1.0, 7.0]
    slots = torch.einsum("ns,nchw->schw", routing.slot_dispatch, x)
    expected = sum(routing.slot_combine[:, s, None, None, None] * factors[s // 2] * slots[s] for s in range(6))
    assert torch.allclose(soft_dispatch(x, routing, [Scale(f) for f in factors]), expected, atol=1e-12)
    assert torch.allclose(routing.gates, routing.slot_combine.view(5, 3, 2).sum(dim=2), atol=1e-15)
    assert torch.allclose(routing.slot_dispatch.sum(dim=0), torch.ones(6), atol=1e-12)


def test_soft_layer_scores_slots_and_trains_every_expert():
    """The layer's gate has E * p outputs, and one backward reaches every expert (none is ever idle)."""
    experts = [nn.Conv2d(3, 4, 1) for _ in range(3)]
    layer = build_moe_layer(experts, 3, 4, routing="soft", slots_per_expert=2, k=1).train()
    assert layer.gate.fc.out_features == 6 and not layer.may_leave_experts_idle()
    layer(torch.randn(4, 3, 2, 2)).output.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.experts.parameters())


def test_relu_routing_hand_worked():
    """Gates are ReLU(logits) as they are (no softmax): an expert runs on a token when its gate is positive,
    and a token with no positive gate is dropped."""
    logits = torch.tensor([[0.5, -1.0, 1.0], [-2.0, -0.1, 2.0], [-1.0, -1.0, -3.0]])
    routing = _router("relu", num_experts=3)(logits, torch.zeros(3, 1, 1, 1))
    assert torch.equal(routing.gates, torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))
    assert routing.dispatch_mask.tolist() == [[True, False, True], [False, False, True], [False, False, False]]
    assert int(routing.dropped) == 1


def test_relu_l1_loss_hand_worked():
    """E = 3, k = 1, gates [[0.5, 0, 1], [0, 0, 2]]: P = (0.5, 0, 3), f = (1, 0, 2), so
    3 * ((0.5 / 2)(1 / 2) + 0 + (3 / 2)(2 / 2)) = 4.875; the weighted loss is the coefficient times that."""
    gates = torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.0, 2.0]])
    assert relu_l1_loss(gates, k=1).item() == pytest.approx(4.875, abs=1e-12)
    router = _router("relu", num_experts=3, relu_l1_initial=0.1)
    routing = router(torch.where(gates > 0, gates, -1.0), torch.zeros(2, 1, 1, 1))  # ReLU gives back `gates`
    assert torch.equal(routing.gates, gates)
    loss = weighted_aux_losses(routing, None, AuxWeights())
    assert loss["relu_l1_loss"].item() == pytest.approx(0.4875, abs=1e-12)


@pytest.mark.parametrize(
    ("active", "expected"),
    [(6.0, 1.2), (2.0, 1 / 1.2), (4.0, 1.0)],
    ids=["denser_than_k_grows", "sparser_than_k_shrinks", "at_k_stays"],
)
def test_relu_l1_coefficient_moves_towards_k_per_token(active, expected):
    """E = 4, k = 2 (target sparsity 1/2), 2 tokens: 6 active pairs is sparsity 1/4 (too dense: x 1.2),
    2 is 3/4 (too sparse: / 1.2), 4 is the target (unchanged)."""
    router = _router("relu", num_experts=4, k=2, relu_l1_initial=1.0)
    router.update_l1_coefficient(torch.tensor([active, 0.0, 0.0, 0.0]), torch.tensor(2.0))
    assert router.l1_coefficient.item() == pytest.approx(expected, rel=1e-12)
    router.update_l1_coefficient(torch.zeros(4), torch.tensor(0.0))  # a step without tokens moves nothing
    assert router.l1_coefficient.item() == pytest.approx(expected, rel=1e-12)


def test_relu_l1_coefficient_is_saved_with_the_model_and_moves_after_each_step():
    """The coefficient is a persistent buffer (a resumed run continues from it) and moves once per
    optimizer step from the step's recorded routing."""
    torch.manual_seed(0)
    model = create_model("resnet18_moe", num_classes=4, expert_width=4, num_experts=4, k=1, routing="relu")
    router = next(m for m in model.modules() if isinstance(m, TopKRouter))
    assert "l1_coefficient" in "".join(model.state_dict())
    before = router.l1_coefficient.item()
    model.train()(torch.randn(8, 3, 32, 32)).logits.sum().backward()
    update_balance_biases(model)
    assert router.l1_coefficient.item() != before and float(router.pending_tokens) == 0.0


def test_shared_experts_add_their_output_to_the_routed_mix():
    """A layer with a shared expert equals the same layer without it plus the shared expert on every token,
    and the shared expert gets a gradient from every token even where the routed experts idle."""
    torch.manual_seed(0)
    experts = [nn.Conv2d(3, 4, 3, padding=1) for _ in range(4)]
    shared = nn.Conv2d(3, 4, 3, padding=1)
    with_shared = build_moe_layer(experts, 3, 4, shared=[shared], k=1, shared_experts=1).train()
    without = build_moe_layer(copy.deepcopy(experts), 3, 4, k=1).train()
    without.gate.load_state_dict(with_shared.gate.state_dict())
    x = torch.randn(6, 3, 5, 5)
    out = with_shared(x)
    assert torch.allclose(out.output, without(x).output + shared(x), atol=1e-12)
    out.output.sum().backward()
    assert shared.weight.grad is not None
    with pytest.raises(ValueError, match="1 shared experts but the spec asks for 2"):
        build_moe_layer(experts, 3, 4, shared=[shared], shared_experts=2)


def test_resnet_builds_its_shared_experts():
    model = create_model("resnet18_moe", num_classes=4, expert_width=4, num_experts=4, k=2, shared_experts=2)
    layer = next(m for m in model.modules() if hasattr(m, "shared_experts"))
    assert len(layer.shared_experts) == 2 and len(layer.experts) == 4


def _config(moe: dict, **more) -> dict:
    return {
        "data": {"name": "synthetic_cifar"},
        "model": {"name": more.pop("model", "resnet18_moe")},
        "moe": {"num_experts": 4, "k": 2, **moe},
        **more,
    }


@pytest.mark.parametrize(
    ("moe", "more", "message"),
    [
        ({"routing": {"type": "soft"}, "gate": {"noisy": True}}, {}, "moe.gate.noisy: not with routing.type soft"),
        ({"routing": {"type": "relu"}, "capacity_factor": 1.0}, {}, "moe.capacity_factor: not with routing.type relu"),
        ({"routing": {"type": "soft"}, "gate": {"type": "attentive"}}, {}, "attentive: not with routing.type soft"),
        ({"routing": {"type": "relu"}, "losses": {"load": 0.1}}, {}, "moe.losses.load: not with routing.type relu"),
        (
            {"routing": {"type": "soft"}},
            {"distributed": {"num_workers": 2, "expert_parallel": True}},
            "Soft MoE's slots mix each rank's tokens",
        ),
        ({"shared_experts": 1}, {"model": "small_cnn_moe"}, "moe.shared_experts: for experts whose outputs"),
        ({"routing": {"type": "relu", "relu": {"l1_multiplier": 1.0}}}, {}, "l1_multiplier"),
        ({"routing": {"type": "top_k", "slots_per_expert": 8}}, {}, "slots_per_expert: is for type soft, not top_k"),
        ({"routing": {"type": "soft", "relu": {"l1_initial": 0.1}}}, {}, "relu: is for type relu, not soft"),
    ],
    ids=[
        "soft_noisy",
        "relu_capacity",
        "soft_attentive",
        "relu_load_loss",
        "soft_ep",
        "shared_small_cnn",
        "multiplier",
        "slots_without_soft",
        "relu_options_without_relu",
    ],
)
def test_bad_combinations_are_refused_by_name(moe, more, message):
    if more.get("model") == "small_cnn_moe":
        more = {**more, "data": {"name": "mnist"}}
    config = _config(moe, **more)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_run(config)


def test_the_config_reaches_the_layer():
    config = validate_run(
        _config({"routing": {"type": "soft", "slots_per_expert": 3}, "shared_experts": 1, "expert_width": 4})
    )
    spec = config.moe.spec()
    assert (spec.routing, spec.slots_per_expert, spec.shared_experts) == ("soft", 3, 1)
    relu = validate_run(_config({"routing": {"type": "relu", "relu": {"l1_initial": 0.01}}})).moe.spec()
    assert (relu.routing, relu.relu_l1_initial, relu.relu_l1_multiplier) == ("relu", 0.01, 1.2)


def test_relu_l1_coefficient_is_exact_at_k_and_bounded():
    """E = 7, k = 3: exactly 3 experts per token leaves the coefficient (no float rounding of 1 - 3/7 moves
    it), and long one-sided runs stop at the bounds instead of underflowing or overflowing."""
    from harness.moe.routing import L1_COEFFICIENT_MAX, L1_COEFFICIENT_MIN

    router = _router("relu", num_experts=7, k=3, relu_l1_initial=1.0)
    for tokens in (32, 128, 512):
        router.update_l1_coefficient(torch.tensor([3.0 * tokens, 0, 0, 0, 0, 0, 0]), torch.tensor(float(tokens)))
    assert router.l1_coefficient.item() == 1.0
    for _ in range(300):
        router.update_l1_coefficient(torch.full((7,), 7.0), torch.tensor(1.0))  # every expert on: too dense
    assert router.l1_coefficient.item() == pytest.approx(L1_COEFFICIENT_MAX)
    for _ in range(600):
        router.update_l1_coefficient(torch.zeros(7), torch.tensor(1.0))  # nothing on: too sparse
    assert router.l1_coefficient.item() == pytest.approx(L1_COEFFICIENT_MIN)
    router.update_l1_coefficient(torch.full((7,), 7.0), torch.tensor(1.0))
    assert router.l1_coefficient.item() == pytest.approx(L1_COEFFICIENT_MIN * 1.2)  # it can grow again


def test_a_batch_with_every_relu_gate_zero_leaves_the_experts_batchnorm_alone():
    """No expert runs, the output is zero, and finding its shape moves no BatchNorm statistic."""
    experts = [nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)) for _ in range(2)]
    layer = build_moe_layer(experts, 3, 4, routing="relu", k=1, dispatch="loop").train()
    with torch.no_grad():
        layer.gate.fc.weight.zero_()
        layer.gate.fc.bias.fill_(-1.0)  # every logit -1: every ReLU gate 0
    before = [e[1].running_mean.clone() for e in experts]
    out = layer(torch.randn(5, 3, 2, 2))
    assert torch.equal(out.output, torch.zeros(5, 4, 2, 2)) and int(out.routing.dropped) == 5
    assert all(torch.equal(e[1].running_mean, b) for e, b in zip(experts, before))
    assert all(int(e[1].num_batches_tracked) == 0 for e in experts)
