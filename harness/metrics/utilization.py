"""Balance and specialization of expert use, from the routing of a held-out set.

``gates`` is the ``[N, E]`` gate matrix after top-k (rows sum to 1). All entropies are in bits.
"""

from __future__ import annotations

import math

import torch

# An expert counts as alive when it takes more than this share of the total importance.
ALIVE_SHARE = 0.01


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits along the last dim; ``0 log 0 = 0``."""
    return -torch.special.xlogy(p, p).sum(dim=-1) / math.log(2)


def _population_cv(values: torch.Tensor) -> float:
    mean = values.mean()
    # Nothing routed: no distribution to be even or uneven (0 would read as perfect balance).
    return float(values.std(unbiased=False) / mean) if mean > 0 else math.nan


def contingency(experts: torch.Tensor, groups: torch.Tensor, num_experts: int, num_groups: int) -> torch.Tensor:
    """Counts of (expert, group) pairs. ``experts, groups: [N]`` long -> ``[E, G]``."""
    flat = experts.long() * num_groups + groups.long()
    return torch.bincount(flat, minlength=num_experts * num_groups).view(num_experts, num_groups).double()


def mutual_information_bits(counts: torch.Tensor) -> float:
    """``I(E; Y)`` in bits from a ``[E, G]`` contingency table of counts."""
    joint = counts.double() / counts.sum().clamp_min(1.0)
    independent = joint.sum(dim=1, keepdim=True) * joint.sum(dim=0, keepdim=True)
    ratio = torch.where(joint > 0, joint / independent.clamp_min(1e-300), torch.ones_like(joint))
    return float((joint * torch.log2(ratio)).sum())


class UtilizationAccumulator:
    """Sufficient statistics of one MoE layer's routing over a held-out set, summed batch by batch and,
    in data parallelism, over ranks (counts are reduced, never averages of averages).

    ``label_sets`` maps a labelling's name to its number of groups (``{"class": 100, "superclass": 20}``);
    ``update(gates [N, E], labels {name: [N] long})`` adds a batch; ``reduce(collective)`` sums over ranks;
    ``compute()`` gives the metrics of :func:`utilization_metrics`, with ``<name>_mutual_info_bits`` for every
    labelling but ``class`` (whose key is ``mutual_info_bits``).
    """

    def __init__(
        self, num_experts: int, label_sets: dict[str, int] | None = None, device: torch.device | str = "cpu"
    ) -> None:
        self.num_experts = num_experts
        self.label_sets = dict(label_sets or {})
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.importance = zeros(num_experts)
        self.routed = zeros(num_experts)
        self.sample_entropy_sum = zeros(())
        self.num_tokens = zeros(())
        self.routed_tokens = zeros(())  # tokens with gate mass (under expert choice some have none)
        self.counts = {name: zeros(num_experts, size) for name, size in self.label_sets.items()}
        self.mass = {name: zeros(num_experts, size) for name, size in self.label_sets.items()}

    def update(self, gates: torch.Tensor, labels: dict[str, torch.Tensor] | None = None) -> None:
        gates = gates.detach().double()
        self.importance += gates.sum(dim=0)
        self.routed += (gates > 0).double().sum(dim=0)
        # Expert choice leaves some tokens without any expert (a zero row) and the rest with rows that need
        # not sum to one: entropies of the normalised rows, and specialisation from routed tokens only.
        mass = gates.sum(dim=1)
        routed = mass > 0
        self.sample_entropy_sum += _entropy_bits(gates[routed] / mass[routed, None]).sum()
        self.num_tokens += gates.shape[0]
        self.routed_tokens += routed.sum()
        top1 = gates.argmax(dim=1)[routed]
        for name, table in self.counts.items():
            groups = labels[name].to(gates.device)
            table += contingency(top1, groups[routed], self.num_experts, table.shape[1])
            self.mass[name].index_add_(1, groups.long(), gates.t())

    def reduce(self, collective) -> None:
        """Sum every statistic over the ranks of ``collective`` (in place)."""
        stats = (
            self.importance,
            self.routed,
            self.sample_entropy_sum,
            self.num_tokens,
            self.routed_tokens,
            *self.counts.values(),
            *self.mass.values(),
        )
        for tensor in stats:
            collective.sum_(tensor)

    def compute(self) -> dict[str, float]:
        share = self.importance / self.importance.sum().clamp_min(1e-12)
        usage = share  # mean_n g_n, normalised (it sums to one already unless under expert choice)
        metrics = {
            "importance_cv": _population_cv(self.importance),
            "load_cv": _population_cv(self.routed),
            "living_experts": float((share > ALIVE_SHARE).sum()),
            "usage_entropy_bits": float(_entropy_bits(usage)),
            "sample_entropy_bits": float(self.sample_entropy_sum / self.routed_tokens.clamp_min(1.0)),
            "kl_uniform_bits": float(torch.special.xlogy(share, share * self.num_experts).sum() / math.log(2)),
        }
        for name, table in self.counts.items():
            key = "mutual_info_bits" if name == "class" else f"{name}_mutual_info_bits"
            metrics[key] = mutual_information_bits(table)
        if not bool(self.importance.sum() > 0):  # no token reached any expert (e.g. every ReLU gate zero)
            metrics = {key: value if key == "living_experts" else math.nan for key, value in metrics.items()}
        return metrics

    def affinity(self, name: str) -> torch.Tensor:
        """``[E, G]`` routed share per expert and group of labelling ``name`` (see :func:`affinity`)."""
        mass = self.mass[name]
        return mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def shares(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([E], [E])``: importance share and load share of each expert."""
        return self.importance / self.importance.sum().clamp_min(1e-12), self.routed / self.routed.sum().clamp_min(1.0)


class RouterStats:
    """The balance figures large MoE systems log, summed over a held-out set (and over ranks):
    ``max_load_ratio`` (the busiest expert's routed tokens over the mean, 1 = even), ``dropped_fraction``
    (token-expert assignments dropped by capacity; under expert choice, Soft MoE and ReLU routing the tokens
    no expert took) and
    ``router_logit_abs_mean`` (mean |logit| of the gate, the quantity the z-loss keeps small).

    ``update(routing, rows)`` adds a batch (``rows: [N]`` bool, the real ones); ``reduce(collective)``;
    ``compute()``.
    """

    def __init__(self, num_experts: int, device: torch.device | str = "cpu") -> None:
        self.load = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # dropped, assignments, |logit|, logits

    def update(self, routing, rows: torch.Tensor | None = None) -> None:
        mask, logits = routing.dispatch_mask, routing.logits.detach()
        if rows is not None:
            mask, logits = mask[rows], logits[rows]
        self.load += mask.sum(dim=0).double()
        if routing.lists_every_expert:
            dropped, assignments = (~mask.any(dim=1)).sum(), mask.shape[0]
        else:
            dropped, assignments = (routing.k - mask.sum(dim=1)).sum(), mask.shape[0] * routing.k
        finite = torch.isfinite(logits)  # switched-off experts' -inf logits are no magnitude
        self.sums += torch.stack(
            [
                dropped.double(),
                torch.full((), float(assignments), dtype=torch.float64, device=self.sums.device),
                torch.where(finite, logits.abs(), torch.zeros_like(logits)).sum().double(),
                finite.sum().double(),
            ]
        )

    def reduce(self, collective) -> None:
        collective.sum_(self.load)
        collective.sum_(self.sums)

    def compute(self) -> dict[str, float]:
        mean = self.load.mean()
        return {
            "max_load_ratio": float(self.load.max() / mean) if mean > 0 else 0.0,
            "dropped_fraction": float(self.sums[0] / self.sums[1].clamp_min(1.0)),
            "router_logit_abs_mean": float(self.sums[2] / self.sums[3].clamp_min(1.0)),
        }


def utilization_metrics(
    gates: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int | None = None
) -> dict[str, float]:
    """Balance and specialization of one MoE layer. ``gates: [N, E]``, ``labels: [N]`` long.

    Keys: ``importance_cv``, ``load_cv`` (population std / mean), ``living_experts`` (importance share >
    0.01), ``usage_entropy_bits`` (H_u = H(mean_n g_n)), ``sample_entropy_bits`` (H_s = mean_n H(g_n)),
    ``kl_uniform_bits`` (KL of the importance share to uniform), and with labels ``mutual_info_bits``
    (I(E;Y) between the top-1 expert and the label). A layer that routed no token to any expert has
    ``living_experts`` 0 and every other figure NaN: its balance is undefined, not perfect.
    """
    label_sets = {}
    if labels is not None:
        label_sets["class"] = num_classes or int(labels.max()) + 1
    accumulator = UtilizationAccumulator(gates.shape[1], label_sets, gates.device)
    accumulator.update(gates, {"class": labels} if labels is not None else None)
    return accumulator.compute()


def affinity(gates: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Routed share per expert and group, ``[E, G]``: row i is how expert i's gate mass splits over the
    groups (rows sum to 1; an expert that received nothing has a zero row).
    ``gates: [N, E]``, ``groups: [N]`` long in ``0..G-1``."""
    gates = gates.detach().double()
    mass = torch.zeros(gates.shape[1], num_groups, dtype=torch.float64, device=gates.device)
    mass.index_add_(1, groups.long().to(gates.device), gates.t())
    return mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-12)


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine similarity over the ``E (E - 1) / 2`` pairs of rows of ``vectors: [E, P]`` (float64):
    1 for identical rows, 0 for orthogonal ones; NaN with fewer than two rows or a zero row."""
    if vectors.shape[0] < 2:
        return math.nan
    norms = vectors.double().norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        return math.nan
    unit = vectors.double() / norms
    cosine = unit @ unit.t()
    pairs = torch.triu_indices(cosine.shape[0], cosine.shape[0], offset=1)
    return float(cosine[pairs[0], pairs[1]].mean())


def top1_experts(gates: torch.Tensor) -> torch.Tensor:
    """Each token's top-1 expert, ``gates: [N, E] -> [N]`` long; -1 for a token with no gate mass (under
    expert choice, one no expert took)."""
    best = gates.argmax(dim=1)
    return torch.where(gates.sum(dim=1) > 0, best, torch.full_like(best, -1))


def routing_fluctuation(previous: torch.Tensor, current: torch.Tensor, collective) -> float:
    """StableMoE's routing fluctuation (Dai et al. 2022, arXiv 2204.08396) on a held-out set: the fraction of
    tokens whose top-1 expert differs from the previous evaluation's. ``previous, current: [N]`` long (this
    rank's tokens, in the same order); counts summed over ``collective``'s ranks."""
    counts = torch.stack([(previous != current).sum(), torch.tensor(current.numel(), device=current.device)])
    changed, total = collective.sum_(counts.double()).tolist()
    return changed / total if total else math.nan
