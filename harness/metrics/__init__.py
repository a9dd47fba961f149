"""Metrics: expert utilization (balance, specialization)."""

from .utilization import RouterStats, UtilizationAccumulator, affinity, mutual_information_bits, utilization_metrics

__all__ = ["RouterStats", "UtilizationAccumulator", "affinity", "mutual_information_bits", "utilization_metrics"]
