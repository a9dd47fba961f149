"""Sparsely-gated Mixture-of-Experts layer for CNNs: gates -> routing -> dispatch -> experts."""

from .balancing import (
    CONSTRAINTS,
    AuxWeights,
    HardConstraint,
    MeanImportanceConstraint,
    RelativeImportanceConstraint,
    importance,
    importance_loss,
    kl_uniform_loss,
    load,
    load_loss,
    router_z_loss,
    sample_similarity_loss,
    switch_loss,
    weighted_aux_losses,
)
from .dispatch import (
    LocalDispatcher,
    MaskedBatchNorm2d,
    PaddedDispatcher,
    SortedDispatcher,
    combine_dense,
    padded_slots,
)
from .gates import GATES, AttentiveGate, ConvGapFcGate, GapFcGate, build_gate
from .layer import MoELayer, MoEOutput, build_moe_layer
from .routing import Routing, TopKRouter, concat_routings, expert_capacity

__all__ = [
    "CONSTRAINTS",
    "AuxWeights",
    "GATES",
    "AttentiveGate",
    "ConvGapFcGate",
    "GapFcGate",
    "HardConstraint",
    "LocalDispatcher",
    "MaskedBatchNorm2d",
    "PaddedDispatcher",
    "MeanImportanceConstraint",
    "MoELayer",
    "MoEOutput",
    "RelativeImportanceConstraint",
    "Routing",
    "SortedDispatcher",
    "TopKRouter",
    "build_gate",
    "build_moe_layer",
    "combine_dense",
    "concat_routings",
    "expert_capacity",
    "importance",
    "importance_loss",
    "kl_uniform_loss",
    "load",
    "load_loss",
    "router_z_loss",
    "padded_slots",
    "sample_similarity_loss",
    "switch_loss",
    "weighted_aux_losses",
]
