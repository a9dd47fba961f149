"""Metrics: expert utilization (balance, specialization)."""

from .utilization import (
    RouterStats,
    UtilizationAccumulator,
    affinity,
    mean_pairwise_cosine,
    mutual_information_bits,
    routing_fluctuation,
    top1_experts,
    utilization_metrics,
)

__all__ = [
    "RouterStats",
    "UtilizationAccumulator",
    "affinity",
    "mean_pairwise_cosine",
    "mutual_information_bits",
    "routing_fluctuation",
    "top1_experts",
    "utilization_metrics",
]
