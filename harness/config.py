"""Typed, strictly validated experiment config and YAML study loading.

A study file holds ``name``, a complete ``base`` run config and a ``sweep`` section (dotted keys ->
search domains, consumed by :mod:`harness.sweep`). Every mistake is a :class:`ConfigError` whose one-line
message names the field.
"""

from __future__ import annotations

import copy
import difflib
import pathlib
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .moe.balancing import AuxWeights

DATASETS = ("cifar100", "synthetic_cifar", "mnist", "fashion_mnist", "coco", "synthetic_coco")
DETECTION_DATASETS = ("coco", "synthetic_coco")
# Where a data set lives when data.root is not set (relative to the launching directory).
DEFAULT_ROOTS = {"synthetic_cifar": ".cache", "synthetic_coco": ".cache", "coco": "data/coco"}


class Strict(BaseModel):
    """Base: unknown keys are errors; numbers are not silently made from strings."""

    model_config = ConfigDict(extra="forbid")


class GateConfig(Strict):
    """The gate network (``type``) and Shazeer's noisy top-k on any gate (``noisy``, training only)."""

    type: Literal["gap_fc", "conv_gap_fc", "conv_gap_fc_relu", "relu_gap_fc", "attentive"] = Field(
        "gap_fc", description="gap_fc = GAP, linear; conv_gap_fc = Pavlitska's ConvGate (3x3 conv without padding "
        "or ReLU, GAP, linear); conv_gap_fc_relu = padded conv + ReLU (this project's earlier form); relu_gap_fc = "
        "ReLU, GAP, linear (what Pavlitska's FCGate computes); attentive = Krishnamurthy's attention over the "
        "experts' hidden features")
    noisy: bool = False
    noise_form: Literal["pavlitska", "shazeer"] = Field(
        "pavlitska", description="noise scale softplus(W GAP(x) + 0.01) with W at default init (Pavlitska's code) "
        "or softplus(W GAP(x) + b) + 0.01 with W, b zero-initialised (Shazeer et al.)")
    input: Literal["layer", "image"] = Field(
        "layer", description="resnet18_moe: gates see the MoE stage's input, or one shared 3x3 conv of the input "
        "image with a linear gate per layer (Pavlitska's global gating; needs type gap_fc)")
    hidden_channels: int = Field(256, ge=1, description="conv_gap_fc: channels of the 3x3 conv")
    attention_dim: int | None = Field(None, ge=1, description="attentive: query/key size d; null = the experts' "
                                      "hidden size (the reference)")


class SampleSimilarityConfig(Strict):
    """Krishnamurthy et al.'s sample-similarity loss ``beta_s * S_same - beta_d * S_diff / N^2``."""

    beta_s: float = Field(0.0, ge=0)
    beta_d: float = Field(0.0, ge=0)
    scaling: Literal["reference", "symmetric"] = Field(
        "reference", description="reference = only the beta_d term divided by N^2 (the reference code); "
        "symmetric = both terms divided by N^2")
    distance: Literal["max_normalized", "raw"] = Field(
        "max_normalized", description="pairwise input distances divided by their batch maximum (reference code "
        "at HEAD) or raw (the reference commit that produced the MNIST / FashionMNIST tables)")


class LossesConfig(Strict):
    """Weights of the auxiliary balancing losses (0 = off)."""

    importance: float = Field(0.0, ge=0)
    load: float = Field(0.0, ge=0)
    kl_uniform: float = Field(0.0, ge=0)
    switch: float = Field(0.0, ge=0)
    z_loss: float = Field(0.0, ge=0, description="router z-loss weight (Zoph et al. 2022): w * mean (logsumexp logits)^2")
    sample_similarity: SampleSimilarityConfig = SampleSimilarityConfig()
    detection_scope: Literal["all_levels", "per_level"] = Field(
        "all_levels", description="retinanet_moe: one loss per subnet over the gates of all FPN levels together "
        "(reference code) or one per level, summed")

    def aux_weights(self) -> AuxWeights:
        """These weights as the MoE layer's :class:`~harness.moe.AuxWeights`."""
        s = self.sample_similarity
        return AuxWeights(importance=self.importance, load=self.load, kl_uniform=self.kl_uniform, switch=self.switch,
                          z_loss=self.z_loss, beta_s=s.beta_s, beta_d=s.beta_d, similarity_scaling=s.scaling,
                          similarity_distance=s.distance)


class RoutingConfig(Strict):
    """How tokens and experts are matched: ``top_k`` (each token its k best experts), ``expert_choice`` (each
    expert its ``ceil(cf * N * k / E)`` best tokens of the batch; Zhou et al. 2022) or
    ``balanced_assignment`` (top-k of Sinkhorn-balanced scores in training, plain top-k in evaluation; BASE
    layers, Lewis et al. 2021)."""

    type: Literal["top_k", "expert_choice", "balanced_assignment"] = "top_k"
    sinkhorn_iterations: int = Field(10, ge=1, description="balanced_assignment: Sinkhorn iterations")


class BiasBalancingConfig(Strict):
    """Auxiliary-loss-free balancing (Wang et al. 2024, DeepSeek-V3): a per-expert bias on the logits for the
    top-k choice only, ``b_i += update_rate * sign(mean load - load_i)`` after every training step."""

    update_rate: float = Field(1e-3, gt=0, description="u, the bias step per training step")


class ConstraintConfig(Strict):
    """A hard constraint: ``relative_importance`` or ``mean_importance`` with its threshold (> 0)."""

    type: Literal["relative_importance", "mean_importance"]
    threshold: float = Field(gt=0)


class MoEConfig(Strict):
    """Where the experts sit and how they are balanced."""

    num_experts: int = Field(4, ge=1, description="E; 1 is the single-expert baseline")
    k: int = Field(2, ge=1)
    position: list[int] = Field(default_factory=lambda: [4], min_length=1)
    expert_width: int | None = Field(None, ge=1, description="inner width of each expert stage")
    expert_layout: Literal["reference", "inner_narrow"] = Field(
        "reference", description="resnet18_moe: reference = Pavlitska's expert (BasicBlock in -> w, then w -> out); "
        "inner_narrow = each block narrow inside (in -> w -> out, out -> w -> out)")
    residual: bool = False
    gate: GateConfig = GateConfig()
    capacity_factor: float | None = Field(None, gt=0)
    dispatch: Literal["auto", "loop", "padded", "sorted"] = Field(
        "auto", description="loop = reference; padded = static-shape fast path; sorted = exact slices, one host read "
        "per layer; auto = padded with a capacity_factor, else sorted"
    )
    losses: LossesConfig = LossesConfig()
    constraint: ConstraintConfig | None = None
    routing: RoutingConfig = RoutingConfig()
    bias_balancing: BiasBalancingConfig | None = Field(None, description="null = off")

    @field_validator("position", mode="before")
    @classmethod
    def _scalar_position(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @field_validator("position")
    @classmethod
    def _position_range(cls, value: list[int]) -> list[int]:
        bad = [p for p in value if not 1 <= p <= 4]
        if bad:
            raise ValueError(f"stage positions must be in 1..4, got {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"stage positions must be distinct, got {value}")
        return sorted(value)

    def model_options(self) -> dict[str, Any]:
        """The constructor options every MoE model (``resnet18_moe``, ``small_cnn_moe``, ``retinanet_moe``)
        takes from this section."""
        return dict(
            num_experts=self.num_experts, k=self.k, gate=self.gate.type, noisy=self.gate.noisy,
            noise_form=self.gate.noise_form, capacity_factor=self.capacity_factor, dispatch=self.dispatch,
            constraint=self.constraint.model_dump() if self.constraint else None,
            gate_hidden_channels=self.gate.hidden_channels, attention_dim=self.gate.attention_dim,
            routing=self.routing.type, sinkhorn_iterations=self.routing.sinkhorn_iterations,
            bias_update_rate=self.bias_balancing.update_rate if self.bias_balancing else None,
        )

    @model_validator(mode="after")
    def _k_at_most_e(self) -> MoEConfig:
        if self.k > self.num_experts:
            raise ValueError(f"k={self.k} exceeds num_experts={self.num_experts}")
        return self

    @model_validator(mode="after")
    def _expert_choice_combinations(self) -> MoEConfig:
        # Under expert choice every expert is full by construction: a bias on the token's choice is never
        # used, and Shazeer's load estimator (for top-k under noise) is constant.
        if self.routing.type == "expert_choice" and self.bias_balancing is not None:
            raise ValueError("bias_balancing: has no effect under routing.type expert_choice (experts choose tokens)")
        if self.routing.type == "expert_choice" and self.losses.load:
            raise ValueError("losses.load: Shazeer's load estimator is for top-k routing, not expert_choice")
        return self


class TowerConfig(Strict):
    """small_cnn_moe's expert or gate network: 3x3 convs (each with ReLU and 2x2 max-pool), then fully
    connected layers (the last one's output is the hidden features)."""

    conv: list[int] = Field(description="output channels of each 3x3 conv")
    fc: list[int] = Field(min_length=1, description="sizes of the fully connected layers")
    padding: int = Field(0, ge=0, le=1, description="conv padding (0 in the reference's MNIST nets, 1 for CIFAR)")
    batchnorm: list[int] = Field(default_factory=list, description="convs (0-based) followed by BatchNorm")

    @model_validator(mode="after")
    def _batchnorm_names_a_conv(self) -> TowerConfig:
        bad = [i for i in self.batchnorm if not 0 <= i < len(self.conv)]
        if bad:
            raise ValueError(f"batchnorm: conv indices {bad} out of range 0..{len(self.conv) - 1}")
        return self


class ModelConfig(Strict):
    name: str = "resnet18_moe"
    expert: TowerConfig | None = Field(None, description="small_cnn_moe: each expert's network; null = the "
                                       "reference's MNIST expert (conv 1 channel, fc 5, 32)")
    gate_network: TowerConfig | None = Field(None, description="small_cnn_moe: the gate's network; null = the "
                                             "reference's MNIST gate (conv 1 channel, fc 128, 32)")
    backbone: Literal["resnet50", "resnet18"] = Field("resnet50", description="retinanet*: ResNet-FPN backbone")
    moe_at: Literal["heads", "cls_head", "box_head", "layer4"] = Field(
        "heads", description="retinanet_moe: both head subnets as MoEs, only the classification or the box "
        "subnet, or backbone layer4")
    cls_mixture: Literal["probabilities", "logits"] = Field(
        "probabilities", description="retinanet_moe: the classification experts' outputs are mixed as sigmoid "
        "probabilities (the reference) or as logits")
    weights: str | None = Field(None, description="local state_dict file to start from: a checkpoint of an "
                                "earlier run (replicated.pt or a --save-model file), a torchvision RetinaNet or "
                                "an ImageNet ResNet (retinanet*); tensors of other shapes keep their init")
    expert_init: Literal["copy", "fresh"] = Field(
        "copy", description="retinanet_moe with dense-head weights: every expert starts as a copy of the dense "
        "subnet (mixed_moe_pretrained.py) or at its own fresh init (mixed_moe.py)")
    expert_init_noise: float = Field(0.0, ge=0, description="std of Gaussian noise added to each copied expert's "
                                     "parameters (the reference means to add 0.1 but its code adds none)")

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from .models import MODELS

        if value not in MODELS:
            raise ValueError(f"unknown model {value!r}; valid: {', '.join(sorted(MODELS))}")
        return value


class SyntheticConfig(Strict):
    """Size of the generated ``synthetic_cifar`` / ``synthetic_coco`` sets."""

    train_per_class: int = Field(50, ge=1)
    test_per_class: int = Field(10, ge=1)
    train_images: int = Field(48, ge=1, description="synthetic_coco training images")
    val_images: int = Field(16, ge=1, description="synthetic_coco validation images")
    image_size: int = Field(256, ge=160, description="synthetic_coco image side in pixels (large objects need >= 160)")
    seed: int = 0


class CocoConfig(Strict):
    """COCO layout under ``data.root`` (paths relative to it) and the detector's resize."""

    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    min_size: int = Field(800, ge=32, description="shorter image side after resizing")
    max_size: int = Field(1333, ge=32, description="cap on the longer side after resizing")
    max_val_images: int | None = Field(None, ge=1, description="evaluate on the first N validation images only")


class DataConfig(Strict):
    name: Literal["cifar100", "synthetic_cifar", "mnist", "fashion_mnist", "coco", "synthetic_coco"] = "synthetic_cifar"
    root: str | None = Field(None, description="data set root; synthetic_*: cache directory")
    batch_size: int = Field(128, ge=1)
    val_batch_size: int = Field(512, ge=1)
    augment: bool = True
    val_size: int = Field(2000, ge=1, description="held-out images when only a test split exists (MNIST)")
    synthetic: SyntheticConfig = SyntheticConfig()
    coco: CocoConfig = CocoConfig()


class OptimConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    clip_grad_norm: float | None = Field(None, gt=0, description="clip the gradients' global L2 norm to this")


class ScheduleConfig(Strict):
    """LR schedule, stepped per epoch: ``constant``, ``multistep`` (milestones, gamma) or ``cosine``; plus a
    linear warm-up over the first ``warmup_steps`` steps of epoch 1 (torchvision's detection recipe)."""

    name: Literal["constant", "multistep", "cosine"] = "constant"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up steps at the start of epoch 1")


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16"] = Field("auto", description="auto = bf16 autocast on CUDA, off on CPU")
    channels_last: Literal["auto"] | bool = Field(
        "auto", description="classification model in channels_last memory format; auto = on CUDA (tensor cores)")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on training steps per epoch")
    check_every: int = Field(20, ge=1, description="steps between checks for a non-finite loss")
    freeze: list[str] = Field(default_factory=list, description="parameter-name patterns (fnmatch, e.g. "
                              "'backbone.*') whose parameters are not trained")
    frozen_bn: bool = Field(False, description="BatchNorm layers stay in eval mode in training: running "
                            "statistics fixed (the reference's freeze_bn; their affine parameters train unless "
                            "frozen by a pattern)")
    test_time_k: bool = Field(False, description="after the last epoch also evaluate with k = 1..E experts per "
                              "token (val_top1_k<k>; Pavlitska's varying_k_accuracy.py)")


class DistributedConfig(Strict):
    """How a run is spread over Ray Train workers. ``num_workers: 0`` trains in this process without Ray."""

    num_workers: int = Field(0, ge=0)
    use_gpu: Literal["auto"] | bool = Field("auto", description="auto = GPUs if the Ray cluster has any")
    resources_per_worker: dict[str, float] | None = Field(None, description="e.g. {CPU: 2, GPU: 0.5}")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    expert_parallel: bool = False
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1 = no limit")
    checkpoint_every: int = Field(1, ge=0, description="epochs between checkpoints (and after the last); 0 = never")
    num_to_keep: int | None = Field(2, ge=1, description="checkpoints kept on storage")
    storage_path: str = Field("results", description="local path or URI (s3://, gs://); shared by all nodes")
    run_name: str | None = Field(None, description="default: <study>-<hash of the config>, so a rerun resumes")

    @field_validator("resources_per_worker")
    @classmethod
    def _positive(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, amount in (value or {}).items():
            if amount < 0:
                raise ValueError(f"{key}: must be >= 0, got {amount}")
        return value


class RunConfig(Strict):
    """One training run: everything ``train_loop`` needs."""

    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    moe: MoEConfig | None = MoEConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _expert_parallel_fits(self) -> RunConfig:
        d = self.distributed
        if not d.expert_parallel:
            return self
        if self.moe is None or not self.model.name.endswith("_moe"):
            raise ValueError("distributed.expert_parallel needs an MoE model")
        if d.num_workers < 1:
            raise ValueError("distributed.expert_parallel needs distributed.num_workers >= 1")
        if self.moe.num_experts < d.num_workers:
            raise ValueError(
                f"distributed.expert_parallel: {self.moe.num_experts} experts cannot be spread over "
                f"{d.num_workers} workers (each needs at least one)"
            )
        if self.moe.gate.type == "attentive":
            raise ValueError("distributed.expert_parallel: the attentive gate needs every expert on every token")
        return self

    @model_validator(mode="after")
    def _moe_matches_model(self) -> RunConfig:
        is_moe = self.model.name.endswith("_moe")
        if is_moe and self.moe is None:
            raise ValueError(f"model {self.model.name!r} needs a 'moe' section")
        if self.model.name == "small_cnn_moe" and self.data.name in DETECTION_DATASETS:
            raise ValueError("small_cnn_moe is a classifier: use data.name mnist, fashion_mnist, cifar100 or synthetic_cifar")
        if is_moe and self.moe.gate.input == "image" and self.model.name != "resnet18_moe":
            raise ValueError("moe.gate.input: image (global gating) is for resnet18_moe")
        if is_moe and self.moe.gate.input == "image" and self.moe.gate.type != "gap_fc":
            raise ValueError("moe.gate.input: image gives each layer a linear gate on the shared image features; "
                             "set moe.gate.type: gap_fc")
        detector = self.model.name.startswith("retinanet")
        if detector != (self.data.name in DETECTION_DATASETS):
            raise ValueError(
                f"model {self.model.name!r} does not fit data {self.data.name!r}: retinanet and retinanet_moe "
                f"go with {' / '.join(DETECTION_DATASETS)}, the classifiers with the other data sets"
            )
        if detector and is_moe and self.moe.gate.type == "attentive":
            raise ValueError("moe.gate.type: attentive is for whole-model experts; retinanet_moe takes the other gates")
        if detector and is_moe:
            similarity = self.moe.losses.sample_similarity
            if (similarity.beta_s or similarity.beta_d) and self.moe.losses.detection_scope == "all_levels":
                raise ValueError("moe.losses.sample_similarity: retinanet_moe compares inputs within one FPN level "
                                 "only; set moe.losses.detection_scope: per_level")
        if detector and self.distributed.expert_parallel:
            raise ValueError("distributed.expert_parallel: not supported for retinanet_moe (data parallelism is)")
        return self


class StudyConfig(Strict):
    """A study file: ``name``, ``base`` (a complete :class:`RunConfig`) and ``sweep`` (dotted key -> domain)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: RunConfig
    sweep: dict[str, Any] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Loading, overrides and one-line errors


def _model_fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model that ``loc`` points into, for "did you mean" hints."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            break
        nested = nested_model(field.annotation)
        if nested is None:
            break
        model = nested
    return list(model.model_fields)


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The config section type behind a field annotation (``MoEConfig | None`` -> ``MoEConfig``), if any."""
    candidates = [annotation, *get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def format_validation_error(error: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """The first problem as one line: ``field.path: message``."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    field = ".".join(str(p) for p in (prefix, *loc) if p != "")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        valid = _model_fields_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        message = f"unknown key{hint} (valid: {', '.join(valid)})"
    count = len(error.errors())
    more = f" (and {count - 1} more problem{'s' if count > 2 else ''})" if count > 1 else ""
    return f"{field or '<root>'}: {message}{more}"


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)`` with the value parsed as YAML (numbers, bools, null, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b] = value`` for ``key = "a.b"``, creating dicts where a section is unset."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key!r} inside it")
        node = child
    node[parts[-1]] = value


def apply_overrides(study: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw study dict. Keys are relative to ``base`` unless they start with
    ``base.``, ``sweep.`` or are ``name``."""
    study = copy.deepcopy(study)
    study.setdefault("base", {})
    for text in overrides:
        key, value = parse_override(text)
        root = key.split(".")[0]
        if root in ("base", "sweep", "name"):
            set_dotted(study, key, value)
        else:
            set_dotted(study["base"], key, value)
    return study


def validate_run(raw: dict[str, Any], prefix: str = "base") -> RunConfig:
    """Validate a run config dict, raising :class:`ConfigError` with the field's dotted path."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, RunConfig, prefix)) from None


def read_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    """Read a YAML mapping; missing file or bad YAML is a one-line :class:`ConfigError` naming the file."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such study file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'name', 'base' and 'sweep', got {type(data).__name__}")
    return data


def load_study(path: str | pathlib.Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read, override and validate a study file."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_validation_error(exc, StudyConfig)}") from None


def absolutize_paths(base: dict[str, Any], cwd: pathlib.Path | None = None) -> dict[str, Any]:
    """Make ``data.root``, ``model.weights`` and a local ``distributed.storage_path`` absolute (relative to
    ``cwd``), since Ray workers and Tune trials do not run in the launching directory. Returns a new dict."""
    cwd = cwd or pathlib.Path.cwd()
    base = copy.deepcopy(base)
    data = base.setdefault("data", {}) or {}
    name = data.get("name", DataConfig.model_fields["name"].default)
    if data.get("root") is None and name in DEFAULT_ROOTS:
        data["root"] = DEFAULT_ROOTS[name]  # the loader's default, pinned to the launching directory
    if isinstance(data.get("root"), str):
        data["root"] = str((cwd / data["root"]).resolve())
    model = base.get("model") or {}
    if isinstance(model.get("weights"), str):
        model["weights"] = str((cwd / model["weights"]).resolve())
    distributed = base.get("distributed") or {}
    storage = distributed.get("storage_path")
    if isinstance(storage, str) and "://" not in storage:
        distributed["storage_path"] = str((cwd / storage).resolve())
    return base


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists and scalars are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat

