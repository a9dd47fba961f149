"""Typed, strictly validated experiment config (:mod:`.schema`, its MoE section in :mod:`.moe`) and YAML study
loading (:mod:`.study`).

A study file holds ``name``, a complete ``base`` run config and a ``sweep`` section (dotted keys ->
search domains, consumed by :mod:`harness.sweep`). Every mistake is a :class:`ConfigError` whose one-line
message names the field.
"""

from .moe import (
    BiasBalancingConfig,
    ConstraintConfig,
    GateConfig,
    LossesConfig,
    MoEConfig,
    RoutingConfig,
    SampleSimilarityConfig,
    Strict,
)
from .schema import (
    DATASETS,
    DEFAULT_ROOTS,
    DETECTION_DATASETS,
    CocoConfig,
    DataConfig,
    DistributedConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    StudyConfig,
    SyntheticConfig,
    TowerConfig,
    TrackingConfig,
    TrainConfig,
)
from .study import (
    absolutize_paths,
    apply_overrides,
    flatten,
    format_validation_error,
    load_study,
    nested_model,
    parse_override,
    read_study,
    read_yaml,
    resolve_entry,
    set_dotted,
    trial_config,
    validate_run,
)

__all__ = [
    "DATASETS",
    "DEFAULT_ROOTS",
    "DETECTION_DATASETS",
    "BiasBalancingConfig",
    "CocoConfig",
    "ConstraintConfig",
    "DataConfig",
    "DistributedConfig",
    "GateConfig",
    "LossesConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimConfig",
    "RoutingConfig",
    "RunConfig",
    "SampleSimilarityConfig",
    "ScheduleConfig",
    "Strict",
    "StudyConfig",
    "SyntheticConfig",
    "TowerConfig",
    "TrackingConfig",
    "TrainConfig",
    "absolutize_paths",
    "apply_overrides",
    "flatten",
    "format_validation_error",
    "load_study",
    "read_study",
    "resolve_entry",
    "trial_config",
    "nested_model",
    "parse_override",
    "read_yaml",
    "set_dotted",
    "validate_run",
]
