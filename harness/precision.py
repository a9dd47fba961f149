"""Precision helpers shared by every layer (no imports from the package, so anything may import it)."""

from __future__ import annotations

import torch


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is half precision (autocast) or not floating point; float32 and float64
    stay as they are, so a float64 run (the equivalence tests) keeps float64 throughout."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
