"""ResNet-18 for 32x32 images (CIFAR stem) with whole stages replaced by MoE layers (Pavlitska et al.).

Blocks -> model -> registered constructors. The trunk is torchvision's ``resnet18`` with a 3x3 stride-1
stem and no max-pool; stage ``position`` p (1..4) becomes an MoE of E narrow copies of that stage, gated
per image from the stage's input.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from ..moe import MoELayer, MoEOutput, MoESpec, build_moe_layer
from ..moe.spec import resolve_spec
from .registry import ModelOutput, register_model

STAGE_IN = (64, 64, 128, 256)
STAGE_OUT = (64, 128, 256, 512)
STAGE_STRIDE = (1, 2, 2, 2)
# Inner width of each expert per stage in Pavlitska et al.'s code (``NarrowResNet18Expert``).
REFERENCE_EXPERT_WIDTH = (25, 50, 90, 180)
IMAGE_GATE_CHANNELS = 256


def default_expert_width(position: int) -> int:
    """Inner width of an expert at stage ``position`` (1..4) when none is configured: 25, 50, 90, 180."""
    return REFERENCE_EXPERT_WIDTH[position - 1]


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class NarrowBasicBlock(nn.Module):
    """A ResNet BasicBlock whose inner width differs from its output width.
    ``[N, in, H, W] -> [N, out, H / stride, W / stride]``."""

    def __init__(self, in_channels: int, out_channels: int, inner: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, inner, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def expert_stage(position: int, inner: int) -> nn.Sequential:
    """One expert, Pavlitska et al.'s ``NarrowResNet18Expert``: the two BasicBlocks of stage ``position``,
    ``in -> inner -> inner`` then ``inner -> out -> out``, narrow between the blocks, 1x1 conv shortcuts
    where the widths change. ``[N, C_in, H, W] -> [N, C_out, H', W']``."""
    i = position - 1
    return nn.Sequential(
        NarrowBasicBlock(STAGE_IN[i], inner, inner, STAGE_STRIDE[i]),
        NarrowBasicBlock(inner, STAGE_OUT[i], STAGE_OUT[i], 1),
    )


class MoEStage(nn.Module):
    """An MoE layer standing in for a ResNet stage, with an optional residual skip around it.
    ``[N, C_in, H, W] -> MoEOutput([N, C_out, H', W'])``."""

    def __init__(self, moe: MoELayer, skip: nn.Module | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.skip = skip

    def forward(self, x: torch.Tensor, gate_input: torch.Tensor | None = None) -> MoEOutput:
        out = self.moe(x, gate_input)
        if self.skip is None:
            return out
        return MoEOutput(out.output + self.skip(x), out.routing)


class ImageGateTrunk(nn.Module):
    """The trunk of Pavlitska et al.'s global gating (``InputMoEGate``): a 3x3 conv of the input image (no
    padding, no nonlinearity) and global average pooling, shared by every MoE layer, each of which has its
    own linear gate on top. ``[N, 3, H, W] -> [N, 256, 1, 1]``."""

    def __init__(self, in_channels: int = 3, channels: int = IMAGE_GATE_CHANNELS) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image).mean(dim=(2, 3), keepdim=True)


class CifarResNet18(nn.Module):
    """ResNet-18 with a CIFAR stem; ``moe_stages`` maps positions (1..4) to :class:`MoEStage`; with an
    ``image_gate`` every MoE layer's gate sees its features of the input image instead of the stage input.
    ``x: [N, 3, 32, 32] -> ModelOutput(logits [N, num_classes], routings)``."""

    def __init__(
        self,
        num_classes: int = 100,
        moe_stages: dict[int, MoEStage] | None = None,
        image_gate: nn.Module | None = None,
        init: str = "reference",
    ) -> None:
        super().__init__()
        self.image_gate = image_gate
        trunk = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        # 32x32 inputs: a 3x3 stride-1 stem and no max-pool keep layer4 at 4x4.
        trunk.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if init == "kaiming":
            nn.init.kaiming_normal_(trunk.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu)
        moe_stages = moe_stages or {}
        self.stages = nn.ModuleList(moe_stages.get(p, getattr(trunk, f"layer{p}")) for p in range(1, 5))
        self.fc = trunk.fc

    def forward(self, x: torch.Tensor) -> ModelOutput:
        routings = []
        gate_input = self.image_gate(x) if self.image_gate is not None else None
        x = self.stem(x)
        for stage in self.stages:
            if isinstance(stage, MoEStage):
                out = stage(x, gate_input)
                x = out.output
                routings.append(out.routing)
            else:
                x = stage(x)
        logits = self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))
        return ModelOutput(logits, routings)


def _init_convs(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


@register_model
def resnet18(num_classes: int = 100, init: str = "reference") -> CifarResNet18:
    """Dense CIFAR ResNet-18 baseline (``init``: see :func:`resnet18_moe`)."""
    return CifarResNet18(num_classes, init=init)


@register_model
def resnet18_moe(
    num_classes: int = 100,
    moe: MoESpec | None = None,
    position: int | list[int] = 4,
    expert_width: int | None = None,
    residual: bool = False,
    gate_input: str = "layer",
    init: str = "reference",
    **moe_options: Any,
) -> CifarResNet18:
    """CIFAR ResNet-18 whose stage(s) ``position`` are MoE layers as ``moe`` describes them (a
    :class:`~harness.moe.MoESpec`; ``moe_options`` override its fields), each of ``num_experts`` narrow
    stage copies (:func:`expert_stage`, inner width ``expert_width``, default by stage), plus
    ``shared_experts`` more of the same shape that every image passes through.

    ``residual``: a shortcut around each MoE stage. ``gate_input``: ``layer`` (each gate sees its stage's
    input) or ``image`` (Pavlitska et al.'s global gating: one :class:`ImageGateTrunk` of the input image
    feeds every MoE layer's ``gap_fc`` gate); ``init``: ``reference`` leaves the 3x3 stem conv and the
    experts at PyTorch's default init, as Pavlitska's code (its experts are torchvision ``BasicBlock`` s built
    outside ``ResNet``, so torchvision's kaiming init never reaches them), ``kaiming`` gives them
    kaiming-normal (fan_out), as the trunk's torchvision stages have in both."""
    spec = resolve_spec(moe, moe_options)
    image_gate = ImageGateTrunk() if gate_input == "image" else None
    positions = [position] if isinstance(position, int) else list(position)
    stages = {}
    for p in positions:
        inner = expert_width or default_expert_width(p)
        experts = [expert_stage(p, inner) for _ in range(spec.num_experts + spec.shared_experts)]
        if init == "kaiming":
            for expert in experts:
                _init_convs(expert)
        in_channels = IMAGE_GATE_CHANNELS if image_gate is not None else STAGE_IN[p - 1]
        routed, shared = experts[: spec.num_experts], experts[spec.num_experts :]
        layer = build_moe_layer(routed, in_channels, STAGE_OUT[p - 1], spec, shared=shared)
        skip = _shortcut(STAGE_IN[p - 1], STAGE_OUT[p - 1], STAGE_STRIDE[p - 1]) if residual else None
        stages[p] = MoEStage(layer, skip)
    return CifarResNet18(num_classes, stages, image_gate, init)
