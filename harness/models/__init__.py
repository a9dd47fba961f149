"""MoE-CNN models behind a registry: ``create_model("resnet18_moe", num_classes=100, num_experts=4, k=2)``."""

from . import resnet_moe, retinanet_moe, small_cnn_moe  # noqa: F401  (registers the constructors)
from .registry import MODELS, ModelOutput, create_model, register_model

__all__ = ["MODELS", "ModelOutput", "create_model", "register_model"]
