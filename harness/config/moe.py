"""The MoE section of a run config (:class:`MoEConfig`): gate, routing, balancing losses and hard
constraints. Split from :mod:`.schema`, which assembles the whole :class:`~.schema.RunConfig`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..moe.balancing import AuxWeights
from ..moe.gates import GATES
from ..moe.spec import ConstraintSpec, CustomLoss, MoESpec
from ..plugins import check_arguments, check_name, check_own_arguments, is_import_path, load_object


class Strict(BaseModel):
    """Base: unknown keys are errors; numbers are not silently made from strings."""

    model_config = ConfigDict(extra="forbid")


class GateConfig(Strict):
    """The gate network (``type``) and Shazeer's noisy top-k on any gate (``noisy``, training only)."""

    type: str = Field(
        "gap_fc",
        description="gap_fc = GAP, linear; conv_gap_fc = Pavlitska's ConvGate (3x3 conv without padding "
        "or ReLU, GAP, linear); relu_gap_fc = ReLU, GAP, linear (what Pavlitska's FCGate computes); "
        "attentive = Krishnamurthy's attention over the experts' hidden features; or a gate class of your "
        "own by import path, package.module:Class (docs/extending.md)",
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="a gate of your own: its constructor's arguments after (in_channels, num_experts)",
    )
    noisy: bool = Field(
        False,
        description="Shazeer's noisy top-k: learned Gaussian noise on the logits in training, with scale "
        "softplus(W GAP(x) + 0.01), W at default init (Pavlitska's code)",
    )
    input: Literal["layer", "image"] = Field(
        "layer",
        description="resnet18_moe: gates see the MoE stage's input, or one shared 3x3 conv of the input "
        "image with a linear gate per layer (Pavlitska's global gating; needs type gap_fc)",
    )
    hidden_channels: int = Field(256, ge=1, description="conv_gap_fc: channels of the 3x3 conv")
    attention_dim: int | None = Field(
        None, ge=1, description="attentive: query/key size d; null = the experts' hidden size (the reference)"
    )

    @field_validator("type")
    @classmethod
    def _known_gate(cls, value: str) -> str:
        return check_name(value, GATES, "gate")

    @model_validator(mode="after")
    def _gate_arguments(self) -> GateConfig:
        self.args = check_own_arguments(self.type, self.args, 2, "gate")
        return self


class SampleSimilarityConfig(Strict):
    """Krishnamurthy et al.'s sample-similarity loss ``beta_s * S_same - beta_d * S_diff / N^2``."""

    beta_s: float = Field(0.0, ge=0, description="weight of S_same, the gate-weighted distance of inputs of one expert")
    beta_d: float = Field(0.0, ge=0, description="weight of S_diff, the same across different experts (subtracted)")
    distance: Literal["max_normalized", "raw"] = Field(
        "max_normalized",
        description="pairwise input distances divided by their batch maximum (reference code "
        "at HEAD) or raw (the reference commit that produced the MNIST / FashionMNIST tables)",
    )


class CustomLossConfig(Strict):
    """A balancing loss of your own (docs/extending.md): ``function(routing, inputs, **args) -> scalar`` by
    import path, times ``weight``, in the loss dict as ``<name>_loss``."""

    function: str = Field(description="import path of the loss function, package.module:name")
    weight: float = Field(ge=0, description="its weight in the total loss")
    args: dict[str, Any] = Field(
        default_factory=dict, description="its keyword arguments after (routing, inputs), checked against it"
    )
    name: str | None = Field(
        None, pattern=r"^[a-z][a-z0-9_]*$", description="its name in the tables; null = the function's name"
    )

    @model_validator(mode="after")
    def _resolves(self) -> CustomLossConfig:
        self.args = check_arguments(load_object(self.function), self.args, 2, self.function)
        return self

    @property
    def key(self) -> str:
        """The loss dict's key: ``<name>_loss`` (a name already ending in ``_loss`` is kept)."""
        name = self.name or self.function.rpartition(":")[2].rpartition(".")[2].lower()
        return name if name.endswith("_loss") else f"{name}_loss"


# The built-in auxiliary losses' keys in the loss dict, which a custom loss may not take.
BUILT_IN_LOSS_KEYS = {
    "task_loss",
    "importance_loss",
    "load_loss",
    "kl_uniform_loss",
    "switch_loss",
    "z_loss",
    "sample_similarity_loss",
    "relu_l1_loss",
    "router_orthogonality_loss",
}


class LossesConfig(Strict):
    """Weights of the auxiliary balancing losses (0 = off)."""

    importance: float = Field(0.0, ge=0, description="weight of CV(importance)^2 (Shazeer et al.)")
    load: float = Field(0.0, ge=0, description="weight of CV(load)^2 (smooth estimate under noise, else hard count)")
    kl_uniform: float = Field(0.0, ge=0, description="weight of KL(importance distribution || uniform)")
    switch: float = Field(0.0, ge=0, description="weight of the Switch Transformer loss E * sum_i f_i P_i")
    z_loss: float = Field(
        0.0, ge=0, description="router z-loss weight (Zoph et al. 2022): w * mean (logsumexp logits)^2"
    )
    sample_similarity: SampleSimilarityConfig = Field(
        SampleSimilarityConfig(), description="Krishnamurthy et al.'s sample-similarity loss"
    )
    router_orthogonality: float = Field(
        0.0,
        ge=0,
        description="weight of SimBal's ||R^T R - I||_1 on each gate's final linear layer (Omi et al. 2025); "
        "not for the attentive gate",
    )
    scope: Literal["global_batch", "micro_batch"] = Field(
        "global_batch",
        description="where the balance losses' statistics are taken: global_batch = summed over data-parallel "
        "ranks before the loss (Qwen's global-batch balancing); micro_batch = each rank's own batch "
        "(one process: the same)",
    )
    custom: list[CustomLossConfig] = Field(
        default_factory=list, description="balancing losses of your own, by import path (docs/extending.md)"
    )
    detection_scope: Literal["all_levels", "per_level"] = Field(
        "all_levels",
        description="retinanet_moe: one loss per subnet over the gates of all FPN levels together "
        "(reference code) or one per level, summed",
    )

    @model_validator(mode="after")
    def _custom_keys_unique(self) -> LossesConfig:
        seen = set(BUILT_IN_LOSS_KEYS)
        for i, custom in enumerate(self.custom):
            if custom.key in seen:
                raise ValueError(f"custom.{i}: the key {custom.key!r} is taken; give this loss another name")
            seen.add(custom.key)
        return self

    def aux_weights(self) -> AuxWeights:
        """These weights as the MoE layer's :class:`~harness.moe.AuxWeights`."""
        s = self.sample_similarity
        # named as AuxWeights' fields
        weights = self.model_dump(exclude={"sample_similarity", "detection_scope", "custom"})
        custom = tuple(CustomLoss(c.key, c.function, c.weight, tuple(sorted(c.args.items()))) for c in self.custom)
        return AuxWeights(**weights, beta_s=s.beta_s, beta_d=s.beta_d, similarity_distance=s.distance, custom=custom)


class ReluRoutingConfig(Strict):
    """ReMoE's adaptive L1 coefficient: it starts at ``l1_initial`` and after every training step is
    multiplied by ``l1_multiplier`` while tokens use more than k experts on average, divided by it while
    they use fewer (the reference's defaults: 1e-8 and 1.2)."""

    l1_initial: float = Field(1e-8, gt=0, description="the L1 coefficient at step 0")
    l1_multiplier: float = Field(1.2, gt=1, description="its factor per training step, up or down")


class RoutingConfig(Strict):
    """How tokens and experts are matched: ``top_k`` (each token its k best experts), ``expert_choice`` (each
    expert its ``ceil(cf * N * k / E)`` best tokens of the batch; Zhou et al. 2022), ``balanced_assignment``
    (top-k of Sinkhorn-balanced scores in training, plain top-k in evaluation; BASE layers, Lewis et al.
    2021), ``soft`` (Soft MoE, Puigcerver et al. 2024: each expert's p slots mix all of the batch's tokens)
    or ``relu`` (ReMoE, Wang et al. 2025: ReLU gates, sparsity held at k experts per token on average by an
    adaptive L1 term)."""

    type: Literal["top_k", "expert_choice", "balanced_assignment", "soft", "relu"] = Field(
        "top_k",
        description="top_k: each token picks its k experts; expert_choice: each expert picks its tokens; "
        "balanced_assignment: top-k of Sinkhorn-balanced scores in training; soft: Soft MoE slots over the "
        "batch's samples; relu: ReMoE's ReLU gates with an adaptive L1 term",
    )
    sinkhorn_iterations: int = Field(10, ge=1, description="balanced_assignment: Sinkhorn iterations")
    slots_per_expert: int = Field(
        4,
        ge=1,
        description="soft: slots per expert p; each expert runs on p mixes per batch (top-k runs k * N / E "
        "samples per expert: p = k * batch_size / E matches its compute)",
    )
    relu: ReluRoutingConfig = Field(ReluRoutingConfig(), description="relu: the adaptive L1 coefficient")

    @model_validator(mode="after")
    def _options_of_another_method(self) -> RoutingConfig:
        for name, method in (
            ("sinkhorn_iterations", "balanced_assignment"),
            ("slots_per_expert", "soft"),
            ("relu", "relu"),
        ):
            # Against the default, not the fields a file set: a recorded config lists every field.
            if getattr(self, name) != type(self).model_fields[name].default and self.type != method:
                raise ValueError(f"{name}: is for type {method}, not {self.type}")
        return self


class BiasBalancingConfig(Strict):
    """Auxiliary-loss-free balancing (Wang et al. 2024, DeepSeek-V3): a per-expert bias on the logits for the
    top-k choice only, ``b_i += update_rate * sign(mean load - load_i)`` after every training step."""

    update_rate: float = Field(1e-3, gt=0, description="u, the bias step per training step")


class ConstraintConfig(Strict):
    """A hard constraint: ``relative_importance`` or ``mean_importance`` with its threshold (> 0)."""

    type: Literal["relative_importance", "mean_importance"] = Field(
        description="relative_importance: R_i += (Imp_i - N/E) / (N/E) per step; mean_importance: running mean "
        "m_i of Imp_i / N"
    )
    threshold: float = Field(gt=0, description="expert i is off while R_i or m_i - 1/E exceeds it")
    limit: Literal["none", "e_minus_k"] = Field(
        "none",
        description="none: every expert over its threshold is off, so a token may get fewer than k experts "
        "(Pavlitska's code); e_minus_k: at most E - k off (the most violating), every token keeps k experts",
    )


class MoEConfig(Strict):
    """Where the experts sit and how they are balanced."""

    num_experts: int = Field(4, ge=1, description="E; 1 is the single-expert baseline")
    k: int = Field(2, ge=1, description="experts per token (top-k); at most num_experts")
    position: list[int] = Field(
        default_factory=lambda: [4], min_length=1, description="resnet18_moe: MoE stage(s), 1..4 (an int or a list)"
    )
    expert_width: int | None = Field(
        None,
        ge=1,
        description="inner width of each expert; null = the reference's "
        "25, 50, 90, 180 by stage (180 for retinanet_moe layer4)",
    )
    residual: bool = Field(False, description="resnet18_moe: a shortcut (identity or 1x1 conv + BN) around each MoE")
    gate: GateConfig = Field(GateConfig(), description="the gate network and its noise")
    capacity_factor: float | None = Field(
        None,
        gt=0,
        description="each expert takes at most ceil(cf * k * N / E) "
        "tokens, the rest are dropped; null = no limit (expert_choice: cf 1)",
    )
    eval_capacity_factor: float | None = Field(
        None, gt=0, description="the same limit at evaluation; null = no dropping (expert_choice: the training factor)"
    )
    dispatch: Literal["auto", "loop", "padded", "sorted"] = Field(
        "auto",
        description="loop = reference; padded = static-shape fast path; sorted = exact slices, one host read "
        "per layer; auto = padded with a capacity_factor or expert_choice routing, else sorted",
    )
    losses: LossesConfig = Field(LossesConfig(), description="weights of the auxiliary balancing losses (0 = off)")
    constraint: ConstraintConfig | None = Field(None, description="a hard balancing constraint; null = none")
    routing: RoutingConfig = Field(RoutingConfig(), description="how tokens and experts are matched")
    bias_balancing: BiasBalancingConfig | None = Field(None, description="auxiliary-loss-free balancing; null = off")
    shared_experts: int = Field(
        0,
        ge=0,
        description="experts every token passes through beside the routed ones, their outputs added ungated "
        "(DeepSeekMoE); resnet18_moe and retinanet_moe with moe_at layer4",
    )

    @field_validator("position", mode="before")
    @classmethod
    def _scalar_position(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @field_validator("position")
    @classmethod
    def _position_range(cls, value: list[int]) -> list[int]:
        bad = [p for p in value if not 1 <= p <= 4]
        if bad:
            raise ValueError(f"stage positions must be in 1..4, got {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"stage positions must be distinct, got {value}")
        return sorted(value)

    def spec(self) -> MoESpec:
        """This section as the models' and layers' one :class:`~harness.moe.MoESpec`."""
        return MoESpec(
            num_experts=self.num_experts,
            k=self.k,
            gate=self.gate.type,
            gate_args=tuple(sorted(self.gate.args.items())),
            noisy=self.gate.noisy,
            gate_hidden_channels=self.gate.hidden_channels,
            attention_dim=self.gate.attention_dim,
            routing=self.routing.type,
            sinkhorn_iterations=self.routing.sinkhorn_iterations,
            slots_per_expert=self.routing.slots_per_expert,
            relu_l1_initial=self.routing.relu.l1_initial,
            relu_l1_multiplier=self.routing.relu.l1_multiplier,
            bias_update_rate=self.bias_balancing.update_rate if self.bias_balancing else None,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            dispatch=self.dispatch,
            constraint=ConstraintSpec(**self.constraint.model_dump()) if self.constraint else None,
            aux_weights=self.losses.aux_weights(),
            aux_scope=self.losses.detection_scope,
            shared_experts=self.shared_experts,
        )

    @model_validator(mode="after")
    def _k_at_most_e(self) -> MoEConfig:
        if self.k > self.num_experts:
            raise ValueError(f"k={self.k} exceeds num_experts={self.num_experts}")
        return self

    @model_validator(mode="after")
    def _expert_choice_combinations(self) -> MoEConfig:
        # Under expert choice every expert is full by construction: a bias on the token's choice is never
        # used, and Shazeer's load estimator (for top-k under noise) is constant.
        if self.routing.type == "expert_choice" and self.bias_balancing is not None:
            raise ValueError("bias_balancing: has no effect under routing.type expert_choice (experts choose tokens)")
        if self.losses.router_orthogonality and is_import_path(self.gate.type):
            raise ValueError(
                "losses.router_orthogonality: acts on a built-in gate's final linear layer, not on a gate of your own"
            )
        if self.losses.router_orthogonality and self.gate.type == "attentive":
            raise ValueError(
                "losses.router_orthogonality: the attentive gate has no router matrix (its logits are attention "
                "scores); use gap_fc, conv_gap_fc or relu_gap_fc"
            )
        if self.routing.type == "expert_choice" and self.losses.load:
            raise ValueError("losses.load: Shazeer's load estimator is for top-k routing, not expert_choice")
        return self

    @model_validator(mode="after")
    def _soft_and_relu_combinations(self) -> MoEConfig:
        # Soft MoE drops nothing and idles no expert; ReMoE sets its own sparsity. Options that choose,
        # limit or switch off experts have nothing to act on under them.
        method = self.routing.type
        if method not in ("soft", "relu"):
            return self
        clashes = {
            "gate.noisy": self.gate.noisy,
            "capacity_factor": self.capacity_factor is not None,
            "eval_capacity_factor": self.eval_capacity_factor is not None,
            "constraint": self.constraint is not None,
            "bias_balancing": self.bias_balancing is not None,
            "losses.load": bool(self.losses.load),
        }
        if method == "soft":
            clashes["gate.type attentive"] = self.gate.type == "attentive"  # it scores experts, not slots
        for name, present in clashes.items():
            if present:
                raise ValueError(f"moe.{name}: not with routing.type {method}")
        return self
