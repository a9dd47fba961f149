"""Krishnamurthy et al.'s MoE of whole small CNNs: every expert is a complete classifier, the gate has its
own feature extractor, and by default the gate is dense (the expectation gate, k = E).

Blocks -> model -> registered constructors. Expert and gate are :class:`Tower` networks (3x3 convs, each
followed by ReLU and 2x2 max-pooling, then fully connected layers) whose sizes default to the reference
code's MNIST networks (``notebooks/mnist_original_moe_training.ipynb``): expert conv to 1 channel, fc 169 ->
5 -> 32 -> 10 (1,382 parameters); gate conv to 1 channel, fc 169 -> 128 -> 32 -> E. The FashionMNIST and
CIFAR-100 networks of the paper are other tower sizes (``search_spaces/fashion_mnist.yaml``,
``search_spaces/cifar100_krishnamurthy.yaml``).

Each expert outputs class probabilities; the layer mixes them with the gate weights
(``p(y|x) = sum_i g_i(x) p_i(y|x)``), and the model returns ``log(p(y|x) + 1e-7)`` as logits, so
cross-entropy on them is the mixture's negative log-likelihood, as the reference's ``cross_entropy_loss``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..moe import build_moe_layer
from .registry import ModelOutput, register_model

# The reference adds this to the mixture's probabilities before the log (``cross_entropy_loss``).
LOG_EPSILON = 1e-7
MNIST_EXPERT = dict(conv=(1,), fc=(5, 32), padding=0, batchnorm=())
MNIST_GATE = dict(conv=(1,), fc=(128, 32), padding=0, batchnorm=())


class Tower(nn.Module):
    """3x3 convs (each: conv, optional BatchNorm, ReLU, 2x2 max-pool), flatten, then fully connected
    layers with ReLU between them. ``[N, C, S, S] -> hidden [N, fc[-1]]``, the last layer's output before
    its ReLU (the features the reference's attention reads).

    ``batchnorm`` lists the convs (0-based) followed by BatchNorm (those have no bias, as the reference's
    CIFAR networks; its FashionMNIST gate keeps one, which the BatchNorm cancels).
    """

    def __init__(self, in_channels: int, image_size: int, conv: Sequence[int], fc: Sequence[int], padding: int = 0,
                 batchnorm: Sequence[int] = ()) -> None:
        super().__init__()
        if not fc:
            raise ValueError("a tower needs at least one fully connected layer")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for i, out in enumerate(conv):
            layers.append(nn.Conv2d(channels, out, 3, padding=padding, bias=i not in batchnorm))
            if i in batchnorm:
                layers.append(nn.BatchNorm2d(out))
            layers += [nn.ReLU(), nn.MaxPool2d(2)]
            channels, size = out, (size + 2 * padding - 2) // 2
        if size < 1:
            raise ValueError(f"{len(conv)} conv+pool stages shrink a {image_size}x{image_size} input to nothing")
        layers.append(nn.Flatten())
        width = channels * size * size
        for i, out in enumerate(fc):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(width, out))
            width = out
        self.hidden_dim = width
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallCNNExpert(nn.Module):
    """A whole classifier: a :class:`Tower`, ReLU, a linear layer, softmax.
    ``forward: [N, C, S, S] -> probs [N, num_classes]``; ``forward_with_hidden`` also returns the tower's
    hidden features ``[N, hidden_dim]`` (before the ReLU) for the attentive gate."""

    def __init__(self, num_classes: int, tower: Tower) -> None:
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(tower.hidden_dim, num_classes)

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.tower(x)
        return torch.softmax(self.head(torch.relu(hidden)).float(), dim=1), hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_hidden(x)[0]


class SmallCNNMoE(nn.Module):
    """``x: [N, C, S, S] -> ModelOutput(log-probs [N, num_classes], [routing])``; in evaluation also
    ``expert_classes: [N, E]``, the class each expert predicts (for the reference's I(E;Y)).

    The gate's features are its tower's hidden output, through a ReLU for the classic gate (the reference's
    ``gate_layers``) and without one for the attentive gate (its ``gate_attn_layers``, MNIST and CIFAR)."""

    def __init__(self, moe: nn.Module, gate_tower: Tower, gate_relu: bool) -> None:
        super().__init__()
        self.gate_tower = gate_tower
        self.gate_relu = gate_relu
        self.moe = moe

    def forward(self, x: torch.Tensor) -> ModelOutput:
        hidden = self.gate_tower(x)
        gate_input = (torch.relu(hidden) if self.gate_relu else hidden)[:, :, None, None]  # a 1x1 token map
        out = self.moe(x, gate_input=gate_input)
        log_probs = torch.log(out.output.float() + LOG_EPSILON)
        expert_classes = None
        if not self.training and len(self.moe.experts) == self.moe.num_experts:  # all experts here (no EP)
            expert_classes = torch.stack([expert(x).argmax(dim=1) for expert in self.moe.experts], dim=1)
        return ModelOutput(log_probs, [out.routing], expert_classes)


def _tower_options(options: dict | None, default: dict) -> dict:
    merged = {**default, **(options or {})}
    return {key: tuple(value) if isinstance(value, list) else value for key, value in merged.items()}


@register_model
def small_cnn_moe(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    num_experts: int = 5,
    k: int | None = None,
    expert: dict | None = None,
    gate_network: dict | None = None,
    gate: str = "gap_fc",
    noisy: bool = False,
    capacity_factor: float | None = None,
    eval_capacity_factor: float | None = None,
    dispatch: str = "auto",
    constraint: dict | None = None,
    gate_hidden_channels: int = 256,
    attention_dim: int | None = None,
    noise_form: str = "pavlitska",
    routing: str = "top_k",
    sinkhorn_iterations: int = 10,
    bias_update_rate: float | None = None,
) -> SmallCNNMoE:
    """Whole-model experts; ``gate="gap_fc"`` is the classic gate (a linear layer on the gate tower),
    ``"attentive"`` Krishnamurthy's; ``k=None`` means k = E (dense expectation gate). ``expert`` and
    ``gate_network`` are :class:`Tower` options (``conv``, ``fc``, ``padding``, ``batchnorm``), by default the
    reference's MNIST networks."""
    expert_options = _tower_options(expert, MNIST_EXPERT)
    experts = [SmallCNNExpert(num_classes, Tower(in_channels, image_size, **expert_options)) for _ in range(num_experts)]
    gate_tower = Tower(in_channels, image_size, **_tower_options(gate_network, MNIST_GATE))
    moe = build_moe_layer(
        experts,
        in_channels=gate_tower.hidden_dim,
        expert_hidden_dim=experts[0].tower.hidden_dim,
        k=num_experts if k is None else k,
        gate=gate,
        noisy=noisy,
        capacity_factor=capacity_factor,
        eval_capacity_factor=eval_capacity_factor,
        dispatch=dispatch,
        constraint=constraint,
        gate_hidden_channels=gate_hidden_channels,
        attention_dim=attention_dim,
        noise_form=noise_form,
        routing=routing,
        sinkhorn_iterations=sinkhorn_iterations,
        bias_update_rate=bias_update_rate,
    )
    return SmallCNNMoE(moe, gate_tower, gate_relu=gate != "attentive")
