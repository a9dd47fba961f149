"""Balancing expert utilization: auxiliary losses (soft constraints, pure functions) and hard
constraints (small stateful modules that switch over-used experts off).

Conventions: ``gates`` is the ``[N, E]`` matrix after top-k (zeros outside the top k, rows sum to 1),
``probs`` the dense ``[N, E]`` softmax. Losses are returned unweighted; callers multiply by their weight
(see :func:`weighted_aux_losses`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import nn

from ..plugins import load_object
from ..precision import at_least_float32
from .routing import Routing
from .spec import AuxWeights

# Shazeer et al.'s guard against a zero mean in CV^2.
CV_EPSILON = 1e-10


def importance(gates: torch.Tensor) -> torch.Tensor:
    """``Imp_i = sum_n gates[n, i]``. ``[N, E] -> [E]``."""
    return gates.sum(dim=0)


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation with the unbiased variance (as the reference code). ``[E] -> []``."""
    values = at_least_float32(values)
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + CV_EPSILON)


def importance_loss(gates: torch.Tensor) -> torch.Tensor:
    """``CV(Imp)^2`` (Shazeer et al.). ``gates: [N, E] -> []``; 0 for perfectly even use."""
    return cv_squared(importance(gates))


def prob_in_top_k(
    clean_logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: torch.Tensor, k: int
) -> torch.Tensor:
    """Probability that expert i is in the top k for token n when its noise is resampled, the others fixed.

    All ``[N, E] -> [N, E]``. Switched-off experts (``-inf``) get probability 0.
    """
    num_experts = clean_logits.shape[1]
    if k >= num_experts:
        return torch.ones_like(clean_logits)
    # -inf (switched-off experts) would give inf - inf = nan below; a huge finite floor gives Phi(...) = 0.
    floor = -1e9
    clean = at_least_float32(clean_logits).clamp_min(floor)
    noisy = at_least_float32(noisy_logits).clamp_min(floor)
    top = noisy.topk(k + 1, dim=1).values
    threshold_if_in = top[:, k : k + 1]  # an expert inside the top k must beat the (k+1)-th value
    threshold_if_out = top[:, k - 1 : k]  # one outside must beat the k-th
    is_in = noisy > threshold_if_in
    normal = torch.distributions.Normal(0.0, 1.0)
    prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
    prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out)


def load(
    gates: torch.Tensor,
    clean_logits: torch.Tensor | None = None,
    noisy_logits: torch.Tensor | None = None,
    noise_std: torch.Tensor | None = None,
    k: int | None = None,
) -> torch.Tensor:
    """Tokens per expert, ``[E]``: Shazeer's smooth estimate under noise when the noise tensors are
    given (differentiable), else the hard count of non-zero gates (not differentiable)."""
    if noisy_logits is None or noise_std is None or clean_logits is None or k is None:
        return (gates > 0).float().sum(dim=0)
    return prob_in_top_k(clean_logits, noisy_logits, noise_std, k).sum(dim=0)


def load_loss(
    gates: torch.Tensor,
    clean_logits: torch.Tensor | None = None,
    noisy_logits: torch.Tensor | None = None,
    noise_std: torch.Tensor | None = None,
    k: int | None = None,
) -> torch.Tensor:
    """``CV(Load)^2`` with Shazeer's smooth load estimator. All tensors ``[N, E]`` -> ``[]``."""
    return cv_squared(load(gates, clean_logits, noisy_logits, noise_std, k))


def kl_uniform_loss(gates: torch.Tensor) -> torch.Tensor:
    """KL divergence (nats) of the importance distribution ``p = Imp / N`` to uniform:
    ``sum_i p_i log(p_i E)``. ``[N, E] -> []``; 0 for even use."""
    return _kl_uniform(importance(at_least_float32(gates)), gates.shape[0])


def _kl_uniform(importance_sum: torch.Tensor, num_tokens: torch.Tensor | int) -> torch.Tensor:
    p = importance_sum / num_tokens
    return torch.special.xlogy(p, p * p.shape[0]).sum()


def switch_loss(gates: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss ``E * sum_i f_i P_i``: ``f`` = share of routed assignments per expert,
    ``P`` = mean router probability. Both ``[N, E] -> []``; 1 for even use."""
    return _switch(load(gates), at_least_float32(probs).sum(dim=0), gates.shape[0])


def _switch(routed: torch.Tensor, prob_sum: torch.Tensor, num_tokens: torch.Tensor | int) -> torch.Tensor:
    f = routed / routed.sum().clamp_min(1.0)
    return routed.shape[0] * (f * prob_sum / num_tokens).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE): ``mean_n (logsumexp_i logits_ni)^2``; keeps the router's
    logits small so its softmax stays well conditioned. Experts switched off (``-inf``) drop out of the
    logsumexp. ``logits: [N, E] -> []``."""
    return _z_sum(logits) / logits.shape[0]


def router_orthogonality_loss(weight: torch.Tensor) -> torch.Tensor:
    """SimBal's router orthogonality loss (Omi et al. 2025, "Load Balancing Mixture of Experts with
    Similarity Preserving Routers", arXiv 2506.14038): ``||R^T R - I_E||_1`` for the router matrix ``R``
    (features -> E logits), the sum of the absolute entries. Near-orthogonal expert directions keep the
    router's map close to an isometry, so similar inputs get similar expert scores. ``weight: [E, D]`` (a
    linear layer's weight, ``R = weight^T``) -> ``[]``."""
    w = at_least_float32(weight)
    return (w @ w.t() - torch.eye(w.shape[0], dtype=w.dtype, device=w.device)).abs().sum()


def relu_l1_loss(gates: torch.Tensor, k: int) -> torch.Tensor:
    """ReMoE's load-balanced L1 term on ReLU gates (Wang et al. 2025, arXiv 2412.14711, their reference
    code): ``E * sum_i (P_i / N) * (f_i / (N k))`` with ``P_i = sum_n gates[n, i]`` and ``f_i`` the tokens
    expert i runs on. The L1 norm of the gates, each expert's share weighted by its load, so busy experts
    are pushed hardest towards zero. ``gates: [N, E]`` (non-negative), ``k``: the target experts per token
    -> ``[]``; the router's adaptive coefficient multiplies it (:func:`weighted_aux_losses`)."""
    g = at_least_float32(gates)
    return _relu_l1(g.sum(dim=0), (g > 0).to(g.dtype).sum(dim=0), g.shape[0], k)


def _relu_l1(prob_sum: torch.Tensor, routed: torch.Tensor, num_tokens: torch.Tensor | int, k: int) -> torch.Tensor:
    return prob_sum.shape[0] * (prob_sum / num_tokens * routed / (num_tokens * k)).sum()


def _z_sum(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(at_least_float32(logits), dim=1).pow(2).sum()


SIMILARITY_DISTANCES = ("max_normalized", "raw")


def sample_similarity_loss(
    inputs: torch.Tensor,
    probs: torch.Tensor,
    beta_s: float,
    beta_d: float,
    distance: str = "max_normalized",
    total_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Krishnamurthy et al.'s data-driven regulariser ``beta_s * S_same - beta_d * S_diff``.

    ``d_nm = ||x_n - x_m||`` on flattened inputs, divided by ``max d`` (``distance="max_normalized"``, the
    reference's code at HEAD) or not (``"raw"``, the code that produced its MNIST and FashionMNIST tables);
    ``S_same = sum_i sum_nm p_i(x_n) p_i(x_m) d_nm / E`` and ``S_diff = sum_{i!=j} sum_nm p_i(x_n) p_j(x_m) d_nm
    / (E^2 - E)``. Only the ``beta_d`` term is divided by ``N^2``, as the reference's ``reg_similarity`` line
    does (operator precedence; its published betas were chosen under it). Minimising it sends distant
    samples to different experts.
    ``inputs: [N, ...]``, ``probs: [N, E] -> []``.

    In data parallelism each rank sees only the N^2 pairs of its own batch: ``total_tokens`` (the global
    batch's size N_g) scales the reference's unnormalised ``beta_s`` sum by ``(N_g / N)^2``, the expected sum
    over the global batch's pairs, so the term's weight does not shrink with the number of ranks.
    """
    if distance not in SIMILARITY_DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; valid: {', '.join(SIMILARITY_DISTANCES)}")
    n, num_experts = probs.shape
    flat = at_least_float32(inputs.detach()).flatten(1)
    dist = torch.cdist(flat, flat)
    if distance == "max_normalized":
        dist = dist / dist.max().clamp_min(1e-12)
    p = at_least_float32(probs)
    pair = p.t() @ dist @ p  # [E, E]: sum_nm p_i(n) d_nm p_j(m)
    same = pair.diagonal().sum()
    s_same = same / num_experts
    s_diff = (pair.sum() - same) / max(num_experts**2 - num_experts, 1)
    if total_tokens is not None:
        s_same = s_same * (total_tokens / n) ** 2
    return beta_s * s_same - beta_d * s_diff / n**2


def add_losses(total: dict[str, torch.Tensor], losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add each named scalar of ``losses`` to ``total``'s entry of that name (or start it); returns
    ``total``. How layers' and levels' auxiliary losses collect into one loss dict."""
    for name, value in losses.items():
        total[name] = total[name] + value if name in total else value
    return total


def weighted_aux_losses(
    routing: Routing,
    inputs: torch.Tensor | None,
    weights: AuxWeights,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The configured auxiliary losses of one layer, each times its weight; zero-weight losses are left out.

    ``reduce`` sums a per-expert statistic over data-parallel ranks (differentiably), so that under
    ``weights.scope == "global_batch"`` the losses are those of the global batch; ``micro_batch`` ignores it
    and each rank's losses are its own batch's. The sample-similarity loss, which needs pairwise distances,
    uses the local batch (``inputs: [N, ...]``, the samples the ``[N, E]`` routing routed), its ``beta_s`` sum
    scaled to the global batch's size under ``global_batch``. Keys: ``importance_loss``, ``load_loss``,
    ``kl_uniform_loss``, ``switch_loss``, ``z_loss``, ``sample_similarity_loss``, and under ReLU routing
    ``relu_l1_loss`` (:func:`relu_l1_loss`, weighted by the router's adaptive coefficient), and each custom
    loss's key (:class:`~harness.moe.spec.CustomLoss`; it sees this rank's routing and inputs only).
    """
    if weights.scope == "micro_batch":
        reduce = None
    reduce_given = reduce is not None
    reduce = reduce or (lambda t: t)
    w = weights
    gates = at_least_float32(routing.gates)
    # torch.full, not torch.tensor: a fill kernel, where a copy from the host would wait for the device
    num_tokens = reduce(torch.full((), float(gates.shape[0]), device=gates.device))
    importance_sum = reduce(importance(gates))
    losses: dict[str, torch.Tensor] = {}
    if w.importance:
        losses["importance_loss"] = w.importance * cv_squared(importance_sum)
    if w.load:
        expert_load = load(gates, routing.logits, routing.noisy_logits, routing.noise_std, routing.k)
        losses["load_loss"] = w.load * cv_squared(reduce(expert_load))
    if w.kl_uniform:
        losses["kl_uniform_loss"] = w.kl_uniform * _kl_uniform(importance_sum, num_tokens)
    if w.switch:
        prob_sum = reduce(at_least_float32(routing.probs).sum(dim=0))
        losses["switch_loss"] = w.switch * _switch(reduce(load(gates)), prob_sum, num_tokens)
    if w.z_loss:
        losses["z_loss"] = w.z_loss * reduce(_z_sum(routing.logits)) / num_tokens
    if routing.l1_coefficient is not None:
        routed = reduce(routing.dispatch_mask.sum(dim=0).to(gates.dtype))
        losses["relu_l1_loss"] = routing.l1_coefficient * _relu_l1(
            importance_sum, routed, num_tokens, routing.active_target
        )
    for custom in w.custom:  # defined outside harness: this rank's routing and inputs, as a user wrote it
        losses[custom.key] = custom.weight * load_object(custom.function)(routing, inputs, **dict(custom.args))
    if w.beta_s or w.beta_d:
        if inputs is None:
            raise ValueError("the sample-similarity loss needs the routed inputs")
        losses["sample_similarity_loss"] = sample_similarity_loss(
            inputs,
            routing.probs,
            w.beta_s,
            w.beta_d,
            w.similarity_distance,
            num_tokens.detach() if reduce_given else None,
        )
    return losses


class HardConstraint(nn.Module, abc.ABC):
    """Base of the hard constraints: state in buffers (so it is saved with the model's ``state_dict``),
    ``mask()`` before routing a training batch, ``update(gates)`` after.

    ``k=None`` (Pavlitska's code): every expert over its bound is off. Both constraints' statistics sum to
    a constant over the experts (relative importance: each step's increments sum to 0; mean importance: the
    shares sum to 1), so at least one expert is never over a positive threshold; with fewer than k experts
    on, a token's top-k also selects switched-off experts, at weight 0, and the router sends them no
    tokens. ``k`` given: at most ``E - k`` experts off (the most violating), so every token keeps k experts.
    """

    def __init__(self, num_experts: int, threshold: float, k: int | None = None) -> None:
        super().__init__()
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.num_experts = num_experts
        self.threshold = threshold
        # E - 1 without a limit: the sums above keep one expert on; the cap only guards rounding.
        self.max_off = num_experts - (1 if k is None else k)

    @abc.abstractmethod
    def violation(self) -> torch.Tensor:
        """``[E]``: how far each expert is over its bound (> 0 means it is switched off)."""

    def mask(self) -> torch.Tensor:
        """``[E]`` bool, True = expert switched off for the next training batch."""
        violation = self.violation()
        over = violation > 0
        rank = violation.argsort(descending=True).argsort()  # 0 = most violating
        return over & (rank < self.max_off)

    def update(self, gates: torch.Tensor) -> None:
        """Accumulate the routing of one training batch, ``gates: [N, E]``."""
        gates = at_least_float32(gates.detach())
        self.update_from_importance(importance(gates), torch.full((), float(gates.shape[0]), device=gates.device))

    @abc.abstractmethod
    def update_from_importance(self, importance_sum: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """Accumulate one batch given its ``[E]`` importance and token count (summed over ranks in data
        parallelism, so every rank holds the same state)."""


class RelativeImportanceConstraint(HardConstraint):
    """Pavlitska et al.: ``R_i += (Imp_i - a) / a`` with ``a = N / E`` over all steps; expert i is off while
    ``R_i > threshold`` (0.5 for CIFAR-100, 0.3 for RetinaNet in the paper)."""

    def __init__(self, num_experts: int, threshold: float, k: int | None = None) -> None:
        super().__init__(num_experts, threshold, k)
        self.register_buffer("running", torch.zeros(num_experts))

    def violation(self) -> torch.Tensor:
        return self.running - self.threshold

    @torch.no_grad()
    def update_from_importance(self, importance_sum: torch.Tensor, num_tokens: torch.Tensor) -> None:
        expected = num_tokens / self.num_experts
        self.running += (importance_sum - expected) / expected


class MeanImportanceConstraint(HardConstraint):
    """Pavlitska et al.: running mean ``m_i`` of ``Imp_i / N`` over steps; expert i is off while
    ``m_i - 1/E > threshold`` (0.3 in the paper)."""

    def __init__(self, num_experts: int, threshold: float, k: int | None = None) -> None:
        super().__init__(num_experts, threshold, k)
        self.register_buffer("running", torch.zeros(num_experts))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def violation(self) -> torch.Tensor:
        return self.running - 1.0 / self.num_experts - self.threshold

    @torch.no_grad()
    def update_from_importance(self, importance_sum: torch.Tensor, num_tokens: torch.Tensor) -> None:
        share = importance_sum / num_tokens
        self.running.mul_(self.steps).add_(share).div_(self.steps + 1)
        self.steps += 1


CONSTRAINTS: dict[str, type[HardConstraint]] = {
    "relative_importance": RelativeImportanceConstraint,
    "mean_importance": MeanImportanceConstraint,
}
