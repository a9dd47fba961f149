"""Metrics: expert utilization (balance, specialization) and task accuracy."""

from .utilization import affinity, importance_share, load_share, mutual_information_bits, utilization_metrics

__all__ = ["affinity", "importance_share", "load_share", "mutual_information_bits", "utilization_metrics"]
