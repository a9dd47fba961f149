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

Execution (``expert_execution``): the experts share one architecture, so by default (``stacked``) the layer
runs them as one network whenever every expert sees every token (:func:`stacked_experts_forward`: one conv
with E times the channels, grouped convs after it, batched matmuls for the fully connected layers). The
parameters stay the experts' own (same init, same checkpoints); only the execution is batched, which on
these tiny experts is what a step costs. ``modules`` runs expert by expert, as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import MoESpec, build_moe_layer
from ..moe.spec import resolve_spec
from ..precision import at_least_float32
from .registry import ModelOutput, register_model

# The reference adds this to the mixture's probabilities before the log (``cross_entropy_loss``).
LOG_EPSILON = 1e-7
MNIST_EXPERT = dict(conv=(1,), fc=(5, 32), padding=0, batchnorm=())
MNIST_GATE = dict(conv=(1,), fc=(128, 32), padding=0, batchnorm=())


class _InputConv2d(torch.autograd.Function):
    """A stride-1 conv of an input that needs no gradient (the images), whose weight gradient is itself one
    convolution: ``dW[e, c] = sum_n x[n, c] (*) dY[n, e]``, i.e. ``conv2d(x^T [C, N, H, W], dY^T [E', N,
    h, w]) -> [C, E', k, k]``. For these few-channel convs that is ~3x faster on CPU than the generic
    backward (oneDNN's weight gradient for 1-8 channels), and equal up to rounding."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor | None, None]:
        (x,) = ctx.saved_tensors
        if ctx.padding:
            x = F.pad(x, [ctx.padding] * 4)
        grad_weight = F.conv2d(x.transpose(0, 1), grad.transpose(0, 1)).transpose(0, 1)
        return None, grad_weight, grad.sum(dim=(0, 2, 3)) if ctx.has_bias else None, None


def input_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` (stride 1): ``[N, C, H, W] -> [N, E', H', W']``; when
    ``x`` needs no gradient (a network's input) through :class:`_InputConv2d`'s faster weight gradient."""
    # An empty batch (an expert without tokens) goes the generic way: a conv over zero channels has no shape.
    if x.requires_grad or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type) or not len(x):
        # Under autocast the conv runs in bf16 and its backward, outside autocast, would mix dtypes.
        return F.conv2d(x, weight, bias, padding=padding)
    return _InputConv2d.apply(x, weight, bias, padding)


class InputConv2d(nn.Conv2d):
    """A tower's first 3x3 conv (on the images): :func:`input_conv2d`. ``[N, C, H, W] -> [N, C', H', W']``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return input_conv2d(x, self.weight, self.bias, self.padding[0])


def _quadrants(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four positions of every 2x2 window of ``h: [N, C, H, W]`` (each ``[N, C, H//2, W//2]``), in
    max_pool2d's scan order (an odd last row or column is dropped, as max_pool2d's floor mode)."""
    rows, cols = 2 * (h.shape[2] // 2), 2 * (h.shape[3] // 2)
    return tuple(h[:, :, i:rows:2, j:cols:2] for i in (0, 1) for j in (0, 1))


class _MaxPool2x2(torch.autograd.Function):
    """2x2 max-pooling, stride 2, as four strided views and three ``maximum``s: the values of
    ``F.max_pool2d(h, 2)`` (NaN propagates), and its gradient, which goes to the first maximum of each
    window in scan order, as max_pool2d's. On CPU this is several times faster than max_pool2d with indices
    for the few-channel maps of these towers."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        a, b, c, d = _quadrants(h)
        pooled = torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
        ctx.save_for_backward(h, pooled)
        return pooled

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        h, pooled = ctx.saved_tensors
        grad_h = torch.zeros_like(h)
        taken = torch.zeros_like(pooled, dtype=torch.bool)
        for position, slot in zip(_quadrants(h), _quadrants(grad_h)):
            first = (position == pooled) & ~taken  # a NaN window: no position equals NaN; none gets a gradient
            slot.copy_(torch.where(first, grad, 0))
            taken |= first
        return grad_h


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` computed by :class:`_MaxPool2x2`. ``[N, C, H, W] -> [N, C, H//2, W//2]``."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return _MaxPool2x2.apply(h)


class Tower(nn.Module):
    """3x3 convs (each: conv, optional BatchNorm, 2x2 max-pool, ReLU), flatten, then fully connected
    layers with ReLU between them. ``[N, C, S, S] -> hidden [N, fc[-1]]``, the last layer's output before
    its ReLU (the features the reference's attention reads).

    ``batchnorm`` lists the convs (0-based) followed by BatchNorm (those have no bias, as the reference's
    CIFAR networks; its FashionMNIST gate keeps one, which the BatchNorm cancels).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        conv: Sequence[int],
        fc: Sequence[int],
        padding: int = 0,
        batchnorm: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if not fc:
            raise ValueError("a tower needs at least one fully connected layer")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for i, out in enumerate(conv):
            conv_type = InputConv2d if i == 0 else nn.Conv2d
            layers.append(conv_type(channels, out, 3, padding=padding, bias=i not in batchnorm))
            if i in batchnorm:
                layers.append(nn.BatchNorm2d(out))
            layers += [MaxPool2x2(), nn.ReLU()]  # = ReLU then pool (both monotone), on a quarter of the values
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
        return torch.softmax(at_least_float32(self.head(torch.relu(hidden))), dim=1), hidden

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
        log_probs = torch.log(at_least_float32(out.output) + LOG_EPSILON)
        expert_classes = None
        if not self.training and len(self.moe.experts) == self.moe.num_experts:  # all experts here (no EP)
            probs = out.expert_outputs if out.expert_outputs is not None else self.moe.all_experts(x)[0]
            expert_classes = probs.argmax(dim=2)
        return ModelOutput(log_probs, [out.routing], expert_classes)


def _stacked(tensors: Sequence[torch.Tensor | None], cat: bool) -> torch.Tensor | None:
    """The experts' tensors of one layer side by side (``cat``: along dim 0, else a new dim 0)."""
    if tensors[0] is None:
        return None
    return torch.cat(tensors) if cat else torch.stack(tensors)


def stacked_experts_forward(experts: Sequence[SmallCNNExpert], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All E experts (one architecture) on the same batch as one network: ``x: [N, C, S, S] ->
    (probs [N, E, num_classes], hidden [N, E, D])``, equal to running each expert (up to rounding).

    The first conv reads the shared input once with the E experts' filters side by side (``[E*C', C, 3,
    3]``); later convs are grouped (``groups=E``); BatchNorm runs per expert on its channels (its own
    statistics and buffers); the fully connected layers are batched matmuls over ``[E, N, D]``. The weights
    are concatenated from the experts' own parameters on every call, so gradients flow back to them."""
    num_experts = len(experts)
    towers = [expert.tower.layers for expert in experts]
    h, shared = x, True  # shared: h is the common input, not yet one slice per expert
    for layers in zip(*towers):
        first = layers[0]
        if isinstance(first, nn.Conv2d):
            weight, bias = _stacked([m.weight for m in layers], True), _stacked([m.bias for m in layers], True)
            if shared:
                h = input_conv2d(h, weight, bias, first.padding[0])
            else:
                h = F.conv2d(h, weight, bias, padding=first.padding, groups=num_experts)
            shared = False
        elif isinstance(first, nn.BatchNorm2d):
            h = torch.cat([bn(part) for bn, part in zip(layers, h.chunk(num_experts, dim=1))], dim=1)
        elif isinstance(first, nn.Flatten):
            # [N, E*C, s, s] -> [E, N, C*s*s]: each expert's block flattened as nn.Flatten would.
            h = h.flatten(1) if shared else h.reshape(h.shape[0], num_experts, -1).transpose(0, 1)
        elif isinstance(first, nn.Linear):
            weight, bias = _stacked([m.weight for m in layers], False), _stacked([m.bias for m in layers], False)
            if shared:  # the towers start with a fully connected layer: one matmul with E*out outputs
                h = F.linear(h, weight.flatten(0, 1), bias.flatten()).view(h.shape[0], num_experts, -1).transpose(0, 1)
                shared = False
            else:
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        else:  # ReLU, MaxPool2d: the same parameter-free module for every expert and channel
            h = first(h)
    heads = [expert.head for expert in experts]
    head_weight, head_bias = _stacked([m.weight for m in heads], False), _stacked([m.bias for m in heads], False)
    logits = torch.baddbmm(head_bias.unsqueeze(1), torch.relu(h), head_weight.transpose(1, 2))
    return torch.softmax(at_least_float32(logits), dim=2).transpose(0, 1), h.transpose(0, 1)


def _tower_options(options: dict | None, default: dict) -> dict:
    merged = {**default, **(options or {})}
    return {key: tuple(value) if isinstance(value, list) else value for key, value in merged.items()}


@register_model
def small_cnn_moe(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    moe: MoESpec | None = None,
    expert: dict | None = None,
    gate_network: dict | None = None,
    expert_execution: str = "stacked",
    **moe_options: Any,
) -> SmallCNNMoE:
    """Krishnamurthy et al.'s whole-model experts in one MoE layer as ``moe`` describes it (a
    :class:`~harness.moe.MoESpec`; ``moe_options`` override its fields; without either k, k = E, the dense
    expectation gate; E defaults to 5). ``gate="gap_fc"`` is the classic gate (a linear layer on the gate tower),
    ``"attentive"`` Krishnamurthy's. ``expert`` and ``gate_network`` are :class:`Tower` options (``conv``,
    ``fc``, ``padding``, ``batchnorm``), by default the reference's MNIST networks. ``expert_execution``:
    ``stacked`` (:func:`stacked_experts_forward` wherever every expert sees every token) or ``modules``
    (expert by expert). ``[N, C, H, W]`` images -> ``[N, classes]`` probabilities (see :class:`SmallCNNMoE`)."""
    spec = resolve_spec(moe, moe_options, default=MoESpec(num_experts=5, k=5))
    if moe is None and "k" not in moe_options:  # the dense expectation gate, whatever E
        spec = spec.replace(k=spec.num_experts)
    expert_options = _tower_options(expert, MNIST_EXPERT)
    expert_options.pop("hidden_relu", None)  # a gate option; the schema refuses it for experts
    experts = [
        SmallCNNExpert(num_classes, Tower(in_channels, image_size, **expert_options)) for _ in range(spec.num_experts)
    ]
    gate_options = _tower_options(gate_network, MNIST_GATE)
    hidden_relu = gate_options.pop("hidden_relu", None)
    gate_tower = Tower(in_channels, image_size, **gate_options)
    layer = build_moe_layer(experts, gate_tower.hidden_dim, experts[0].tower.hidden_dim, spec)
    if expert_execution == "stacked":
        layer.expert_stack = stacked_experts_forward
    gate_relu = spec.gate != "attentive" if hidden_relu is None else hidden_relu
    return SmallCNNMoE(layer, gate_tower, gate_relu=gate_relu)
