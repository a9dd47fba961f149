"""Metrics: expert utilization (balance, specialization)."""

from .utilization import UtilizationAccumulator, affinity, mutual_information_bits, utilization_metrics

__all__ = ["UtilizationAccumulator", "affinity", "mutual_information_bits", "utilization_metrics"]
