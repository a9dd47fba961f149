"""Noisy top-k routing with hard-constraint masks and an optional per-expert capacity.

Everything here is sync-free tensor code: no ``.item()`` or ``.nonzero()``, so it can sit on the hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import at_least_float32
from .gates import global_avg_pool
from .spec import MoESpec

# The learned noise scale's offset: Shazeer et al. add it after the softplus (a floor that keeps the load
# estimator well defined), Pavlitska et al.'s code inside it.
NOISE_EPSILON = 1e-2
# ReLU routing's adaptive L1 coefficient stays within these bounds (its start, 1e-8 by default, is inside).
L1_COEFFICIENT_MIN, L1_COEFFICIENT_MAX = 1e-12, 1e4


@dataclass
class Routing:
    """What one MoE layer decided for a batch of N tokens and E experts.

    Attributes:
        logits: ``[N, E]`` clean gate logits, ``-inf`` for experts switched off by a hard constraint.
        noisy_logits: ``[N, E]`` logits with noise added (training with a noisy gate), else ``None``.
        noise_std: ``[N, E]`` the noise scale used, else ``None``.
        probs: ``[N, E]`` softmax over all experts of the logits used for selection (noisy if any).
        indices: ``[N, k]`` selected experts, best first.
        weights: ``[N, k]`` softmax over the selected logits (rows sum to 1; under expert choice the chosen
            pairs' scores, zero elsewhere).
        gates: ``[N, E]`` ``weights`` scattered to expert columns, zeros elsewhere.
        dispatch_mask: ``[N, E]`` bool, token n is processed by expert i (top-k minus capacity overflow).
        expert_mask: ``[E]`` bool, experts switched off for this batch, or ``None``.
        dropped: ``[]`` long, token-expert assignments dropped by the capacity limit (expert choice: tokens
            that no expert took).
        k: experts per token (expert choice: E, each token's row lists every expert, most with weight 0).
        capacity: slots per expert over the whole (global) batch when the routing fixes it (expert choice;
            top-k with a capacity factor over several ranks), else None (the dispatcher computes it from
            ``capacity_factor``).
        capacity_factor: the factor that limited this batch (the router's training or evaluation one);
            None = no limit, so a padded dispatcher gives every expert room for the whole batch.
        method: the router's method (``top_k``, ``expert_choice``, ``balanced_assignment``, ``soft``,
            ``relu``); under ``expert_choice``, ``soft`` and ``relu`` every token's row lists all E experts
            (k = E; under expert choice and ReLU routing most at weight 0; :attr:`lists_every_expert`).
        slot_dispatch, slot_combine: ``[N, E * p]`` Soft MoE's weights (``soft`` only, else None): slot s's
            input is ``sum_n slot_dispatch[n, s] x_n`` (each column sums to 1 over the batch), token n's
            output ``sum_s slot_combine[n, s] y_s`` (each row sums to 1); expert i holds slots
            ``i * p .. (i + 1) * p - 1``. ``logits`` are then the ``[N, E * p]`` slot logits.
        l1_coefficient: ``[]`` ReMoE's adaptive L1 coefficient (``relu`` only, else None);
            ``active_target``: the experts a token should use on average (the config's k) for its L1 term.
    """

    logits: torch.Tensor
    noisy_logits: torch.Tensor | None
    noise_std: torch.Tensor | None
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    gates: torch.Tensor
    dispatch_mask: torch.Tensor
    expert_mask: torch.Tensor | None
    dropped: torch.Tensor
    k: int
    capacity: int | None = None
    capacity_factor: float | None = None
    method: str = "top_k"
    slot_dispatch: torch.Tensor | None = None
    slot_combine: torch.Tensor | None = None
    l1_coefficient: torch.Tensor | None = None
    active_target: int | None = None

    @property
    def num_experts(self) -> int:
        return self.gates.shape[1]

    @property
    def expert_choice(self) -> bool:
        """The experts chose their tokens (:func:`expert_choice_mask`)."""
        return self.method == "expert_choice"

    @property
    def lists_every_expert(self) -> bool:
        """Each token's row lists all E experts, not its k choices: a token is dropped when no expert
        took it, not per missing assignment."""
        return self.method in ("expert_choice", "soft", "relu")


def concat_routings(routings: list[Routing]) -> Routing:
    """Several routings of one layer (e.g. one per FPN level, ``[N_l, E]`` each) as one over all their
    tokens (``[sum_l N_l, E]``), so a balancing loss sees them together; ``dropped`` is summed."""
    first = routings[0]
    if len(routings) == 1:
        return first

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(r, name) for r in routings]
        return None if parts[0] is None else torch.cat(parts, dim=0)

    return Routing(
        logits=cat("logits"),
        noisy_logits=cat("noisy_logits"),
        noise_std=cat("noise_std"),
        probs=cat("probs"),
        indices=cat("indices"),
        weights=cat("weights"),
        gates=cat("gates"),
        dispatch_mask=cat("dispatch_mask"),
        expert_mask=first.expert_mask,
        dropped=torch.stack([r.dropped for r in routings]).sum(),
        k=first.k,
        capacity_factor=first.capacity_factor,
        method=first.method,
        slot_dispatch=None,  # per-level slots mix each level's own tokens: no union of them exists
        slot_combine=None,
        l1_coefficient=first.l1_coefficient,
        active_target=first.active_target,
    )


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Tokens one expert may take: ``ceil(cf * k * N / E)`` (GShard / tutel)."""
    return math.ceil(capacity_factor * k * num_tokens / num_experts)


def capacity_keep_mask(
    indices: torch.Tensor, num_experts: int, capacity: int | torch.Tensor, ahead: torch.Tensor | None = None
) -> torch.Tensor:
    """Which assignments fit in each expert's capacity. ``indices: [N, k] -> keep [N, k]`` bool.

    Priority follows GShard: every token's first choice before any second choice, then batch order.
    ``ahead: [k, E]`` counts the assignments that come before this batch's choice-c assignments to expert
    e (other ranks' tokens, in expert parallelism); by default only this batch's earlier choices.
    """
    one_hot = F.one_hot(indices.t(), num_experts)  # [k, N, E]
    counts = one_hot.sum(dim=1)  # [k, E]
    if ahead is None:
        ahead = counts.cumsum(dim=0) - counts
    position = one_hot.cumsum(dim=1) - 1 + ahead[:, None, :]  # slot each assignment takes in its expert
    keep = ((position < capacity) & one_hot.bool()).any(dim=2)  # [k, N]
    return keep.t()


def global_capacity_keep_mask(
    indices: torch.Tensor, num_experts: int, k: int, capacity_factor: float, collective: Any
) -> torch.Tensor:
    """:func:`capacity_keep_mask` over the union of all ranks' batches (rank order), so each expert's
    capacity ``ceil(cf * k * N_total / E)`` holds across ranks. No host sync."""
    counts = F.one_hot(indices.t(), num_experts).sum(dim=1)  # [k, E]
    gathered = collective.all_gather(counts)  # [W, k, E]
    total = gathered.sum(dim=0)
    ahead = total.cumsum(dim=0) - total + gathered[: collective.rank].sum(dim=0)
    num_tokens = gathered[:, 0, :].sum()
    capacity = torch.ceil(capacity_factor * k * num_tokens / num_experts)
    return capacity_keep_mask(indices, num_experts, capacity, ahead)


def sinkhorn_log(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """Balanced-assignment scores (BASE layers, Lewis et al. 2021): Sinkhorn iterations in log space on the
    token x expert score matrix, alternately making every expert's column and every token's row sum to
    one, so the top-k of the result spreads tokens over experts as evenly as the scores allow.
    ``logits: [N, E]`` -> log of a matrix whose rows sum to 1 and columns to about ``N / E``. Experts
    switched off (``-inf`` columns) stay off."""
    log_p = at_least_float32(logits)
    live = torch.isfinite(log_p).any(dim=0, keepdim=True)  # an all -inf column would make nan
    for _ in range(iterations):
        column = torch.logsumexp(log_p, dim=0, keepdim=True)
        log_p = log_p - torch.where(live, column, torch.zeros_like(column))
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p


def expert_choice_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: :func:`expert_capacity`, at most N."""
    return min(num_tokens, expert_capacity(num_tokens, num_experts, k, capacity_factor))


def expert_choice_mask(scores: torch.Tensor, capacity: int, collective: Any = None) -> torch.Tensor:
    """Expert-choice routing (Zhou et al. 2022): every expert takes the ``capacity`` tokens with its highest
    scores in the batch, so a token may be taken by 0..E experts. ``scores: [N, E]`` -> ``[N, E]`` bool.

    With a data-parallel ``collective`` the batch is the union of all ranks' batches (the scores are
    all-gathered in rank order, equal N per rank) and each rank keeps its own rows; no host sync."""
    gathered, rank = scores.detach(), 0
    if collective is not None and collective.world_size > 1:
        rank = collective.rank
        gathered = collective.all_gather(gathered).reshape(-1, scores.shape[1])  # [W * N, E]
    chosen = gathered.topk(capacity, dim=0).indices  # [C, E]
    mask = torch.zeros_like(gathered, dtype=torch.bool).scatter(0, chosen, True)
    n = scores.shape[0]
    return mask[rank * n : (rank + 1) * n]


def every_expert_routing(
    logits: torch.Tensor, gates: torch.Tensor, dispatch_mask: torch.Tensor, method: str, **fields: Any
) -> Routing:
    """A :class:`Routing` whose rows list all E experts (k = E; expert choice, Soft MoE, ReLU routing):
    ``gates: [N, E]`` are also the weights (and the probs unless ``fields`` gives them), a token no expert
    took counts as dropped. ``fields``: the other :class:`Routing` fields (noise, mask, capacity, slots)."""
    n, num_experts = gates.shape
    fields = {"noisy_logits": None, "noise_std": None, "probs": gates, "expert_mask": None, **fields}
    return Routing(
        logits=logits,
        indices=torch.arange(num_experts, device=gates.device).expand(n, num_experts),
        weights=gates,
        gates=gates,
        dispatch_mask=dispatch_mask,
        dropped=(~dispatch_mask.any(dim=1)).sum(),
        k=num_experts,
        method=method,
        **fields,
    )


ROUTING_METHODS = ("top_k", "expert_choice", "balanced_assignment", "soft", "relu")


class TopKRouter(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017) with hard-constraint masks and capacity, as ``spec`` (a
    :class:`~harness.moe.spec.MoESpec`: E, k, ``noisy``, the capacity factors, ``routing`` (the method),
    ``sinkhorn_iterations``, ``bias_update_rate``) sets it; ``in_channels``: the gate input's channels.

    ``logits: [N, E]`` from a gate, ``x: [N, C, H, W]`` the gate's input (for the learned noise scale),
    ``expert_mask: [E]`` bool (True = off), ``collective``: the data-parallel group the capacity holds over
    (a :class:`~harness.moe.parallel.Collective`; None = this batch only) -> :class:`Routing`.

    The learned noise scale is Pavlitska et al.'s (their ``BaseGatingNetwork``): ``softplus(W GAP(x) + 0.01)``,
    W without bias at PyTorch's default init.

    ``spec.capacity_factor`` limits training batches, ``eval_capacity_factor`` evaluation ones (None = no
    dropping at evaluation, as DeepSpeed-MoE and tutel allow: a model is judged on every token's choice).

    ``spec.routing``, kept as ``method``: ``top_k`` (each token picks its k experts), ``expert_choice``
    (each expert picks its ``ceil(cf * N * k / E)`` tokens, cf = the factor in force or 1; at evaluation
    without an evaluation factor, the training one: expert choice has no form without a capacity) or
    ``balanced_assignment`` (top-k of :func:`sinkhorn_log` of the logits in training, plain top-k in
    evaluation). The combine weights are the softmax of the chosen experts' (noisy) logits; under expert
    choice, each chosen pair's softmax score over all experts.

    ``soft`` (Soft MoE, Puigcerver et al. 2024, arXiv 2308.00951): the gate's logits are ``[N, E * p]``, one
    column per slot (``spec.slots_per_expert`` = p); see :meth:`_soft`. ``relu`` (ReMoE, Wang et al. 2025,
    arXiv 2412.14711): gates ``ReLU(logits)``, every expert with a positive gate runs; see :meth:`_relu`.

    ``bias_update_rate`` (auxiliary-loss-free balancing, Wang et al. 2024): a per-expert bias buffer added
    to the logits for the top-k choice only; :meth:`update_bias` moves it by ``u * sign(mean load - load)``.
    """

    def __init__(self, in_channels: int, spec: MoESpec) -> None:
        super().__init__()
        num_experts, k = spec.num_experts, spec.k
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in 1..{num_experts}, got {k}")
        if spec.routing not in ROUTING_METHODS:
            raise ValueError(f"unknown routing method {spec.routing!r}; valid: {', '.join(ROUTING_METHODS)}")
        if spec.routing in ("soft", "relu") and spec.noisy:  # the config refuses it by name; so does the router
            raise ValueError(f"noisy gating does not apply to routing {spec.routing!r}")
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = spec.capacity_factor
        self.eval_capacity_factor = spec.eval_capacity_factor
        self.method = spec.routing
        self.sinkhorn_iterations = spec.sinkhorn_iterations
        self.bias_update_rate = spec.bias_update_rate
        if spec.bias_update_rate is not None:
            self.register_buffer("balance_bias", torch.zeros(num_experts))
            # This step's routed assignments per expert (all calls: e.g. every FPN level); not saved.
            self.register_buffer("pending_load", torch.zeros(num_experts), persistent=False)
            self.register_buffer("pending_live", torch.ones(num_experts, dtype=torch.bool), persistent=False)
        else:
            self.balance_bias = None
        self.l1_multiplier = spec.relu_l1_multiplier
        if spec.routing == "relu":
            # Saved with the model: a resumed run continues from the coefficient it had reached.
            self.register_buffer("l1_coefficient", torch.full((), float(spec.relu_l1_initial)))
            self.register_buffer("pending_active", torch.zeros(num_experts), persistent=False)
            self.register_buffer("pending_tokens", torch.zeros(()), persistent=False)
        else:
            self.l1_coefficient = None
        self.noise = nn.Linear(in_channels, num_experts, bias=False) if spec.noisy else None

    def noise_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The learned noise standard deviation. ``x: [N, C, H, W] -> [N, E]`` (positive)."""
        return F.softplus(at_least_float32(self.noise(global_avg_pool(x))) + NOISE_EPSILON)

    def forward(
        self, logits: torch.Tensor, x: torch.Tensor, expert_mask: torch.Tensor | None = None, collective: Any = None
    ) -> Routing:
        logits = at_least_float32(logits)  # routing decisions in fp32, also under autocast
        if self.method == "soft":
            return self._soft(logits)
        if self.method == "relu":
            return self._relu(logits, expert_mask)
        if expert_mask is not None:
            logits = logits.masked_fill(expert_mask, float("-inf"))
        noisy_logits = noise_std = None
        selection = logits
        if self.noise is not None and self.training:
            noise_std = self.noise_scale(x)
            noisy_logits = logits + torch.randn_like(logits) * noise_std
            selection = noisy_logits
        probs = torch.softmax(selection, dim=1)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.method == "expert_choice":
            factor = factor or self.capacity_factor or 1.0
            return self._expert_choice(
                logits, noisy_logits, noise_std, selection, probs, expert_mask, collective, factor
            )
        choice = selection  # what top-k ranks; the weights always come from `selection`
        if self.method == "balanced_assignment" and self.training:
            choice = sinkhorn_log(selection, self.sinkhorn_iterations)
        if self.balance_bias is not None:
            choice = choice + self.balance_bias
        indices = choice.topk(self.k, dim=1).indices
        top_logits = selection.gather(1, indices)
        weights = torch.softmax(top_logits, dim=1)
        gates = torch.zeros_like(selection).scatter(1, indices, weights)
        keep = torch.ones_like(indices, dtype=torch.bool)
        capacity = None
        if factor is not None and collective is not None and collective.world_size > 1:
            keep = global_capacity_keep_mask(indices, self.num_experts, self.k, factor, collective)
            # The limit holds over all ranks' tokens, so this rank may keep up to the global capacity for
            # one expert: a padded dispatcher needs that many slots (at most N), not the local share. Every
            # rank passes the same N (the harness's shards are equal length), so the total is W * N.
            capacity = expert_capacity(indices.shape[0] * collective.world_size, self.num_experts, self.k, factor)
        elif factor is not None:
            capacity = expert_capacity(indices.shape[0], self.num_experts, self.k, factor)
            keep = capacity_keep_mask(indices, self.num_experts, capacity)
        dispatch_mask = torch.zeros_like(selection, dtype=torch.bool).scatter(1, indices, keep)
        if expert_mask is not None:
            # With more than E - k experts off, top-k also picks switched-off ones (weight 0): they get no
            # tokens, as the reference runs only experts of positive weight.
            dispatch_mask = dispatch_mask & ~expert_mask
        dropped = (~keep).sum()
        return Routing(
            logits=logits,
            noisy_logits=noisy_logits,
            noise_std=noise_std,
            probs=probs,
            indices=indices,
            weights=weights,
            gates=gates,
            dispatch_mask=dispatch_mask,
            expert_mask=expert_mask,
            dropped=dropped,
            k=self.k,
            capacity=capacity,
            capacity_factor=factor,
        )

    def _expert_choice(
        self, logits, noisy_logits, noise_std, selection, probs, expert_mask, collective, factor
    ) -> Routing:
        """:func:`expert_choice_mask` on the softmax scores; gates = the scores of the chosen pairs, so the
        gate learns through them. Laid out as k = E assignments per token (zero weight where not taken)."""
        n, num_experts = selection.shape
        world = collective.world_size if collective is not None else 1
        capacity = expert_choice_capacity(n * world, num_experts, self.k, factor)
        dispatch_mask = expert_choice_mask(probs, capacity, collective)
        if expert_mask is not None:
            dispatch_mask = dispatch_mask & ~expert_mask
        return every_expert_routing(
            logits,
            probs * dispatch_mask,
            dispatch_mask,
            "expert_choice",
            noisy_logits=noisy_logits,
            noise_std=noise_std,
            probs=probs,
            expert_mask=expert_mask,
            capacity=capacity,
            capacity_factor=factor,
        )

    def _soft(self, logits: torch.Tensor) -> Routing:
        """Soft MoE over the batch's tokens: ``logits: [N, E * p]`` -> dispatch weights (softmax over the
        N tokens, per slot) and combine weights (softmax over the E * p slots, per token). Every expert
        works on its p slots, each a weighted mix of all tokens, so none is dropped or idle; ``gates [N, E]``
        is each token's combine weight summed over an expert's slots (rows sum to 1), which the balance
        and specialization metrics read."""
        combine = torch.softmax(logits, dim=1)
        gates = combine.view(logits.shape[0], self.num_experts, -1).sum(dim=2)
        return every_expert_routing(
            logits,
            gates,
            torch.ones_like(gates, dtype=torch.bool),
            "soft",
            slot_dispatch=torch.softmax(logits, dim=0),
            slot_combine=combine,
        )

    def _relu(self, logits: torch.Tensor, expert_mask: torch.Tensor | None) -> Routing:
        """ReMoE: ``gates = ReLU(logits)`` (no softmax, no top-k), expert i runs on token n when ``gates[n,
        i] > 0``; how many run is steered by the adaptive L1 term (:data:`Routing.l1_coefficient`, moved by
        :meth:`apply_pending_load`) towards k per token on average. ``logits: [N, E]``."""
        if expert_mask is not None:
            logits = logits.masked_fill(expert_mask, float("-inf"))
        gates = torch.relu(logits)
        return every_expert_routing(
            logits,
            gates,
            gates > 0,
            "relu",
            expert_mask=expert_mask,
            l1_coefficient=self.l1_coefficient.detach(),
            active_target=self.k,
        )

    @torch.no_grad()
    def record_load(self, routing: Routing) -> None:
        """Add a training batch's top-k assignments per expert (before capacity drops, as Wang et al. count
        them) to this step's load; experts switched off by a constraint are left out of the next update.
        Under ReLU routing: the batch's active token-expert pairs and tokens, for the L1 coefficient."""
        if self.l1_coefficient is not None:
            self.pending_active += routing.dispatch_mask.sum(dim=0).float()
            self.pending_tokens += routing.dispatch_mask.shape[0]
        if self.balance_bias is None:
            return
        self.pending_load += F.one_hot(routing.indices, self.num_experts).sum(dim=(0, 1)).float()
        if routing.expert_mask is not None:
            self.pending_live &= ~routing.expert_mask

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, live: torch.Tensor | None = None) -> None:
        """Auxiliary-loss-free balancing after a training step: ``b_i += u * sign(mean_load - load_i)`` over
        the experts in ``live`` (``[E]`` bool; default all; an expert a constraint switched off keeps its
        bias). ``load: [E]`` assignments per expert in the global batch (the same on every rank)."""
        if self.balance_bias is None:
            return
        live = torch.ones_like(load, dtype=torch.bool) if live is None else live
        mean = (load * live).sum() / live.sum().clamp_min(1)
        self.balance_bias += self.bias_update_rate * torch.sign(mean - load.float()) * live

    @torch.no_grad()
    def apply_pending_load(self, collective: Any) -> None:
        """:meth:`update_bias` from this step's recorded loads, summed over ``collective``'s ranks, then
        start the next step's count. Called once per optimizer step (``update_balance_biases``). Under ReLU
        routing it moves the L1 coefficient instead (:meth:`update_l1_coefficient`)."""
        if self.l1_coefficient is not None:
            active = collective.sum_(self.pending_active.clone())
            tokens = collective.sum_(self.pending_tokens.clone())
            self.update_l1_coefficient(active, tokens)
            self.pending_active.zero_()
            self.pending_tokens.zero_()
        if self.balance_bias is None:
            return
        load = collective.sum_(self.pending_load.clone())
        self.update_bias(load, self.pending_live)
        self.pending_load.zero_()
        self.pending_live.fill_(True)

    @torch.no_grad()
    def update_l1_coefficient(self, active: torch.Tensor, tokens: torch.Tensor) -> None:
        """ReMoE's adaptive L1 coefficient after a training step: ``lambda *= alpha ** sign(S_target - S)``
        with the step's sparsity ``S = 1 - sum(active) / (tokens * E)`` and ``S_target = 1 - k / E``: it
        grows while tokens use more than k experts on average and shrinks while they use fewer, within
        ``[L1_COEFFICIENT_MIN, L1_COEFFICIENT_MAX]``.
        ``active: [E]`` active pairs per expert, ``tokens: []`` tokens, both over the global batch; no
        step (``tokens`` 0) leaves it."""
        # S_target - S = (sum(active) - k * tokens) / (tokens * E): the sign from the counts, exact (a float
        # sparsity against 1 - k / E would let rounding move it at exactly k per token); 0 without tokens.
        direction = torch.sign(active.sum() - self.k * tokens)
        self.l1_coefficient *= self.l1_multiplier**direction
        # Bounded, so a long run of one-sided steps neither underflows to a value that rounding keeps from
        # growing again nor overflows to inf (whose product with a zero L1 term would be NaN).
        self.l1_coefficient.clamp_(L1_COEFFICIENT_MIN, L1_COEFFICIENT_MAX)
