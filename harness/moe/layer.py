"""MoELayer = gate + routing (+ hard constraint) + dispatch + experts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..precision import at_least_float32
from .balancing import CONSTRAINTS, HardConstraint, router_orthogonality_loss
from .collective import LOCAL
from .dispatch import (
    Dispatcher,
    LocalDispatcher,
    PaddedDispatcher,
    SortedDispatcher,
    combine_dense,
    expert_forward_with_hidden,
    soft_dispatch,
)
from .gates import build_gate
from .routing import Routing, TopKRouter
from .spec import AuxWeights, MoESpec

# ``(experts, x [N, ...]) -> (outputs [N, E, ...], hidden [N, E, D])``: every expert of a layer on every token
# at once (a model's batched execution of experts that share an architecture, e.g. stacked weights).
ExpertStack = Callable[[Sequence[nn.Module], torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class MoEOutput:
    """``output: [N, ...]`` the combined expert outputs; ``routing`` what the layer decided;
    ``expert_outputs: [N, E, ...]`` every expert's output when the layer computed them all (an attentive
    gate, or dense routing through an ``expert_stack``), else None."""

    output: torch.Tensor
    routing: Routing
    expert_outputs: torch.Tensor | None = None


class MoELayer(nn.Module):
    """A sparsely-gated mixture of experts over tokens ``x: [N, C, H, W]`` (per-sample feature maps).

    Args:
        experts: E modules with the same input and output shapes.
        gate: a gate from :mod:`harness.moe.gates` (logits only).
        router: a :class:`TopKRouter` (noise, top-k, capacity).
        constraint: optional hard constraint; it masks experts and is updated in training only.
        dispatcher: how tokens reach experts; :class:`LocalDispatcher` by default (Soft MoE routing mixes
            tokens into slots instead: :func:`~harness.moe.dispatch.soft_dispatch`).
        shared_experts: modules every token passes through beside the routed experts (DeepSeekMoE's shared
            experts); their outputs are added to the routed mix, ungated. Replicated on every rank under
            expert parallelism, like the gate.

    ``collective`` (a :class:`~harness.moe.parallel.Collective`, identity by default) is the data-parallel
    group over which capacity and hard-constraint statistics are computed.

    ``forward(x, gate_input=None) -> MoEOutput``; the gate sees ``gate_input`` when given (for a gate with
    its own feature extractor), else ``x``. A gate that needs every expert's hidden features (attentive)
    runs all experts on all tokens.

    ``expert_stack`` (optional, an :data:`ExpertStack`) runs all experts on all tokens in one batched pass.
    The layer uses it instead of running expert by expert whenever every expert would see every token
    anyway: an attentive gate, or dense routing (k = E, no capacity limit, no hard constraint, top-k) with
    every expert held by this process. Sparse routing never uses it, so an expert without tokens still
    gets no gradient.

    ``step_tokens: [E]`` long (a non-persistent buffer) counts the tokens each expert computed on in the
    optimizer step's grad-enabled training forwards; :func:`~harness.moe.parallel.sync_gradients` reads
    it (summed over ranks) to leave experts that got no token without an update, and clears it.
    ``expert_ids`` are the global ids of :attr:`experts` (all E, or this rank's after ``shard_experts``).
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        gate: nn.Module,
        router: TopKRouter,
        constraint: HardConstraint | None = None,
        dispatcher: Dispatcher | None = None,
        expert_stack: ExpertStack | None = None,
        shared_experts: Sequence[nn.Module] = (),
    ) -> None:
        super().__init__()
        if len(experts) != router.num_experts:
            raise ValueError(f"{len(experts)} experts but the router expects {router.num_experts}")
        self.experts = nn.ModuleList(experts)  # after shard_experts: only this rank's experts
        self.gate = gate
        self.router = router
        self.constraint = constraint
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher()
        self.collective = LOCAL  # the data-parallel group; set by harness.moe.parallel
        self.expert_stack = expert_stack  # a function, not a module: the experts' parameters stay theirs
        self.expert_ids = list(range(router.num_experts))
        self.shared_experts = nn.ModuleList(shared_experts)
        self.register_buffer("step_tokens", torch.zeros(router.num_experts, dtype=torch.long), persistent=False)

    @property
    def num_experts(self) -> int:
        """E, all experts of the layer (also those other ranks hold under expert parallelism)."""
        return self.router.num_experts

    def routes_densely(self) -> bool:
        """Every token goes to every expert with nothing dropped or masked (in the current mode), and this
        process holds every expert: the case :attr:`expert_stack` may compute."""
        router = self.router
        capacity = router.capacity_factor if self.training else router.eval_capacity_factor
        return (
            router.k == self.num_experts
            and capacity is None
            and router.method == "top_k"
            and not (self.training and self.constraint is not None)
            and len(self.experts) == self.num_experts
        )

    def may_leave_experts_idle(self) -> bool:
        """Whether a training step can leave an expert without a token: sparse top-k, a capacity limit, a
        hard constraint or another routing method; never when every expert runs on every token (the
        attentive gate needs all of them) or on slots that mix all tokens (Soft MoE)."""
        if getattr(self.gate, "needs_expert_hidden", False) or self.router.method == "soft":
            return False
        router = self.router
        return (
            router.k < self.num_experts
            or router.capacity_factor is not None
            or self.constraint is not None
            or router.method != "top_k"
        )

    def all_experts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs [N, E, ...], hidden [N, E, D])``: every expert held here on every token, batched
        through :attr:`expert_stack` when the layer has one and holds every expert."""
        if self.expert_stack is not None and len(self.experts) == self.num_experts:
            return self.expert_stack(self.experts, x)
        outputs, hidden = zip(*(expert_forward_with_hidden(e, x) for e in self.experts))
        return torch.stack(outputs, dim=1), torch.stack(hidden, dim=1)

    def forward(self, x: torch.Tensor, gate_input: torch.Tensor | None = None) -> MoEOutput:
        gate_input = x if gate_input is None else gate_input
        constrained = self.training and self.constraint is not None
        expert_mask = self.constraint.mask() if constrained else None
        expert_outputs = None
        if getattr(self.gate, "needs_expert_hidden", False):
            expert_outputs, hidden = self.all_experts(x)
            logits = self.gate(gate_input, hidden)
            routing = self.router(logits, gate_input, expert_mask, self.collective)
            output = combine_dense(expert_outputs, routing)
        else:
            routing = self.router(self.gate(gate_input), gate_input, expert_mask, self.collective)
            if routing.slot_dispatch is not None:
                output = soft_dispatch(x, routing, self.experts)
            elif self.expert_stack is not None and self.routes_densely():
                expert_outputs = self.all_experts(x)[0]
                output = combine_dense(expert_outputs, routing)
            else:
                output = self.dispatcher(x, routing, self.experts)
        for shared in self.shared_experts:
            output = output + shared(x)
        if self.training and torch.is_grad_enabled():
            ran = routing.dispatch_mask.sum(dim=0) if expert_outputs is None else routing.dispatch_mask.shape[0]
            self.step_tokens += ran  # an in-place device add: no host read, capturable
        if self.training:
            self.router.record_load(routing)  # the bias moves once per step: update_balance_biases
        if constrained:
            # Every rank updates from the global batch, so constraint state stays identical across ranks.
            gates = at_least_float32(routing.gates.detach())
            num_tokens = torch.full((), float(gates.shape[0]), device=gates.device)  # a fill: no host copy
            self.constraint.update_from_importance(
                self.collective.sum_(gates.sum(dim=0)), self.collective.sum_(num_tokens)
            )
        return MoEOutput(output, routing, expert_outputs)


def router_weight_losses(model: nn.Module, weights: AuxWeights) -> dict[str, torch.Tensor]:
    """The auxiliary losses of the gates' own weights, summed over every MoE layer of ``model``:
    ``router_orthogonality_loss`` (:func:`~harness.moe.balancing.router_orthogonality_loss` of each gate's
    final linear layer, times its weight); empty when its weight is 0. A function of parameters, not of a
    batch: the same on every data-parallel rank."""
    if not weights.router_orthogonality:
        return {}
    gates = [m.gate for m in model.modules() if isinstance(m, MoELayer)]
    total = sum(router_orthogonality_loss(gate.fc.weight) for gate in gates)
    return {"router_orthogonality_loss": weights.router_orthogonality * total} if gates else {}


def update_balance_biases(model: nn.Module) -> None:
    """After an optimizer step: every MoE layer with auxiliary-loss-free balancing moves its bias from the
    step's loads, summed over its data-parallel ranks (so the bias stays identical on every rank)."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.router.apply_pending_load(module.collective)


def build_moe_layer(
    experts: Sequence[nn.Module],
    in_channels: int,
    expert_hidden_dim: int,
    spec: MoESpec | None = None,
    shared: Sequence[nn.Module] = (),
    **options: Any,
) -> MoELayer:
    """An :class:`MoELayer` over ``experts`` as ``spec`` describes it (:class:`~harness.moe.spec.MoESpec`;
    ``options`` override its fields, ``num_experts`` is ``len(experts)``), with ``shared`` experts (as many as
    ``spec.shared_experts``; the model builds them as it builds the routed ones).

    ``in_channels``: channels of the gate's input; ``expert_hidden_dim``: size of each expert's hidden
    features (used by the attentive gate only). ``dispatch``: ``loop`` (:class:`LocalDispatcher`, the
    reference), ``padded`` (:class:`PaddedDispatcher`), ``sorted`` (:class:`SortedDispatcher`) or ``auto``
    (padded when there is a capacity factor, which keeps its buffer at k/E of the batch per expert; else
    sorted, which needs none). Expert choice fixes every expert's slots, so ``auto`` dispatch is padded for it.
    """
    spec = (spec or MoESpec()).replace(num_experts=len(experts), **options)
    if len(shared) != spec.shared_experts:
        raise ValueError(f"{len(shared)} shared experts but the spec asks for {spec.shared_experts}")
    # Soft MoE scores slots, not experts: one logit per slot.
    outputs = spec.num_experts * (spec.slots_per_expert if spec.routing == "soft" else 1)
    gate = build_gate(
        spec.gate,
        in_channels,
        outputs,
        expert_hidden_dim,
        spec.gate_hidden_channels,
        spec.attention_dim,
        spec.gate_args,
    )
    router = TopKRouter(in_channels, spec)
    constraint = None
    if spec.constraint is not None:
        c = spec.constraint
        constraint = CONSTRAINTS[c.type](spec.num_experts, c.threshold, k=spec.k if c.limit == "e_minus_k" else None)
    dispatch = spec.dispatch
    if spec.routing == "expert_choice" and dispatch == "auto":
        dispatch = "padded"  # C slots per expert by construction: no padding to waste, no host sync
    dispatcher = build_dispatcher(dispatch, spec.capacity_factor)
    return MoELayer(experts, gate, router, constraint, dispatcher, shared_experts=shared)


DISPATCHES = ("auto", "loop", "padded", "sorted")


def build_dispatcher(dispatch: str, capacity_factor: float | None) -> Dispatcher:
    """The dispatcher named by ``dispatch`` (see :func:`build_moe_layer`)."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"unknown dispatch {dispatch!r}; valid: {', '.join(DISPATCHES)}")
    if dispatch == "loop":
        return LocalDispatcher()
    if dispatch == "padded" or (dispatch == "auto" and capacity_factor is not None):
        return PaddedDispatcher()
    # Without capacity, padding would give every expert the whole batch; sorted computes exactly the
    # loop's work, bit for bit, with one host read per layer instead of one per expert.
    return SortedDispatcher()
