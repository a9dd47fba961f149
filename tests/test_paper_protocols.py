"""The options that run Krishnamurthy et al.'s studies as their notebooks did, each checked against what
it must compute, and the study files pinned to them (so a revert fails here)."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from harness.config import validate_run
from harness.config.study import read_yaml
from harness.data import load_dataset
from harness.errors import ConfigError, DataError
from harness.tasks.classification import batchnorm_statistics, build_model, counts_after_step, evaluate
from harness.training.loop import train_loop

STUDIES = pathlib.Path(__file__).resolve().parents[1] / "search_spaces"


def tiny_config(tmp_path, **train):
    return validate_run(
        {
            "seed": 0,
            "data": {
                "name": "synthetic_cifar",
                "root": str(tmp_path),
                "batch_size": 40,
                "synthetic": {"train_per_class": 2, "test_per_class": 1},
            },
            "model": {
                "name": "small_cnn_moe",
                "expert": {"conv": [2], "fc": [8]},
                "gate_network": {"conv": [4], "fc": [16], "batchnorm": [0]},
            },
            # A noisy gate draws random numbers in every training forward: a second forward must not move them.
            "moe": {"num_experts": 3, "k": 3, "gate": {"noisy": True}},
            "train": {"epochs": 1, "max_steps_per_epoch": 3, **train},
        }
    )


def test_accuracy_after_the_step_changes_the_reported_figure_and_nothing_else(tmp_path):
    before, after = (
        train_loop(tiny_config(tmp_path, train_accuracy=when), lambda metrics, **_: None)[-1]
        for when in ("before_step", "after_step")
    )
    assert before["train_loss"] == after["train_loss"]  # same steps: the second forward changes no state
    assert before["val_top1"] == after["val_top1"] and before["val_loss"] == after["val_loss"]
    assert before["train_top1"] != after["train_top1"]


def test_counts_after_step_is_a_training_mode_forward_that_leaves_buffers_and_generators(tmp_path):
    config = tiny_config(tmp_path)
    data = load_dataset(config.data)
    model = build_model(config, data).train()
    images = torch.randn(40, 3, 32, 32)
    labels = torch.randint(0, 100, (40,))
    buffers = [b.clone() for b in model.buffers()]
    generator_state = torch.random.get_rng_state()
    counts = counts_after_step(model, (images, labels), config, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(torch.random.get_rng_state(), generator_state)
    torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        expected = (model(images).logits.argmax(dim=1) == labels).sum()  # the same noise draw, training mode
    assert counts["top1_hits"] == expected


def test_evaluation_on_batch_statistics_normalises_each_batch_by_itself_and_keeps_running_ones(tmp_path):
    config = tiny_config(tmp_path)
    data = load_dataset(config.data)
    model = build_model(config, data)
    norm = model.gate_tower.layers[1]
    with torch.no_grad():
        norm.running_mean.fill_(3.0)  # far from any batch: the two modes must disagree
    running = {k: v.clone() for k, v in model.state_dict().items()}
    device = torch.device("cpu")
    by_running = evaluate(model, data, config, device)
    batch_config = config.model_copy(update={"metrics": config.metrics.model_copy(update={"batchnorm": "batch"})})
    by_batch = evaluate(model, data, batch_config, device)
    assert by_running["val_loss"] != by_batch["val_loss"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in running.items())  # statistics untouched
    assert not norm.training and not model.training
    # By hand: every BatchNorm in training mode on the whole (one-batch) validation set.
    images = (data.val_images.float() / 255 - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(data.std).view(
        1, -1, 1, 1
    )
    whole = batch_config.model_copy(update={"data": config.data.model_copy(update={"val_batch_size": len(images)})})
    with torch.no_grad(), batchnorm_statistics(model.eval(), "batch", device):
        logits = model(images).logits
    loss = torch.nn.functional.cross_entropy(logits, data.val_labels).item()
    assert evaluate(model, data, whole, device)["val_loss"] == pytest.approx(loss, rel=1e-6)


def test_fixed_normalisation_replaces_the_training_split_statistics(tmp_path):
    config = validate_run(
        {
            "data": {
                "name": "synthetic_cifar",
                "root": str(tmp_path),
                "mean": [0.1, 0.2, 0.3],
                "std": [0.5, 0.5, 0.25],
                "synthetic": {"train_per_class": 1, "test_per_class": 1},
            }
        }
    )
    data = load_dataset(config.data)
    assert data.mean == (0.1, 0.2, 0.3) and data.std == (0.5, 0.5, 0.25)
    wrong = config.model_copy(update={"data": config.data.model_copy(update={"mean": [0.1], "std": [0.5]})})
    with pytest.raises(DataError, match="data.mean: 1 values for 3-channel images"):
        load_dataset(wrong.data)
    with pytest.raises(ConfigError, match="mean and std: set both"):
        validate_run({"data": {"mean": [0.5]}})


def test_the_attentive_gate_reads_relu_features_where_the_study_says_so():
    from harness.models import create_model

    mnist = create_model("small_cnn_moe", gate="attentive")
    fashion = create_model(
        "small_cnn_moe",
        gate="attentive",
        gate_network={"conv": [8], "fc": [512, 32], "batchnorm": [0], "hidden_relu": True},
    )
    assert not mnist.gate_relu and fashion.gate_relu
    with pytest.raises(ConfigError, match="expert.hidden_relu: only the gate_network"):
        validate_run({"model": {"name": "small_cnn_moe", "expert": {"conv": [1], "fc": [5], "hidden_relu": True}}})


@pytest.mark.parametrize("study, mean, std", [("mnist", 0.1307, 0.3081), ("fashion_mnist", 0.2859, 0.3530)])
def test_the_studies_run_as_the_reference_notebooks(study, mean, std):
    base = read_yaml(STUDIES / f"{study}.yaml")["base"]
    config = validate_run(base)
    assert config.data.mean == [mean] and config.data.std == [std]
    assert config.data.val_batch_size == 10_000  # the test set in one batch (H_u over all of it)
    assert config.train.amp == "off"  # the papers trained in fp32
    assert config.optim.name == "adam" and config.optim.lr == 1e-3 and config.data.batch_size == 512
    assert config.train.epochs == 20 and config.moe.k == config.moe.num_experts == 5
    assert config.moe.losses.sample_similarity.distance == "raw"
    fashion = study == "fashion_mnist"
    assert (config.metrics.batchnorm == "batch") == fashion  # only its gate has BatchNorm
    assert bool(config.model.gate_network.hidden_relu) == fashion


PAPER_STUDIES = (
    "mnist",
    "fashion_mnist",
    "cifar100_krishnamurthy",
    "cifar100",
    "cifar100_global_gating",
    "coco_dense",
    "coco",
)


@pytest.mark.parametrize("study", PAPER_STUDIES)
def test_paper_studies_train_in_fp32(study):
    assert validate_run(read_yaml(STUDIES / f"{study}.yaml")["base"]).train.amp == "off"


@pytest.mark.parametrize(
    "study, mean, std",
    [
        ("cifar100", [0.5071, 0.4865, 0.4409], [0.2009, 0.1984, 0.2023]),  # Pavlitska utils/dataset_utils.py
        ("cifar100_global_gating", [0.5071, 0.4865, 0.4409], [0.2009, 0.1984, 0.2023]),
        ("cifar100_krishnamurthy", [0.5074, 0.4867, 0.4411], [0.2011, 0.1987, 0.2025]),  # the notebooks' stats
    ],
)
def test_cifar_studies_normalise_with_the_references_constants(study, mean, std):
    config = validate_run(read_yaml(STUDIES / f"{study}.yaml")["base"])
    assert (config.data.mean, config.data.std) == (mean, std)


def test_krishnamurthy_cifar_single_expert_has_no_lr_decay():
    from harness.tuning.search import expand_trials, parse_sweep

    raw = read_yaml(STUDIES / "cifar100_krishnamurthy.yaml")
    trials = expand_trials(raw["base"], parse_sweep(raw["sweep"]))
    schedules = {t.values["row"]: t.config.schedule.name for t in trials}
    assert schedules.pop("single expert") == "constant"  # train_single_model: Adam without a scheduler
    assert set(schedules.values()) == {"multistep"}  # moe_models_base.train: lr / 3 after epoch 20


def test_resnet_experts_and_stem_start_at_pytorchs_default_init_as_the_reference():
    """kaiming-normal fan_out on a 3x3 conv with 180 outputs has std sqrt(2 / (9 * 180)) = 0.0351; PyTorch's
    default (kaiming-uniform, a = sqrt(5)) has std 1 / sqrt(3 * fan_in) = 1 / sqrt(3 * 9 * 256) = 0.0120 for
    the stage-4 expert's first conv (256 inputs), and 1 / sqrt(3 * 27) = 0.111 for the stem (3 inputs)."""
    from harness.models import create_model

    torch.manual_seed(0)
    reference = create_model("resnet18_moe", num_experts=2, init="reference")
    kaiming = create_model("resnet18_moe", num_experts=2, init="kaiming")
    conv = reference.stages[3].moe.experts[0][0].conv1
    assert conv.in_channels == 256 and conv.out_channels == 180
    assert conv.weight.std().item() == pytest.approx(1 / (3 * 9 * 256) ** 0.5, rel=0.02)
    assert kaiming.stages[3].moe.experts[0][0].conv1.weight.std().item() == pytest.approx(
        (2 / (9 * 180)) ** 0.5, rel=0.02
    )
    assert reference.stem[0].weight.std().item() == pytest.approx(1 / 81**0.5, rel=0.1)
    assert validate_run({}).model.init == "reference"


def test_retinanet_p6_reads_c5_in_the_coco_studies_as_the_reference():
    from harness.models import create_model

    c5 = create_model("retinanet", num_classes=3, backbone="resnet18", p6_from="c5", min_size=64, max_size=64)
    assert c5.backbone.fpn.extra_blocks.p6.in_channels == 512 and not c5.backbone.fpn.extra_blocks.use_P5
    assert create_model(
        "retinanet", num_classes=3, backbone="resnet18", min_size=64, max_size=64
    ).backbone.fpn.extra_blocks.use_P5
    for study in ("coco", "coco_dense"):
        assert validate_run(read_yaml(STUDIES / f"{study}.yaml")["base"]).model.p6_from == "c5"


def test_coco_study_rows_follow_the_reference_scripts():
    from harness.tuning.search import expand_trials, parse_sweep

    raw = read_yaml(STUDIES / "coco.yaml")
    trials = {t.values["method"]: t.config for t in expand_trials(raw["base"], parse_sweep(raw["sweep"]))}
    hard_copies = trials.pop("copy_relative_importance")  # mixed_moe_hard_pretrained.py: 6 epochs at 1e-5
    assert (hard_copies.train.epochs, hard_copies.schedule.name, hard_copies.optim.lr) == (6, "constant", 1e-5)
    assert hard_copies.moe.constraint.limit == "none" and not hard_copies.moe.gate.noisy
    assert {c.train.epochs for c in trials.values()} == {20}
    for study in ("coco", "coco_dense"):  # coco_eval: one image at a time
        assert validate_run(read_yaml(STUDIES / f"{study}.yaml")["base"]).data.val_batch_size == 1


def grouping_case(tmp_path):
    """Seven training images of known aspect ratio (the last one's size only in its file's header) and the
    groups of 3 the reference's AspectRatioBasedSampler cuts from them: sorted (stably) by width/height,
    5 (0.5), 1 and 4 (0.75), 2 (1.0), 0 (1.33), 3 (1.78), 6 (2.0), the last group filled from the start."""
    from PIL import Image

    from harness.data.coco import DetectionData, load_split

    sizes = [(4, 3), (3, 4), (5, 5), (16, 9), (6, 8), (10, 20), None]
    images = [
        {"id": i, "file_name": f"{i}.png"} | ({"width": s[0], "height": s[1]} if s else {}) for i, s in enumerate(sizes)
    ]
    (tmp_path / "images").mkdir()
    for i in range(len(sizes)):
        Image.new("RGB", (20, 10) if i == 6 else (8, 8)).save(tmp_path / "images" / f"{i}.png")
    annotations = tmp_path / "train.json"
    annotations.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    split = load_split(tmp_path / "images", annotations)
    return DetectionData(split, split, [1], ["a"]), {(5, 1, 4), (2, 0, 3), (6, 5, 1)}


def epoch_batches(monkeypatch, data, grouping, epoch, rank=0, world_size=1):
    """The positions of each training batch ``train_batches`` gives rank ``rank`` of ``world_size`` in
    ``epoch`` (images are not decoded) and its shard size."""
    from types import SimpleNamespace

    from harness.tasks import detection
    from harness.tasks.base import epoch_generator

    def positions(split, indices, batch_size, device, flip=None):
        for start in range(0, indices.numel(), batch_size):
            yield tuple(indices[start : start + batch_size].tolist()), None, None

    monkeypatch.setattr(detection, "detection_batches", positions)
    config = validate_run(
        {
            "data": {"name": "synthetic_coco", "batch_size": 3, "batch_grouping": grouping},
            "model": {"name": "retinanet"},
            "moe": None,
        }
    )
    collective = SimpleNamespace(rank=rank, world_size=world_size)
    batches, shard_size = detection.train_batches(
        data, config, torch.device("cpu"), epoch_generator(config, epoch), collective
    )
    return [batch for batch, _ in batches], shard_size


def test_aspect_ratio_batches_are_the_references_groups_in_a_shuffled_order(tmp_path, monkeypatch):
    data, groups = grouping_case(tmp_path)
    orders = []
    for epoch in range(1, 6):
        batches, shard_size = epoch_batches(monkeypatch, data, "aspect_ratio", epoch)
        assert sorted(batches) == sorted(groups) and shard_size == 9  # every group once, whole, each epoch
        orders.append(tuple(batches))
    assert len(set(orders)) > 1  # only the groups' order changes between epochs
    for epoch in range(1, 4):  # two ranks: whole groups, as many per rank, every group taken
        ranks = [epoch_batches(monkeypatch, data, "aspect_ratio", epoch, rank, 2) for rank in range(2)]
        assert [len(batches) for batches, _ in ranks] == [2, 2] and [size for _, size in ranks] == [6, 6]
        assert set(ranks[0][0]) | set(ranks[1][0]) == groups and set(ranks[0][0] + ranks[1][0]) <= groups
        wrapped = orders[epoch - 1] + orders[epoch - 1][:1]  # one process's order, padded to 2 x 2 groups
        assert [batches for batches, _ in ranks] == [list(wrapped[0::2]), list(wrapped[1::2])]
    shuffled, _ = epoch_batches(monkeypatch, data, "none", 1)
    assert set(shuffled) != groups  # the default keeps the shuffled images


def test_coco_studies_group_batches_by_aspect_ratio_as_the_reference():
    for study in ("coco", "coco_dense"):
        assert validate_run(read_yaml(STUDIES / f"{study}.yaml")["base"]).data.batch_grouping == "aspect_ratio"
    with pytest.raises(ConfigError, match="data.batch_grouping: applies to the detectors"):
        validate_run({"data": {"batch_grouping": "aspect_ratio"}})
    with pytest.raises(ConfigError, match="data.batch_grouping: Input should be 'none' or 'aspect_ratio'"):
        validate_run({"data": {"name": "synthetic_coco", "batch_grouping": "wide"}, "model": {"name": "retinanet"}})


def focal_term(p: float, positive: bool) -> float:
    """The reference's FocalLoss (``retina_losses.py``) for one class of one anchor at probability ``p``."""
    return 0.25 * (1 - p) ** 2 * -math.log(p) if positive else 0.75 * p**2 * -math.log(1 - p)


def small_detector(name: str, focal_clamp: float | None):
    """``name`` built from a run config (three classes with the background, 64 px images)."""
    from types import SimpleNamespace

    from harness.tasks.detection import build_detector

    config = validate_run(
        {
            "data": {"name": "synthetic_coco", "coco": {"min_size": 64, "max_size": 64}},
            "model": {"name": name, "backbone": "resnet18", "focal_clamp": focal_clamp},
            "moe": {"num_experts": 2, "k": 2} if name == "retinanet_moe" else None,
        }
    )
    torch.manual_seed(0)
    return build_detector(config, SimpleNamespace(num_classes=3))


def test_focal_clamp_bounds_a_saturated_logit_as_the_references_focal_loss():
    """Two anchors: anchor 0 holds the object (class 1), anchor 1 is a negative. Every logit is saturated
    (+-30): class 1 at +30 on both anchors (right on anchor 0, a confident false positive on anchor 1), the
    other classes at -30. The reference clamps p to [1e-4, 1 - 1e-4]: the false positive costs
    0.75 (1 - 1e-4)^2 log(1e4) = 6.906 and no logit gets a gradient; unclamped it costs 0.75 * 30."""
    logits = torch.full((1, 2, 3), -30.0)
    logits[0, :, 1] = 30.0
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}]
    lo, hi = 1e-4, 1 - 1e-4
    expected = focal_term(hi, True) + 2 * focal_term(lo, False) + focal_term(hi, False) + 2 * focal_term(lo, False)
    losses = {}
    for focal_clamp in (1e-4, None):
        scores = logits.clone().requires_grad_()
        loss = small_detector("retinanet", focal_clamp).compute_loss(
            targets, {"cls_logits": scores, "bbox_regression": torch.zeros(1, 2, 4)}, anchors
        )["classification"]
        loss.backward()
        losses[focal_clamp] = loss.item(), scores.grad
    assert losses[1e-4][0] == pytest.approx(expected, rel=1e-5) and expected == pytest.approx(6.906, abs=1e-3)
    assert torch.count_nonzero(losses[1e-4][1]) == 0  # zero outside the clamp, as torch.clamp of p
    assert losses[None][0] == pytest.approx(0.75 * 30, rel=1e-5) and losses[None][1][0, 1, 1] == pytest.approx(0.75)


def test_focal_clamp_bounds_the_moe_heads_mixed_probabilities():
    """Every classification expert says class 1 with certainty (bias +30, the others -30) on an image
    without objects: each of the 774 anchors of a 64 px image (9 per cell of the 8, 4, 2, 1, 1 px wide
    P3..P7) is a negative whose mixed p = 1 is clamped to 1 - 1e-4 (the reference's FocalLoss on
    ClassificationModelMoE's output), not only to the 1 - 1e-7 that keeps its logit finite."""
    image, empty = torch.rand(3, 64, 64), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    finite = 1 - torch.tensor(1 - 1e-7).item()  # 1 - 1e-7 in float32 is 1 - 2^-23
    per_anchor = {eps: focal_term(1 - eps, False) + 2 * focal_term(eps, False) for eps in (1e-4, finite)}
    for focal_clamp, eps in ((1e-4, 1e-4), (None, finite)):
        model = small_detector("retinanet_moe", focal_clamp).train()
        with torch.no_grad():
            for expert in model.head.classification_head.moe.experts:
                expert[1].weight.zero_()
                expert[1].bias.view(9, 3).copy_(torch.tensor([-30.0, 30.0, -30.0]))
        loss = model([image], [empty])["classification"].item()
        assert loss == pytest.approx(774 * per_anchor[eps], rel=1e-3), focal_clamp


def test_coco_studies_clamp_the_focal_loss_as_the_reference():
    for study in ("coco", "coco_dense"):
        assert validate_run(read_yaml(STUDIES / f"{study}.yaml")["base"]).model.focal_clamp == 1e-4
    with pytest.raises(ConfigError, match="model.focal_clamp: applies to the detectors"):
        validate_run({"model": {"focal_clamp": 1e-4}})
    with pytest.raises(ConfigError, match="model.focal_clamp: Input should be less than 0.5"):
        validate_run({"data": {"name": "synthetic_coco"}, "model": {"name": "retinanet", "focal_clamp": 0.5}})
