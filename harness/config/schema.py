"""The typed, strictly validated schema of a study: :class:`RunConfig` (one training run, by section) and
:class:`StudyConfig` (a study file: ``name``, ``base``, ``sweep``). Unknown keys are errors; every field
has a default and a one-line description (``docs/studies.md`` is generated from them).
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from ..extras import installed_coco_backend, missing_extra
from ..metrics.names import task_main_metric
from ..plugins import check_name, check_own_arguments, is_import_path, load_object
from .moe import MoEConfig, Strict

DATASETS = ("cifar100", "synthetic_cifar", "mnist", "fashion_mnist", "coco", "synthetic_coco")
DETECTION_DATASETS = ("coco", "synthetic_coco")
# Where a data set lives when data.root is not set (relative to the launching directory).
DEFAULT_ROOTS = {"synthetic_cifar": ".cache", "synthetic_coco": ".cache", "coco": "data/coco"}


class TowerConfig(Strict):
    """small_cnn_moe's expert or gate network: 3x3 convs (each with ReLU and 2x2 max-pool), then fully
    connected layers (the last one's output is the hidden features)."""

    conv: list[int] = Field(description="output channels of each 3x3 conv")
    fc: list[int] = Field(min_length=1, description="sizes of the fully connected layers")
    padding: int = Field(0, ge=0, le=1, description="conv padding (0 in the reference's MNIST nets, 1 for CIFAR)")
    batchnorm: list[int] = Field(default_factory=list, description="convs (0-based) followed by BatchNorm")
    hidden_relu: bool | None = Field(
        None,
        description="gate_network only: a ReLU on the hidden features the gate "
        "reads; null = the reference's MNIST gates (ReLU for the classic gate, none "
        "for the attentive one); its FashionMNIST attentive gate has one (true)",
    )

    @model_validator(mode="after")
    def _batchnorm_names_a_conv(self) -> TowerConfig:
        bad = [i for i in self.batchnorm if not 0 <= i < len(self.conv)]
        if bad:
            raise ValueError(f"batchnorm: conv indices {bad} out of range 0..{len(self.conv) - 1}")
        return self


# What the harness passes a model of your own, first and by these names (harness.tasks.classification).
CUSTOM_MODEL_INPUTS = ("num_classes", "in_channels", "image_size", "moe")


class ModelConfig(Strict):
    name: str = Field(
        "resnet18_moe",
        description="a registered model, or a classifier of your own by import path (package.module:name, "
        "docs/extending.md); a name ending in _moe is an MoE, retinanet* a detector",
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="a model of your own: its constructor's arguments after (num_classes, in_channels, "
        "image_size, moe)",
    )
    expert: TowerConfig | None = Field(
        None,
        description="small_cnn_moe: each expert's network; null = the "
        "reference's MNIST expert (conv 1 channel, fc 5, 32)",
    )
    gate_network: TowerConfig | None = Field(
        None,
        description="small_cnn_moe: the gate's network; null = the reference's MNIST gate (conv 1 channel, fc 128, 32)",
    )
    backbone: Literal["resnet50", "resnet18"] = Field("resnet50", description="retinanet*: ResNet-FPN backbone")
    init: Literal["reference", "kaiming"] = Field(
        "reference",
        description="resnet18*: the 3x3 stem conv and the MoE experts at PyTorch's default init "
        "(Pavlitska's code) or kaiming-normal fan_out (as torchvision's stages)",
    )
    p6_from: Literal["c5", "p5"] = Field(
        "p5",
        description="retinanet*: the FPN's P6 from P5 (torchvision's "
        "RetinaNet v1) or from the backbone's C5 (the reference's model.py; the "
        "COCO studies)",
    )
    focal_clamp: float | None = Field(
        None,
        gt=0,
        lt=0.5,
        description="retinanet*: the focal loss sees the classification probabilities clamped to [eps, 1 - eps] "
        "(their logits to +-log((1 - eps) / eps), zero gradient outside), dense and MoE head alike (the "
        "reference's FocalLoss: 1e-4, the COCO studies); null = unclamped (the MoE head's mixed probabilities "
        "stay within [1e-7, 1 - 1e-7] for a finite logit); the classifiers refuse it",
    )
    moe_at: Literal["heads", "cls_head", "box_head", "layer4"] = Field(
        "heads",
        description="retinanet_moe: both head subnets as MoEs, only the classification or the box "
        "subnet, or backbone layer4",
    )
    weights: str | None = Field(
        None,
        description="local state_dict file to start from: a checkpoint of an "
        "earlier run (replicated.pt or a --save-model file), a torchvision RetinaNet or "
        "an ImageNet ResNet (retinanet*); tensors of other shapes keep their init",
    )
    expert_init: Literal["copy", "fresh"] = Field(
        "copy",
        description="retinanet_moe with dense-head weights: every expert starts as a copy of the dense "
        "subnet (mixed_moe_pretrained.py) or at its own fresh init (mixed_moe.py)",
    )
    expert_init_noise: float = Field(
        0.0,
        ge=0,
        description="std of Gaussian noise added to each copied expert's "
        "parameters (the reference means to add 0.1 but its code adds none)",
    )
    expert_execution: Literal["stacked", "modules"] = Field(
        "stacked",
        description="small_cnn_moe: where every expert sees every token (dense gate, attentive gate), "
        "run the experts as one network with stacked weights (same parameters and results up to rounding), or "
        "expert by expert as the reference",
    )

    @model_validator(mode="after")
    def _hidden_relu_is_for_gates(self) -> ModelConfig:
        if self.expert is not None and self.expert.hidden_relu is not None:
            raise ValueError("expert.hidden_relu: only the gate_network has it (an expert's head always has a ReLU)")
        return self

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from ..models import MODELS

        return check_name(value, MODELS, "model")

    @model_validator(mode="after")
    def _custom_model_arguments(self) -> ModelConfig:
        if is_import_path(self.name):
            parameters = list(inspect.signature(load_object(self.name)).parameters)[: len(CUSTOM_MODEL_INPUTS)]
            if parameters != list(CUSTOM_MODEL_INPUTS):
                raise ValueError(
                    f"name: {self.name} must take ({', '.join(CUSTOM_MODEL_INPUTS)}, ...) first, "
                    f"not ({', '.join(parameters)})"
                )
        self.args = check_own_arguments(self.name, self.args, len(CUSTOM_MODEL_INPUTS), "model")
        return self


class SyntheticConfig(Strict):
    """Size of the generated ``synthetic_cifar`` / ``synthetic_coco`` sets."""

    train_per_class: int = Field(50, ge=1, description="synthetic_cifar training images per class (100 classes)")
    test_per_class: int = Field(10, ge=1, description="synthetic_cifar validation images per class")
    train_images: int = Field(48, ge=1, description="synthetic_coco training images")
    val_images: int = Field(16, ge=1, description="synthetic_coco validation images")
    image_size: int = Field(256, ge=160, description="synthetic_coco image side in pixels (large objects need >= 160)")
    seed: int = Field(0, description="seed of the generated images (each seed has its own cache folder)")


class CocoConfig(Strict):
    """COCO layout under ``data.root`` (paths relative to it) and the detector's resize."""

    train_images: str = Field("train2017", description="folder of the training images")
    train_annotations: str = Field("annotations/instances_train2017.json", description="instances JSON of train_images")
    val_images: str = Field("val2017", description="folder of the validation images")
    val_annotations: str = Field("annotations/instances_val2017.json", description="instances JSON of val_images")
    min_size: int = Field(800, ge=32, description="shorter image side after resizing")
    max_size: int = Field(1333, ge=32, description="cap on the longer side after resizing")
    max_val_images: int | None = Field(None, ge=1, description="evaluate on the first N validation images only")


class DataConfig(Strict):
    name: Literal["cifar100", "synthetic_cifar", "mnist", "fashion_mnist", "coco", "synthetic_coco"] = Field(
        "synthetic_cifar",
        description="the data set; coco and synthetic_coco go with retinanet*, the others with the classifiers",
    )
    root: str | None = Field(
        None,
        description="folder that holds the data set (synthetic_*: the cache folder); "
        "null = .cache for synthetic_*, data/coco for coco",
    )
    batch_size: int = Field(128, ge=1, description="training images per step in each process (Ray Train worker)")
    val_batch_size: int = Field(512, ge=1, description="evaluation images per batch in each process")
    augment: bool = Field(True, description="training: random crop + flip for 32x32 images, flip for detection")
    batch_grouping: Literal["none", "aspect_ratio"] = Field(
        "none",
        description="detection training batches: none = shuffled images; aspect_ratio = images sorted by "
        "width/height and cut once into batches (the last filled from the start), only the batches' order "
        "shuffled each epoch, each rank taking whole batches (the reference's AspectRatioBasedSampler: less "
        "padding); the classifiers refuse it",
    )
    val_size: int = Field(2000, ge=1, description="t10k-only mnist / fashion_mnist: images held out for validation")
    mean: list[float] | None = Field(
        None,
        description="classification: per-channel normalisation mean in 0..1 "
        "units (the papers' fixed constants); null = the training split's own",
    )
    std: list[float] | None = Field(
        None, description="classification: per-channel normalisation std in 0..1 units; null = the training split's own"
    )
    synthetic: SyntheticConfig = Field(SyntheticConfig(), description="the generated sets' sizes and seed")
    coco: CocoConfig = Field(CocoConfig(), description="COCO file layout and the detector's resize")

    @model_validator(mode="after")
    def _mean_and_std_together(self) -> DataConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std: set both (fixed normalisation) or neither (the training split's own)")
        if self.std is not None and (len(self.std) != len(self.mean) or min(self.std) <= 0):
            raise ValueError(f"std: {self.std} must be positive, one per channel like mean {self.mean}")
        return self

    @property
    def root_or_default(self) -> str | None:
        """``root``, or where the data set lives by default (:data:`DEFAULT_ROOTS`: the synthetic sets' cache,
        ``data/coco``); None where a data set has no default."""
        return self.root if self.root is not None else DEFAULT_ROOTS.get(self.name)


class OptimConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = Field(
        "adam",
        description="adam and adamw run PyTorch's fused step when every parameter is on CPU or CUDA; sgd is unfused",
    )
    lr: float = Field(1e-3, gt=0, description="learning rate (before the schedule and warm-up)")
    momentum: float = Field(0.9, ge=0, description="sgd only: momentum")
    weight_decay: float = Field(0.0, ge=0, description="weight decay passed to the optimizer (adamw: decoupled)")
    clip_grad_norm: float | None = Field(None, gt=0, description="clip the gradients' global L2 norm to this")


class ScheduleConfig(Strict):
    """LR schedule, stepped per epoch: ``constant``, ``multistep`` (milestones, gamma) or ``cosine``; plus a
    linear warm-up over the first ``warmup_steps`` steps of epoch 1 (torchvision's detection recipe)."""

    name: Literal["constant", "multistep", "cosine"] = Field(
        "constant", description="constant, multistep (x gamma at each milestone) or cosine annealing over train.epochs"
    )
    milestones: list[int] = Field(default_factory=list, description="multistep: epochs at which LR is scaled by gamma")
    gamma: float = Field(0.1, gt=0, description="multistep: the LR factor at each milestone")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up steps at the start of epoch 1")


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1, description="training epochs (also the cosine schedule's length and ASHA's max_t)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu")
    amp: Literal["auto", "off", "bf16"] = Field("auto", description="auto = bf16 autocast on CUDA, off on CPU")
    channels_last: Literal["auto"] | bool = Field(
        "auto", description="classification model in channels_last memory format; auto = on CUDA (tensor cores)"
    )
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on training steps per epoch")
    check_every: int = Field(20, ge=1, description="steps between checks for a non-finite loss")
    step: Literal["auto", "eager", "compile", "graph"] = Field(
        "auto", description="auto: eager until graph is GPU-verified"
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field("inductor", description="step compile's backend")
    freeze: list[str] = Field(
        default_factory=list,
        description="parameter-name patterns (fnmatch, e.g. 'backbone.*') whose parameters are not trained",
    )
    frozen_bn: bool = Field(
        False,
        description="BatchNorm layers stay in eval mode in training: running statistics "
        "fixed (the reference's freeze_bn; their affine parameters train unless frozen by a pattern)",
    )
    test_time_k: bool = Field(
        False,
        description="after the last epoch also evaluate with k = 1..E experts per "
        "token (val_top1_k<k>; Pavlitska's varying_k_accuracy.py)",
    )
    train_accuracy: Literal["before_step", "after_step"] = Field(
        "before_step",
        description="train_top1 from each step's own forward (before_step, free) or from a second "
        "forward of the batch after the optimizer step (after_step, Krishnamurthy's code; training mode, no state "
        "changed; costs a forward per step)",
    )


class DistributedConfig(Strict):
    """How a run is spread over Ray Train workers. ``num_workers: 0`` trains in this process without Ray."""

    num_workers: int = Field(0, ge=0, description="Ray Train workers; 0 = train in this process without Ray")
    use_gpu: Literal["auto"] | bool = Field("auto", description="auto = GPUs if the Ray cluster has any")
    resources_per_worker: dict[str, float] | None = Field(None, description="e.g. {CPU: 2, GPU: 0.5}")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray Train's placement of the workers over the nodes"
    )
    expert_parallel: bool = Field(
        False,
        description="split each MoE layer's experts over the workers (all-to-all "
        "dispatch); needs num_experts >= num_workers >= 1",
    )
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint; -1 = no limit")
    checkpoint_every: int = Field(1, ge=0, description="epochs between checkpoints (and after the last); 0 = never")
    num_to_keep: int | None = Field(
        2,
        ge=1,
        description="checkpoints kept on storage while a run trains; a finished run or sweep trial keeps only its last",
    )
    storage_path: str = Field("results", description="local path or URI (s3://, gs://); shared by all nodes")
    run_name: str | None = Field(None, description="default: <study>-<hash of the config>, so a rerun resumes")

    @field_validator("resources_per_worker")
    @classmethod
    def _positive(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, amount in (value or {}).items():
            if amount < 0:
                raise ValueError(f"{key}: must be >= 0, got {amount}")
        return value

    def worker_resources(self, use_gpu: bool) -> dict[str, float]:
        """What each Ray Train worker reserves: ``resources_per_worker`` (default one CPU), with a whole GPU
        unless it names a share, when training on GPUs."""
        resources = dict(self.resources_per_worker or {"CPU": 1.0})
        if use_gpu:
            resources.setdefault("GPU", 1.0)
        return resources


class MetricsConfig(Strict):
    """How the validation figures are computed. An evaluator that is not installed stops the study when it
    is read, before Ray or training starts."""

    coco_backend: Annotated[Literal["pycocotools", "faster_coco_eval"], AfterValidator(installed_coco_backend)] = Field(
        "pycocotools",
        description="detection's COCOeval: pycocotools, or faster_coco_eval (C++, the same 12 "
        "figures; pip install 'moe-bench[fastcoco]')",
    )
    batchnorm: Literal["running", "batch"] = Field(
        "running",
        description="BatchNorm in evaluation: running statistics (eval mode), or each evaluation "
        "batch's own statistics (Krishnamurthy's code never calls eval(); its running statistics are left as "
        "they were)",
    )


class RunConfig(Strict):
    """One training run: everything ``train_loop`` needs."""

    seed: int = Field(0, description="seeds the initial weights, data order, augmentation and gate noise")
    data: DataConfig = Field(DataConfig(), description="the data set and its batches")
    model: ModelConfig = Field(ModelConfig(), description="the network and its model-specific options")
    moe: MoEConfig | None = Field(MoEConfig(), description="the *_moe models' MoE layers; ignored by dense models")
    optim: OptimConfig = Field(OptimConfig(), description="the optimizer")
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="the learning-rate schedule")
    train: TrainConfig = Field(TrainConfig(), description="the training loop: epochs, device, precision, freezing")
    distributed: DistributedConfig = Field(DistributedConfig(), description="Ray Train workers and checkpoints")
    metrics: MetricsConfig = Field(MetricsConfig(), description="how the validation figures are computed")

    @property
    def main_metric(self) -> str:
        """The headline figure this run's study ranks by: ``val_ap`` (detection) or ``val_top1``."""
        return task_main_metric(self.data.name in DETECTION_DATASETS)

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
        if self.moe.routing.type == "soft":
            raise ValueError(
                "distributed.expert_parallel: Soft MoE's slots mix each rank's tokens (data parallelism is)"
            )
        return self

    @model_validator(mode="after")
    def _moe_matches_model(self) -> RunConfig:
        is_moe = self.model.name.endswith("_moe")
        if is_moe and self.moe is None:
            raise ValueError(f"model {self.model.name!r} needs a 'moe' section")
        if self.model.name == "small_cnn_moe" and self.data.name in DETECTION_DATASETS:
            raise ValueError(
                "small_cnn_moe is a classifier: use data.name mnist, fashion_mnist, cifar100 or synthetic_cifar"
            )
        if is_moe and self.moe.gate.input == "image" and self.model.name != "resnet18_moe":
            raise ValueError("moe.gate.input: image (global gating) is for resnet18_moe")
        if is_moe and self.moe.gate.input == "image" and self.moe.gate.type != "gap_fc":
            raise ValueError(
                "moe.gate.input: image gives each layer a linear gate on the shared image features; "
                "set moe.gate.type: gap_fc"
            )
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
                raise ValueError(
                    "moe.losses.sample_similarity: retinanet_moe compares inputs within one FPN level "
                    "only; set moe.losses.detection_scope: per_level"
                )
        if (
            is_moe
            and self.moe.shared_experts
            and not (self.model.name == "resnet18_moe" or (detector and self.model.moe_at == "layer4"))
        ):
            raise ValueError(
                "moe.shared_experts: for experts whose outputs are features (resnet18_moe, retinanet_moe with "
                "moe_at layer4); these experts output probabilities, which a sum would break"
            )
        if detector and self.distributed.expert_parallel:
            raise ValueError("distributed.expert_parallel: not supported for retinanet_moe (data parallelism is)")
        return self

    @model_validator(mode="after")
    def _task_only_options(self) -> RunConfig:
        if self.data.name in DETECTION_DATASETS:
            for name, value, default in (
                ("train.train_accuracy", self.train.train_accuracy, "before_step"),
                ("metrics.batchnorm", self.metrics.batchnorm, "running"),
                ("data.mean", self.data.mean, None),
            ):
                if value != default:
                    raise ValueError(f"{name}: applies to the classifiers, not to {self.data.name}")
        else:
            for name, value, default in (
                ("data.batch_grouping", self.data.batch_grouping, "none"),
                ("model.focal_clamp", self.model.focal_clamp, None),
            ):
                if value != default:
                    raise ValueError(f"{name}: applies to the detectors (retinanet*), not to {self.data.name}")
        if self.metrics.batchnorm == "batch" and self.distributed.num_workers > 1:
            # A rank's last evaluation batch is padded, and padding would enter that batch's statistics.
            raise ValueError("metrics.batchnorm: batch evaluates in one process; set distributed.num_workers <= 1")
        return self


# A tracker -> the package it needs and the extra that installs it.
TRACKER_PACKAGES = {
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "tensorboard": ("tensorboardX", "tensorboard"),
}


class MLflowTracking(Strict):
    """MLflow: one run per trial, through Ray Tune's ``MLflowLoggerCallback``."""

    tracking_uri: str | None = Field(
        None,
        description="an MLflow server or store (http://..., sqlite:///mlflow.db, "
        "file:///abs/mlruns); null = MLflow's default (MLFLOW_TRACKING_URI)",
    )
    experiment: str | None = Field(None, description="MLflow experiment; null = the study's name")


class WandbTracking(Strict):
    """Weights & Biases: one run per trial, grouped by study, through Ray Tune's ``WandbLoggerCallback``."""

    project: str | None = Field(None, description="W&B project; null = the study's name")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="offline = files only, for a later wandb sync"
    )
    dir: str | None = Field(
        None, description="the local folder W&B writes its wandb/ folder into; null = the launching folder"
    )


class TrackingConfig(Strict):
    """Experiment trackers that receive every trial's swept values and metrics, and the report at the end."""

    mlflow: MLflowTracking | None = Field(None, description="log to MLflow; null = off")
    wandb: WandbTracking | None = Field(None, description="log to Weights & Biases; null = off")
    tensorboard: bool = Field(False, description="TensorBoard event files in each trial's folder (needs tensorboardX)")

    @model_validator(mode="after")
    def _installed(self) -> TrackingConfig:
        # Checked when the study is read, so a missing package stops it before Ray or any training starts.
        for tracker, (module, extra) in TRACKER_PACKAGES.items():
            problem = getattr(self, tracker) and missing_extra(module, extra)
            if problem:
                raise ValueError(f"{tracker} {problem}")
        return self


class StudyConfig(Strict):
    """A study file: ``name``, ``base`` (a complete :class:`RunConfig`), ``sweep`` (dotted key -> domain)
    and optionally ``tracking`` (experiment trackers)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: RunConfig
    sweep: dict[str, Any] = Field(default_factory=dict)
    tracking: TrackingConfig | None = Field(
        None, description="experiment trackers (MLflow, W&B, TensorBoard); null = the Parquet tables only"
    )
