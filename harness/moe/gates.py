"""Gate networks. Each maps a token's feature map to expert logits and nothing else; routing
(noise, top-k, constraints, capacity) happens in :mod:`harness.moe.routing`.

Tokens are per-sample feature maps ``x: [N, C, H, W]`` (a 1x1 map for vector features).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..plugins import is_import_path, load_object


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C]``; ``[N, D]`` passes through unchanged."""
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)


class GapFcGate(nn.Module):
    """Global average pooling -> linear. ``x: [N, C, H, W] -> logits [N, E]``."""

    needs_expert_hidden = False

    def __init__(self, in_channels: int, num_experts: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(global_avg_pool(x))


class ConvGapFcGate(nn.Module):
    """3x3 conv -> GAP -> linear. ``x: [N, C, H, W] -> logits [N, E]``.

    Pavlitska et al.'s ``ConvGate`` as their code runs it: no padding and no nonlinearity. A map smaller
    than the kernel (a vector token, 1x1) is zero-padded to 3x3.
    """

    needs_expert_hidden = False

    def __init__(self, in_channels: int, num_experts: int, hidden_channels: int = 256) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, kernel_size=3)
        self.fc = nn.Linear(hidden_channels, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x[:, :, None, None]
        short = max(0, 3 - min(x.shape[-2:]))
        if short:
            x = F.pad(x, (0, short, 0, short))
        return self.fc(global_avg_pool(self.conv(x)))


class ReluGapFcGate(nn.Module):
    """ReLU -> GAP -> linear. ``x: [N, C, H, W] -> logits [N, E]``.

    What Pavlitska et al.'s ``FCGate`` (every soft-constraint RetinaNet experiment) computes: its forward
    applies the ReLU to the input, not to its 3x3 convolution's output, so that convolution never
    contributes and is left out here.
    """

    needs_expert_hidden = False

    def __init__(self, in_channels: int, num_experts: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(global_avg_pool(torch.relu(x)))


class AttentiveGate(nn.Module):
    """Attention-like gate (Krishnamurthy et al.): ``q = W_q GAP(x)``, ``key_i = W_k h_i`` from expert i's
    hidden features, logits ``q . key_i / sqrt(d)``.

    ``x: [N, C, H, W]``, ``expert_hidden: [N, E, D] -> logits [N, E]``. It needs every expert's hidden
    features, so a layer with this gate runs all experts on every token.
    """

    needs_expert_hidden = True

    def __init__(self, in_channels: int, num_experts: int, expert_hidden_dim: int, attention_dim: int = 64) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.query = nn.Linear(in_channels, attention_dim, bias=False)
        self.key = nn.Linear(expert_hidden_dim, attention_dim, bias=False)
        self.scale = 1.0 / math.sqrt(attention_dim)

    def forward(self, x: torch.Tensor, expert_hidden: torch.Tensor) -> torch.Tensor:
        q = self.query(global_avg_pool(x))  # [N, d]
        k = self.key(expert_hidden)  # [N, E, d]
        return torch.einsum("nd,ned->ne", q, k) * self.scale


GATES: dict[str, type[nn.Module]] = {
    "gap_fc": GapFcGate,
    "conv_gap_fc": ConvGapFcGate,
    "relu_gap_fc": ReluGapFcGate,
    "attentive": AttentiveGate,
}


def build_gate(
    gate_type: str,
    in_channels: int,
    num_experts: int,
    expert_hidden_dim: int,
    hidden_channels: int = 256,
    attention_dim: int | None = None,
    gate_args: tuple[tuple[str, Any], ...] = (),
) -> nn.Module:
    """Gate by registry name; ``expert_hidden_dim`` and ``attention_dim`` (default: ``expert_hidden_dim``,
    as the reference) are used only by ``attentive``. An import path (``package.module:Class``) builds a
    gate defined outside ``harness``: ``Class(in_channels, num_experts, **dict(gate_args))``, whose
    ``forward(x [N, C, H, W]) -> logits [N, num_experts]``."""
    if is_import_path(gate_type):
        return load_object(gate_type)(in_channels, num_experts, **dict(gate_args))
    if gate_type == "gap_fc":
        return GapFcGate(in_channels, num_experts)
    if gate_type == "conv_gap_fc":
        return ConvGapFcGate(in_channels, num_experts, hidden_channels)
    if gate_type == "relu_gap_fc":
        return ReluGapFcGate(in_channels, num_experts)
    if gate_type == "attentive":
        return AttentiveGate(in_channels, num_experts, expert_hidden_dim, attention_dim or expert_hidden_dim)
    raise ValueError(f"unknown gate type {gate_type!r}; valid: {', '.join(sorted(GATES))}")
