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
    return float(values.std(unbiased=False) / mean) if mean > 0 else 0.0


def importance_share(gates: torch.Tensor) -> torch.Tensor:
    """``[N, E] -> [E]``: each expert's share of the summed gate weights."""
    imp = gates.double().sum(dim=0)
    return imp / imp.sum().clamp_min(1e-12)


def load_share(gates: torch.Tensor) -> torch.Tensor:
    """``[N, E] -> [E]``: each expert's share of the routed token-expert assignments."""
    routed = (gates > 0).double().sum(dim=0)
    return routed / routed.sum().clamp_min(1.0)


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


def utilization_metrics(
    gates: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int | None = None
) -> dict[str, float]:
    """Balance and specialization of one MoE layer. ``gates: [N, E]``, ``labels: [N]`` long.

    Keys: ``importance_cv``, ``load_cv`` (population std / mean), ``living_experts`` (importance share >
    0.01), ``usage_entropy_bits`` (H_u = H(mean_n g_n)), ``sample_entropy_bits`` (H_s = mean_n H(g_n)),
    ``kl_uniform_bits`` (KL of the importance share to uniform), and with labels ``mutual_info_bits``
    (I(E;Y) between the top-1 expert and the label).
    """
    gates = gates.detach().double()
    num_experts = gates.shape[1]
    share = importance_share(gates)
    metrics = {
        "importance_cv": _population_cv(gates.sum(dim=0)),
        "load_cv": _population_cv((gates > 0).double().sum(dim=0)),
        "living_experts": float((share > ALIVE_SHARE).sum()),
        "usage_entropy_bits": float(_entropy_bits(gates.mean(dim=0))),
        "sample_entropy_bits": float(_entropy_bits(gates).mean()),
        "kl_uniform_bits": float((torch.special.xlogy(share, share * num_experts)).sum() / math.log(2)),
    }
    if labels is not None:
        num_classes = num_classes or int(labels.max()) + 1
        counts = contingency(gates.argmax(dim=1), labels, num_experts, num_classes)
        metrics["mutual_info_bits"] = mutual_information_bits(counts)
    return metrics


def affinity(gates: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Routed share per expert and group, ``[E, G]``: row i is how expert i's gate mass splits over the
    groups (rows sum to 1; an expert that received nothing has a zero row).
    ``gates: [N, E]``, ``groups: [N]`` long in ``0..G-1``."""
    gates = gates.detach().double()
    mass = torch.zeros(gates.shape[1], num_groups, dtype=torch.float64, device=gates.device)
    mass.index_add_(1, groups.long().to(gates.device), gates.t())
    return mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-12)
