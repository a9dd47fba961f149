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

from .gates import global_avg_pool

# The learned noise scale's offset: Shazeer et al. add it after the softplus (a floor that keeps the load
# estimator well defined), Pavlitska et al.'s code inside it.
NOISE_EPSILON = 1e-2


@dataclass
class Routing:
    """What one MoE layer decided for a batch of N tokens and E experts.

    Attributes:
        logits: ``[N, E]`` clean gate logits, ``-inf`` for experts switched off by a hard constraint.
        noisy_logits: ``[N, E]`` logits with noise added (training with a noisy gate), else ``None``.
        noise_std: ``[N, E]`` the noise scale used, else ``None``.
        probs: ``[N, E]`` softmax over all experts of the logits used for selection (noisy if any).
        indices: ``[N, k]`` selected experts, best first.
        weights: ``[N, k]`` softmax over the selected logits (rows sum to 1).
        gates: ``[N, E]`` ``weights`` scattered to expert columns, zeros elsewhere.
        dispatch_mask: ``[N, E]`` bool, token n is processed by expert i (top-k minus capacity overflow).
        expert_mask: ``[E]`` bool, experts switched off for this batch, or ``None``.
        dropped: ``[]`` long, token-expert assignments dropped by the capacity limit.
        k: experts per token.
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

    @property
    def num_experts(self) -> int:
        return self.gates.shape[1]


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
        logits=cat("logits"), noisy_logits=cat("noisy_logits"), noise_std=cat("noise_std"), probs=cat("probs"),
        indices=cat("indices"), weights=cat("weights"), gates=cat("gates"), dispatch_mask=cat("dispatch_mask"),
        expert_mask=first.expert_mask, dropped=torch.stack([r.dropped for r in routings]).sum(), k=first.k,
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


NOISE_FORMS = ("pavlitska", "shazeer")


class TopKRouter(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017) with hard-constraint masks and capacity.

    ``logits: [N, E]`` from a gate, ``x: [N, C, H, W]`` the gate's input (for the learned noise scale),
    ``expert_mask: [E]`` bool (True = off), ``collective``: the data-parallel group the capacity holds over
    (a :class:`~harness.moe.parallel.Collective`; None = this batch only) -> :class:`Routing`.

    ``noise_form`` sets the learned noise scale: ``pavlitska`` (their ``BaseGatingNetwork``:
    ``softplus(W GAP(x) + 0.01)``, W without bias at PyTorch's default init) or ``shazeer``
    (``softplus(W GAP(x) + b) + 0.01`` with W and b zero-initialised, as Shazeer et al.).
    """

    def __init__(
        self,
        in_channels: int,
        num_experts: int,
        k: int,
        noisy: bool = False,
        capacity_factor: float | None = None,
        noise_form: str = "pavlitska",
    ) -> None:
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in 1..{num_experts}, got {k}")
        if noise_form not in NOISE_FORMS:
            raise ValueError(f"unknown noise form {noise_form!r}; valid: {', '.join(NOISE_FORMS)}")
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        self.noise_form = noise_form
        self.noise = None
        if noisy and noise_form == "shazeer":
            self.noise = nn.Linear(in_channels, num_experts)
            nn.init.zeros_(self.noise.weight)
            nn.init.zeros_(self.noise.bias)
        elif noisy:
            self.noise = nn.Linear(in_channels, num_experts, bias=False)

    def noise_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The learned noise standard deviation. ``x: [N, C, H, W] -> [N, E]`` (positive)."""
        projected = self.noise(global_avg_pool(x)).float()
        if self.noise_form == "shazeer":
            return F.softplus(projected) + NOISE_EPSILON
        return F.softplus(projected + NOISE_EPSILON)

    def forward(
        self, logits: torch.Tensor, x: torch.Tensor, expert_mask: torch.Tensor | None = None, collective: Any = None
    ) -> Routing:
        logits = logits.float()  # routing decisions in fp32, also under autocast
        if expert_mask is not None:
            logits = logits.masked_fill(expert_mask, float("-inf"))
        noisy_logits = noise_std = None
        selection = logits
        if self.noise is not None and self.training:
            noise_std = self.noise_scale(x)
            noisy_logits = logits + torch.randn_like(logits) * noise_std
            selection = noisy_logits
        probs = torch.softmax(selection, dim=1)
        top_logits, indices = selection.topk(self.k, dim=1)
        weights = torch.softmax(top_logits, dim=1)
        gates = torch.zeros_like(selection).scatter(1, indices, weights)
        keep = torch.ones_like(indices, dtype=torch.bool)
        if self.capacity_factor is not None and collective is not None and collective.world_size > 1:
            keep = global_capacity_keep_mask(indices, self.num_experts, self.k, self.capacity_factor, collective)
        elif self.capacity_factor is not None:
            capacity = expert_capacity(indices.shape[0], self.num_experts, self.k, self.capacity_factor)
            keep = capacity_keep_mask(indices, self.num_experts, capacity)
        dispatch_mask = torch.zeros_like(selection, dtype=torch.bool).scatter(1, indices, keep)
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
        )
