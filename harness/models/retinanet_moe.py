"""RetinaNet (torchvision) whose head subnets are MoEs of full subnets, gated per image per FPN level.

Blocks -> model -> registered constructors. The classification subnet (4 conv+ReLU, then the class conv)
and the box-regression subnet (4 conv+ReLU, then the box conv) each become an MoE of E copies; like the
original subnets, the experts are shared across FPN levels and run on one level's feature map at a time,
so the gate decides per image and per level and experts can specialise by object size. Each subnet's
auxiliary losses are computed once over the gates of all levels together (B x 5 tokens), as the reference
code concatenates them. The classification experts' sigmoid probabilities are mixed (the reference's
experts end in a sigmoid). Variants: only one subnet
as an MoE (``moe_at="cls_head"`` / ``"box_head"``), or the backbone's layer4 as an MoE of narrow layer4
copies with a dense head (``moe_at="layer4"``).

The head keeps torchvision's contract (``forward(features) -> {"cls_logits", "bbox_regression"}``,
``compute_loss(...) -> loss dict``); the MoE auxiliary losses are added to that loss dict, so
``RetinaNet.forward`` returns them with the detection losses. Nothing is downloaded: ``weights=None`` by
default, or a local state_dict file (:func:`load_weights`).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.retinanet import (
    RetinaNet,
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..moe import (
    AuxWeights,
    MoELayer,
    MoESpec,
    Routing,
    add_losses,
    build_moe_layer,
    concat_routings,
    router_weight_losses,
    weighted_aux_losses,
)
from ..moe.spec import resolve_spec
from ..precision import at_least_float32
from .registry import register_model
from .resnet_moe import MoEStage, expert_stage
from .weights import load_state, read_state_dict

FPN_CHANNELS = 256
NUM_LEVELS = 5  # P3..P7
# Mixed sigmoid probabilities go back to logits for torchvision's focal loss; the clamp keeps a saturated
# float32 sigmoid (exactly 0 or 1) finite.
PROBABILITY_EPSILON = 1e-7


def clamp_focal_logits(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """Logits whose sigmoid is clamped to ``[eps, 1 - eps]``: the logits clamped to ``+-log((1 - eps) / eps)``
    (sigmoid is monotonic), with the same zero gradient outside the range as a clamp of the probability.
    ``[...] -> [...]`` float32."""
    bound = math.log((1 - eps) / eps)
    return at_least_float32(logits).clamp(-bound, bound)


class Float32Sigmoid(nn.Module):
    """``sigmoid`` in float32 also under bf16 autocast: in bf16 every probability above 1 - 2^-9 would round
    to 1 and lose its gradient at the logit clamp. ``[...] -> [...]`` float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(at_least_float32(x))


class MoESubnet(nn.Module):
    """One head subnet as an MoE: E experts (each ``Sequential(conv tower, final conv)``) applied per FPN
    level. ``features: list of [N, 256, H_l, W_l] -> list of [N, A*K, H_l, W_l]``; ``routings`` holds the
    last forward's :class:`Routing` per level, ``inputs`` the feature maps they routed."""

    def __init__(self, experts: list[nn.Module], spec: MoESpec) -> None:
        super().__init__()
        self.moe: MoELayer = build_moe_layer(experts, FPN_CHANNELS, FPN_CHANNELS, spec)
        self.routings: list[Routing] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs, self.routings, self.inputs = [], [], []
        for level in features:
            out = self.moe(level)
            outputs.append(out.output)
            self.routings.append(out.routing)
            if self.training:  # only the aux losses read them; evaluation keeps no feature maps alive
                self.inputs.append(level)
        return outputs


def _flatten_levels(outputs: list[torch.Tensor], per_anchor: int) -> torch.Tensor:
    """torchvision's layout: ``[N, A*K, H, W]`` per level -> ``[N, sum_l H_l*W_l*A, K]``."""
    flat = []
    for out in outputs:
        n, _, h, w = out.shape
        flat.append(out.view(n, -1, per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, per_anchor))
    return torch.cat(flat, dim=1)


class MoEClassificationHead(MoESubnet):
    """RetinaNet's classification subnet as an MoE; ``compute_loss`` is torchvision's (sigmoid focal).
    Each expert ends in a sigmoid, the gate mixes probabilities and the head returns their logit."""

    BETWEEN_THRESHOLDS = Matcher.BETWEEN_THRESHOLDS
    compute_loss = RetinaNetClassificationHead.compute_loss

    def __init__(self, num_anchors: int, num_classes: int, spec: MoESpec) -> None:
        experts = []
        for _ in range(spec.num_experts):  # torchvision's own init (normal 0.01, focal prior bias) per expert
            dense = RetinaNetClassificationHead(FPN_CHANNELS, num_anchors, num_classes)
            experts.append(nn.Sequential(dense.conv, dense.cls_logits, Float32Sigmoid()))
        super().__init__(experts, spec)
        self.num_classes = num_classes
        self.num_anchors = num_anchors

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        outputs = super().forward(features)
        outputs = [torch.logit(at_least_float32(out), eps=PROBABILITY_EPSILON) for out in outputs]
        return _flatten_levels(outputs, self.num_classes)


class MoERegressionHead(MoESubnet):
    """RetinaNet's box-regression subnet as an MoE; ``compute_loss`` is torchvision's (L1)."""

    compute_loss = RetinaNetRegressionHead.compute_loss

    def __init__(self, num_anchors: int, spec: MoESpec) -> None:
        experts = []
        for _ in range(spec.num_experts):
            dense = RetinaNetRegressionHead(FPN_CHANNELS, num_anchors)
            experts.append(nn.Sequential(dense.conv, dense.bbox_reg))
        super().__init__(experts, spec)
        self.box_coder = dense.box_coder
        self._loss_type = dense._loss_type

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return _flatten_levels(super().forward(features), 4)


class MoERetinaNetHead(RetinaNetHead):
    """torchvision's head with the subnets in ``moe_subnets`` (``cls``, ``box``) as MoEs and the others
    dense; torchvision's ``forward`` and ``compute_loss`` unchanged."""

    def __init__(
        self, num_anchors: int, num_classes: int, spec: MoESpec, moe_subnets: tuple[str, ...] = ("cls", "box")
    ) -> None:
        nn.Module.__init__(self)
        self.classification_head = (
            MoEClassificationHead(num_anchors, num_classes, spec)
            if "cls" in moe_subnets
            else RetinaNetClassificationHead(FPN_CHANNELS, num_anchors, num_classes)
        )
        self.regression_head = (
            MoERegressionHead(num_anchors, spec)
            if "box" in moe_subnets
            else RetinaNetRegressionHead(FPN_CHANNELS, num_anchors)
        )


def module_aux_losses(
    routings: list[Routing],
    inputs: list[torch.Tensor],
    weights: AuxWeights,
    scope: str = "all_levels",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted auxiliary losses of one MoE module from its routings (one per FPN level for a head
    subnet, ``[B, E]`` each): ``all_levels`` computes each loss once over all levels' tokens together
    (``[5B, E]``, the reference), ``per_level`` once per level and sums them. ``inputs`` are the routed
    feature maps, for the sample-similarity loss (per level only: levels differ in shape); ``reduce`` sums
    statistics over data-parallel ranks (see :func:`~harness.moe.weighted_aux_losses`)."""
    if scope == "all_levels":
        if weights.beta_s or weights.beta_d:
            raise ValueError("the sample-similarity loss compares same-shaped inputs: use the per_level scope")
        return weighted_aux_losses(concat_routings(routings), None, weights, reduce)
    if scope != "per_level":
        raise ValueError(f"scope must be all_levels or per_level, got {scope!r}")
    losses: dict[str, torch.Tensor] = {}
    for routing, level_inputs in zip(routings, inputs):
        add_losses(losses, weighted_aux_losses(routing, level_inputs, weights, reduce))
    return losses


class RoutedStage(nn.Module):
    """An :class:`MoEStage` where a plain tensor is expected (torchvision's backbone): returns the output
    tensor and keeps the routing in ``routings``. ``[N, C_in, H, W] -> [N, C_out, H', W']``."""

    def __init__(self, stage: MoEStage) -> None:
        super().__init__()
        self.stage = stage
        self.routings: list[Routing] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage(x)
        self.routings, self.inputs = [out.routing], [x] if self.training else []
        return out.output


def narrow_bottleneck_stage(inner: int) -> nn.Sequential:
    """ResNet-50 layer4 (1024 -> 2048 channels, stride 2, three Bottlenecks) with inner width ``inner``."""
    from torchvision.models.resnet import Bottleneck

    base_width = inner * 64 / 512  # Bottleneck's inner width = planes * base_width / 64
    downsample = nn.Sequential(nn.Conv2d(1024, 2048, 1, stride=2, bias=False), nn.BatchNorm2d(2048))
    return nn.Sequential(
        Bottleneck(1024, 512, stride=2, downsample=downsample, base_width=base_width),
        Bottleneck(2048, 512, base_width=base_width),
        Bottleneck(2048, 512, base_width=base_width),
    )


class MoERetinaNet(RetinaNet):
    """torchvision's RetinaNet with MoE layers; :meth:`routing_layers` names where each sits.

    ``forward(images: list of [3, H, W], targets) -> loss dict`` in training, ``-> detections`` in eval
    (torchvision's contract); :meth:`routings` returns the last forward's routings per MoE layer.
    ``aux_weights`` and ``aux_scope``: the MoE layers' auxiliary losses (see :meth:`compute_loss`);
    ``aux_reduce``: how their statistics are summed over data-parallel ranks (None: this rank's batch);
    ``focal_clamp``: the focal loss sees the classification probabilities clamped to ``[focal_clamp,
    1 - focal_clamp]`` (None: unclamped).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        aux_weights: AuxWeights | None = None,
        aux_scope: str = "all_levels",
        focal_clamp: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **kwargs)
        self.aux_weights = aux_weights or AuxWeights()
        self.aux_scope = aux_scope
        self.focal_clamp = focal_clamp
        # Sums the balance losses' statistics over data-parallel ranks; set by the detection task per step.
        self.aux_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def moe_modules(self) -> dict[str, nn.Module]:
        """``{"cls_head"|"box_head"|"layer4": module}`` for every MoE-carrying module, in a fixed order."""
        found: dict[str, nn.Module] = {}
        if isinstance(self.head.classification_head, MoESubnet):
            found["cls_head"] = self.head.classification_head
        if isinstance(self.head.regression_head, MoESubnet):
            found["box_head"] = self.head.regression_head
        layer4 = getattr(self.backbone.body, "layer4", None)
        if isinstance(layer4, RoutedStage):
            found["layer4"] = layer4
        return found

    def routings(self) -> dict[str, list[Routing]]:
        """The last forward's routings: per MoE module, one per FPN level (heads) or one (layer4)."""
        return {name: module.routings for name, module in self.moe_modules().items()}

    def compute_loss(self, targets, head_outputs, anchors):  # noqa: ANN001 (torchvision's signature)
        """torchvision's ``classification`` and ``bbox_regression`` plus each configured auxiliary loss
        (``aux_weights``), one per MoE module over all its FPN levels (``aux_scope``), summed over modules,
        in the same loss dict. With ``focal_clamp`` the classification loss reads ``cls_logits`` ``[N, HWA, K]``
        through :func:`clamp_focal_logits`, whichever head (dense or MoE) gave them; detections do not."""
        if self.focal_clamp is not None:
            head_outputs = {
                **head_outputs,
                "cls_logits": clamp_focal_logits(head_outputs["cls_logits"], self.focal_clamp),
            }
        losses = super().compute_loss(targets, head_outputs, anchors)
        for module in self.moe_modules().values():
            add_losses(
                losses,
                module_aux_losses(module.routings, module.inputs, self.aux_weights, self.aux_scope, self.aux_reduce),
            )
        return add_losses(losses, router_weight_losses(self, self.aux_weights))


def _resnet_body(backbone: str, moe_layer4: nn.Module | None) -> nn.Module:
    if backbone not in ("resnet50", "resnet18"):
        raise ValueError(f"unknown backbone {backbone!r}; valid: resnet18, resnet50")
    # Trained from scratch: BatchNorm that learns (torchvision freezes it only for pretrained weights).
    body = getattr(torchvision.models, backbone)(weights=None)
    if moe_layer4 is not None:
        body.layer4 = moe_layer4
    return body


def build_retinanet(
    num_classes: int,
    backbone: str = "resnet50",
    moe_at: str | None = "heads",
    moe: MoESpec | None = None,
    expert_width: int | None = None,
    weights: str | None = None,
    expert_init: str = "copy",
    expert_init_noise: float = 0.0,
    min_size: int = 800,
    max_size: int = 1333,
    p6_from: str = "p5",
    focal_clamp: float | None = None,
    **moe_options: Any,
) -> MoERetinaNet:
    """RetinaNet with ``moe_at``: ``heads`` (both subnets MoE), ``cls_head`` or ``box_head`` (one of them),
    ``layer4`` (backbone stage MoE) or None (dense); its MoE layers as ``moe`` describes them (a
    :class:`~harness.moe.MoESpec`, auxiliary losses included; ``moe_options`` override its fields).
    ``num_classes`` counts the background. ``weights``: a local state_dict file (see :func:`load_weights`
    for ``expert_init`` and ``expert_init_noise``); ``p6_from``: ``p5`` (torchvision's RetinaNet v1) or
    ``c5`` (the reference's ``model.py``); ``focal_clamp``: see :class:`MoERetinaNet`."""
    spec = resolve_spec(moe, moe_options)
    moe_layer4 = None
    if moe_at == "layer4":
        inner = expert_width or 180
        count = spec.num_experts + spec.shared_experts  # shared experts: the same stage, ungated
        if backbone == "resnet18":
            experts = [expert_stage(4, inner) for _ in range(count)]
            in_channels, out_channels = 256, 512
        else:
            experts = [narrow_bottleneck_stage(inner) for _ in range(count)]
            in_channels, out_channels = 1024, 2048
        routed, shared = experts[: spec.num_experts], experts[spec.num_experts :]
        layer = build_moe_layer(routed, in_channels, out_channels, spec, shared=shared)
        moe_layer4 = RoutedStage(MoEStage(layer))
    body = _resnet_body(backbone, moe_layer4)
    # P6 from C5 (the reference's model.py; torchvision's LastLevelP6P7 reads C5 when its input width is
    # not the FPN's) or from P5 (torchvision's RetinaNet v1 weights).
    c5_channels = 512 if backbone == "resnet18" else 2048
    extra = LastLevelP6P7(c5_channels if p6_from == "c5" else FPN_CHANNELS, FPN_CHANNELS)
    fpn = _resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4], extra_blocks=extra)
    model = MoERetinaNet(
        fpn, num_classes, spec.aux_weights, spec.aux_scope, focal_clamp, min_size=min_size, max_size=max_size
    )
    if moe_at in ("heads", "cls_head", "box_head"):
        num_anchors = model.anchor_generator.num_anchors_per_location()[0]
        subnets = {"heads": ("cls", "box"), "cls_head": ("cls",), "box_head": ("box",)}[moe_at]
        model.head = MoERetinaNetHead(num_anchors, num_classes, spec, subnets)
    if weights is not None:
        load_weights(model, weights, expert_init, expert_init_noise)
    return model


def load_weights(
    model: MoERetinaNet, path: str | pathlib.Path, expert_init: str = "copy", expert_init_noise: float = 0.0
) -> dict[str, int]:
    """Load a local state_dict into ``model``: a dense RetinaNet (torchvision's, or a checkpoint of this
    harness's ``retinanet`` runs), an MoE RetinaNet of the same layout, or a plain ResNet (ImageNet
    backbone, loaded into ``backbone.body``). A dense head subnet goes into every expert of the MoE subnet
    that replaced it (``expert_init="copy"``, each copy plus Gaussian noise of std ``expert_init_noise``) or
    nowhere (``"fresh"``: the experts keep their own init). Tensors whose shape differs (e.g. a class conv
    for another number of classes) keep their initial values. Returns :func:`load_state`'s counts;
    a file that matches nothing is a ConfigError."""
    if expert_init not in ("copy", "fresh"):
        raise ValueError(f"expert_init must be copy or fresh, got {expert_init!r}")
    state = read_state_dict(path)
    if not any(key.startswith(("backbone.", "head.")) for key in state):
        state = {f"backbone.body.{key}": value for key, value in state.items()}  # a plain ResNet
    subnets = {"classification_head": "cls_logits", "regression_head": "bbox_reg"}
    moe_subnets = [name for name in subnets if isinstance(getattr(model.head, name), MoESubnet)]
    mapped: dict[str, torch.Tensor] = {}
    skipped = 0
    for key, value in state.items():
        subnet = next((name for name in moe_subnets if key.startswith(f"head.{name}.") and ".moe." not in key), None)
        if subnet is None:
            mapped[key] = value
            continue
        if expert_init == "fresh":
            skipped += 1
            continue
        prefix = f"head.{subnet}."
        rest = key[len(prefix) :]
        final = subnets[subnet]
        part = "0." + rest[len("conv.") :] if rest.startswith("conv.") else "1." + rest[len(final) + 1 :]
        for e in range(getattr(model.head, subnet).moe.num_experts):
            copy = value.clone()
            if expert_init_noise and copy.is_floating_point():
                copy += torch.randn_like(copy) * expert_init_noise
            mapped[f"{prefix}moe.experts.{e}.{part}"] = copy
    return load_state(model, mapped, path, left_out=skipped)


@register_model
def retinanet(
    num_classes: int = 91,
    backbone: str = "resnet50",
    weights: str | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    p6_from: str = "p5",
    focal_clamp: float | None = None,
    **_: Any,
) -> MoERetinaNet:
    """Dense torchvision RetinaNet (ResNet-FPN) baseline (MoE-only options are ignored)."""
    return build_retinanet(
        num_classes,
        backbone,
        None,
        weights=weights,
        min_size=min_size,
        max_size=max_size,
        p6_from=p6_from,
        focal_clamp=focal_clamp,
    )


@register_model
def retinanet_moe(num_classes: int = 91, **kwargs: Any) -> MoERetinaNet:
    """RetinaNet whose head subnets (``moe_at="heads"``, paper: E=4, k=2), one of them (``cls_head``,
    ``box_head``) or backbone layer4 (``moe_at="layer4"``) are MoEs; see :func:`build_retinanet`."""
    kwargs.setdefault("moe_at", "heads")
    return build_retinanet(num_classes, **kwargs)


def fpn_level_of_objects(areas: torch.Tensor, scale: float) -> torch.Tensor:
    """``[M]`` object areas (original pixels) and the model's resize factor -> ``[M]`` FPN level index
    0..4 (P3..P7) whose anchors (32 * 2^l pixels) match the object's resized size best."""
    side = areas.clamp_min(1.0).sqrt() * scale
    return torch.log2(side / 32).round().clamp(0, NUM_LEVELS - 1).long()


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The factor torchvision's ``GeneralizedRCNNTransform`` resizes an image by."""
    return min(min_size / min(height, width), max_size / max(height, width))
