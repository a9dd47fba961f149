"""moe-bench: benchmarking harness for Mixture-of-Experts CNNs on Ray."""

__version__ = "0.1.0"
