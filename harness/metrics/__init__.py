"""Metrics: expert utilization (balance, specialization)."""

from .utilization import (
    RouterStats,
    UtilizationAccumulator,
    affinity,
    mean_pairwise_cosine,
    mutual_information_bits,
    utilization_metrics,
)

__all__ = [
    "RouterStats",
    "UtilizationAccumulator",
    "affinity",
    "mean_pairwise_cosine",
    "mutual_information_bits",
    "utilization_metrics",
]
