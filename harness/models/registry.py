"""Model registry: ``create_model(name, **kwargs)`` as in timm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..moe import Routing

MODELS: dict[str, Callable[..., nn.Module]] = {}


@dataclass
class ModelOutput:
    """``logits: [N, num_classes]``, the routing of each MoE layer in forward order (empty if dense) and,
    for whole-model experts in evaluation, ``expert_classes: [N, E]``: the class each expert predicts."""

    logits: torch.Tensor
    routings: list[Routing] = field(default_factory=list)
    expert_classes: torch.Tensor | None = None


def register_model(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a constructor under its function name."""
    MODELS[constructor.__name__] = constructor
    return constructor


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; an unknown name lists the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
