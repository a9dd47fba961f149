"""Methods defined outside ``harness``, as a user writes them in their own module (docs/extending.md): a
balancing loss, a gate and an MoE model, named in a study by import path (``tests.plugin_methods:...``).
``tests/test_plugins.py`` validates and trains them, a sweep included."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from harness.models import ModelOutput
from harness.moe import MoESpec, Routing, build_moe_layer


def usage_entropy_loss(routing: Routing, inputs: torch.Tensor | None, *, floor: float = 0.0) -> torch.Tensor:
    """``max(log E - H(mean_n gates_n), floor)``: 0 when the batch uses every expert equally, log E when it
    uses one. ``routing.gates: [N, E]`` -> ``[]``."""
    share = routing.gates.float().mean(dim=0)
    entropy = -torch.special.xlogy(share, share).sum()
    return (math.log(share.shape[0]) - entropy).clamp_min(floor)


class CosineGate(nn.Module):
    """Logits ``scale * cos(GAP(x), w_i)`` (a cosine router). ``x: [N, C, H, W] -> [N, E]``."""

    def __init__(self, in_channels: int, num_experts: int, scale: float = 10.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, in_channels) / math.sqrt(in_channels))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.normalize(x.mean(dim=(2, 3)), dim=1)
        return self.scale * pooled @ F.normalize(self.weight, dim=1).t()


class TinyMoE(nn.Module):
    """A 3x3 stem, one MoE layer of conv experts, a linear head. ``x: [N, C, S, S] -> ModelOutput``."""

    def __init__(self, num_classes: int, in_channels: int, moe: MoESpec, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        experts = [nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()) for _ in range(moe.num_experts)]
        self.moe = build_moe_layer(experts, width, width, moe)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out = self.moe(torch.relu(self.stem(x)))
        return ModelOutput(self.head(out.output.mean(dim=(2, 3))), [out.routing])


def tiny_moe(
    num_classes: int, in_channels: int, image_size: int, moe: MoESpec | None = None, width: int = 8
) -> TinyMoE:
    """The constructor a study names: ``model.name: tests.plugin_methods:tiny_moe``, ``model.args: {width:
    16}``; a name ending in ``_moe`` makes the harness pass the study's ``moe`` section as ``moe``."""
    return TinyMoE(num_classes, in_channels, moe or MoESpec(), width)
