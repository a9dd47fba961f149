"""Krishnamurthy-style MoE for 28x28 grey images: whole-model experts and a gate with its own feature
extractor; by default a dense (expectation) gate, k = E.

Each expert outputs class probabilities; the layer mixes them with the gate weights
(``p(y|x) = sum_i g_i(x) p_i(y|x)``), and the model returns ``log p(y|x)`` as logits, so cross-entropy on
them is the mixture's negative log-likelihood.
"""

from __future__ import annotations

import torch
from torch import nn

from ..moe import build_moe_layer
from .registry import ModelOutput, register_model


class SmallCNNTrunk(nn.Sequential):
    """conv-pool-conv-pool-fc feature extractor. ``[N, C, 28, 28] -> [N, hidden_dim]``."""

    def __init__(self, in_channels: int = 1, hidden_dim: int = 64) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, hidden_dim),
            nn.ReLU(),
        )


class SmallCNNExpert(nn.Module):
    """A whole classifier. ``forward: [N, C, 28, 28] -> probs [N, num_classes]``;
    ``forward_with_hidden`` also returns the hidden features ``[N, hidden_dim]`` for the attentive gate."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, hidden_dim: int = 64) -> None:
        super().__init__()
        self.trunk = SmallCNNTrunk(in_channels, hidden_dim)
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.trunk(x)
        return torch.softmax(self.head(hidden).float(), dim=1), hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_hidden(x)[0]


class SmallCNNMoE(nn.Module):
    """``x: [N, C, 28, 28] -> ModelOutput(log-probs [N, num_classes], [routing])``."""

    def __init__(self, moe: nn.Module, gate_trunk: nn.Module) -> None:
        super().__init__()
        self.gate_trunk = gate_trunk
        self.moe = moe

    def forward(self, x: torch.Tensor) -> ModelOutput:
        gate_input = self.gate_trunk(x)[:, :, None, None]  # [N, hidden, 1, 1]: a 1x1 token feature map
        out = self.moe(x, gate_input=gate_input)
        # Floor keeps log finite for a class every expert rules out; a trained mixture never gets near it.
        log_probs = torch.log(out.output.float().clamp_min(1e-8))
        return ModelOutput(log_probs, [out.routing])


@register_model
def small_cnn_moe(
    num_classes: int = 10,
    in_channels: int = 1,
    num_experts: int = 5,
    k: int | None = None,
    hidden_dim: int = 64,
    gate: str = "gap_fc",
    noisy: bool = False,
    capacity_factor: float | None = None,
    dispatch: str = "auto",
    constraint: dict | None = None,
    gate_hidden_channels: int = 256,
    attention_dim: int = 64,
) -> SmallCNNMoE:
    """Whole-model experts; ``gate="gap_fc"`` is the classic gate, ``"attentive"`` Krishnamurthy's;
    ``k=None`` means k = E (dense expectation gate)."""
    experts = [SmallCNNExpert(num_classes, in_channels, hidden_dim) for _ in range(num_experts)]
    moe = build_moe_layer(
        experts,
        in_channels=hidden_dim,
        expert_hidden_dim=hidden_dim,
        k=num_experts if k is None else k,
        gate=gate,
        noisy=noisy,
        capacity_factor=capacity_factor,
        dispatch=dispatch,
        constraint=constraint,
        gate_hidden_channels=gate_hidden_channels,
        attention_dim=attention_dim,
    )
    return SmallCNNMoE(moe, SmallCNNTrunk(in_channels, hidden_dim))
