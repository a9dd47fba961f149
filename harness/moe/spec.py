"""One frozen description of a study's MoE layers (:class:`MoESpec`): what the gate, router, constraint,
dispatcher and auxiliary losses of every layer are. The config builds it once from the validated study
(``MoEConfig.spec()``); models hand it to :func:`~harness.moe.layer.build_moe_layer` unchanged. Values are
checked by the config schema, not here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CustomLoss:
    """A balancing loss defined outside ``harness`` (docs/extending.md): ``function`` (an import path,
    ``package.module:name``) is called as ``function(routing, inputs, **args)`` and returns a scalar, which
    enters the loss dict as ``key`` times ``weight``. ``args``: ``(name, value)`` pairs."""

    key: str
    function: str
    weight: float
    args: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class AuxWeights:
    """The weight of each auxiliary loss (0 = off; ``router_orthogonality`` acts on the gates' weights, the
    others on a batch's routing), the sample-similarity variant (see
    :func:`~harness.moe.balancing.sample_similarity_loss`) and ``scope``: where the balance statistics are
    taken, ``global_batch`` (summed over data-parallel ranks before the loss; Qwen's global-batch
    balancing, arXiv 2501.11873) or ``micro_batch`` (each rank's own batch). One process: the same.
    ``custom``: losses defined outside ``harness`` (:class:`CustomLoss`)."""

    importance: float = 0.0
    load: float = 0.0
    kl_uniform: float = 0.0
    switch: float = 0.0
    beta_s: float = 0.0
    beta_d: float = 0.0
    z_loss: float = 0.0
    similarity_distance: str = "max_normalized"
    scope: str = "global_batch"
    router_orthogonality: float = 0.0
    custom: tuple[CustomLoss, ...] = ()


@dataclass(frozen=True)
class ConstraintSpec:
    """A hard constraint: ``type`` (``relative_importance`` or ``mean_importance``), its ``threshold``, and
    ``limit`` (``none``: every expert over it is off; ``e_minus_k``: at most E - k off)."""

    type: str
    threshold: float
    limit: str = "none"


@dataclass(frozen=True)
class MoESpec:
    """Every MoE layer option a study sets.

    Attributes:
        num_experts: E. k: experts per token (top-k).
        gate: the gate's registry name (:data:`~harness.moe.gates.GATES`) or an import path (a gate class
            defined outside ``harness``, built with ``gate_args``, ``(name, value)`` pairs); ``noisy``:
            Shazeer's noisy top-k with Pavlitska's noise scale; ``gate_hidden_channels``: ``conv_gap_fc``'s conv width;
            ``attention_dim``: the attentive gate's query/key size (None = the experts' hidden size).
        routing: ``top_k``, ``expert_choice``, ``balanced_assignment``, ``soft`` (Soft MoE) or ``relu``
            (ReMoE); ``sinkhorn_iterations`` for balanced assignment; ``slots_per_expert``: Soft MoE's p;
            ``relu_l1_initial`` and ``relu_l1_multiplier``: ReMoE's adaptive L1 coefficient (its start and its
            factor per step); ``bias_update_rate``: auxiliary-loss-free balancing's step (None = off).
        capacity_factor, eval_capacity_factor: the token limit per expert in training and evaluation (None =
            no limit). dispatch: ``auto``, ``loop``, ``padded`` or ``sorted``.
        constraint: a :class:`ConstraintSpec` or None.
        aux_weights: the auxiliary losses' weights; ``aux_scope``: RetinaNet's loss over all FPN levels of a
            subnet at once (``all_levels``) or per level (``per_level``).
        shared_experts: experts beside the routed ones that every token passes through (DeepSeekMoE); the
            models build them, as many as this says.
    """

    num_experts: int = 4
    k: int = 2
    gate: str = "gap_fc"
    gate_args: tuple[tuple[str, Any], ...] = ()
    noisy: bool = False
    gate_hidden_channels: int = 256
    attention_dim: int | None = None
    routing: str = "top_k"
    sinkhorn_iterations: int = 10
    slots_per_expert: int = 4
    relu_l1_initial: float = 1e-8
    relu_l1_multiplier: float = 1.2
    bias_update_rate: float | None = None
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    dispatch: str = "auto"
    constraint: ConstraintSpec | None = None
    aux_weights: AuxWeights = field(default_factory=AuxWeights)
    aux_scope: str = "all_levels"
    shared_experts: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.constraint, dict):  # a plain mapping, as YAML and tests write it
            object.__setattr__(self, "constraint", ConstraintSpec(**self.constraint))

    def replace(self, **options: Any) -> MoESpec:
        """A copy with ``options`` (field names) changed."""
        return dataclasses.replace(self, **options) if options else self


def resolve_spec(spec: MoESpec | None, options: dict[str, Any], default: MoESpec | None = None) -> MoESpec:
    """``spec`` (else ``default``, else :class:`MoESpec`'s defaults) with ``options`` applied: what a model
    constructor does with its ``moe=`` argument and its MoE keyword options."""
    return (spec or default or MoESpec()).replace(**options)
