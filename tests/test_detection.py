"""Detection: COCO evaluation (against pycocotools' published oracle), COCO data and its bad inputs, the
synthetic generator, RetinaNet-MoE's contract, and end-to-end training on synthetic and real COCO images."""

import json
import math
import pathlib
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.config import RunConfig
from harness.data import check_coco_layout, load_detection_dataset
from harness.data.coco import SIZE_BUCKETS, load_coco, load_split, read_coco, size_bucket
from harness.data.synthetic_coco import write_synthetic_coco
from harness.errors import ConfigError, DataError
from harness.metrics.detection import COCO_STATS, coco_evaluate, to_coco_results
from harness.models import create_model
from harness.models.retinanet_moe import fpn_level_of_objects, load_weights, module_aux_losses
from harness.moe import AuxWeights, MoESpec, TopKRouter, concat_routings, weighted_aux_losses
from harness.moe.parallel import Collective
from harness.tasks.base import Session
from harness.tasks.detection import build_detector, evaluate
from harness.training.loop import train_loop

from .helpers import shared_path

SMALL = dict(backbone="resnet18", min_size=160, max_size=160)
STANDARD = ("train2017", "annotations/instances_train2017.json", "val2017", "annotations/instances_val2017.json")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> pathlib.Path:
    return write_synthetic_coco(tmp_path_factory.mktemp("coco") / "synthetic", 12, 6, image_size=160, seed=0)


def detection_config(root, **overrides) -> RunConfig:
    raw = {
        "data": {
            "name": "synthetic_coco",
            "root": str(root),
            "batch_size": 4,
            "val_batch_size": 3,
            "synthetic": {"train_images": 12, "val_images": 6, "image_size": 160},
            "coco": {"min_size": 160, "max_size": 160},
        },
        "model": {"name": "retinanet_moe", "backbone": "resnet18"},
        "moe": {"num_experts": 4, "k": 2, "losses": {"importance": 0.1}},
        "optim": {"name": "adam", "lr": 3e-4},
        "train": {"epochs": 1, "device": "cpu"},
    }
    for key, value in overrides.items():
        raw[key].update(value)
    return RunConfig.model_validate(raw)


# --- evaluation -------------------------------------------------------------------------------------------


def test_coco_eval_reproduces_the_published_oracle():
    oracle = shared_path("coco-eval-oracle")
    gt = read_coco(oracle / "instances_val2014_100.json")
    results = json.loads((oracle / "instances_val2014_fakebbox100_results.json").read_text())
    stats = coco_evaluate(gt, results)
    published = {"ap": 0.505, "ap50": 0.697, "ap75": 0.573, "ap_small": 0.586, "ap_medium": 0.519, "ap_large": 0.501}
    for name, value in published.items():
        assert round(stats[name], 3) == value, name
    assert set(stats) == set(COCO_STATS)


def test_no_detections_score_zero_where_ground_truth_exists(synthetic_root):
    gt = read_coco(synthetic_root / "annotations/instances_val2017.json")
    stats = coco_evaluate(gt, [])
    assert stats["ap"] == 0.0 and stats["ar100"] == 0.0


def test_perfect_detections_score_one(synthetic_root):
    split = load_split(synthetic_root / "val2017", synthetic_root / "annotations/instances_val2017.json")
    results = []
    for image_id, target in zip(split.image_ids, split.targets):
        detection = {"boxes": target["boxes"], "scores": torch.ones(len(target["labels"])), "labels": target["labels"]}
        results += to_coco_results(image_id, detection, [1, 2, 3])
    stats = coco_evaluate(split.coco, results)
    for name in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"):
        assert stats[name] > 0.99, name


# --- data -------------------------------------------------------------------------------------------------


def test_synthetic_coco_is_deterministic_coco_with_every_size_bucket(synthetic_root, tmp_path):
    data = load_coco(synthetic_root, *STANDARD)
    areas = torch.cat([t["areas"] for t in data.train.targets + data.val.targets])
    assert set(size_bucket(areas).tolist()) == {0, 1, 2}
    boxes = torch.cat([t["boxes"] for t in data.train.targets])
    assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all() and (boxes <= 160).all()
    assert data.num_classes == 4 and data.category_names == ["square", "disk", "bar"]
    assert data.train.image(0).shape == (3, 160, 160)
    again = write_synthetic_coco(tmp_path / "again", 12, 6, image_size=160, seed=0)
    for name in ("instances_train2017.json", "instances_val2017.json"):
        assert (again / "annotations" / name).read_bytes() == (synthetic_root / "annotations" / name).read_bytes()


def _copy(root: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def test_corrupt_annotation_json_names_the_file(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    path = root / "annotations/instances_val2017.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(DataError, match="instances_val2017.json: not valid JSON"):
        load_coco(root, *STANDARD)
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="no images, categories"):
        load_coco(root, *STANDARD)


def test_missing_and_truncated_images_name_the_file(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    files = sorted((root / "val2017").iterdir())
    files[0].unlink()
    with pytest.raises(DataError, match=f"{files[0].name}: image file not found"):
        load_coco(root, *STANDARD)
    shutil.copy(synthetic_root / "val2017" / files[0].name, files[0])
    files[1].write_bytes(files[1].read_bytes()[:200])
    data = load_coco(root, *STANDARD)
    with pytest.raises(DataError, match=f"{files[1].name}: cannot read image"):
        data.val.image(1)


def test_aspect_ratios_come_from_the_annotations_or_the_image_header(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    path = root / "annotations/instances_train2017.json"
    dataset = json.loads(path.read_text())
    dataset["images"][0].update(width=320, height=160)  # read from the annotation, not the 160 px file
    del dataset["images"][1]["width"], dataset["images"][2]["height"]  # read from the files' headers
    path.write_text(json.dumps(dataset))
    split = load_split(root / "train2017", path)
    assert split.aspect_ratios.tolist() == [2.0] + [1.0] * 11
    split.files[2].write_bytes(b"not an image")
    assert split.aspect_ratios.tolist() == [2.0] + [1.0] * 11  # read once, not again at every epoch
    fresh = load_split(root / "train2017", path)
    with pytest.raises(DataError, match=f"{fresh.files[2].name}: cannot read image size"):
        _ = fresh.aspect_ratios


def test_degenerate_and_crowd_boxes_are_skipped_and_empty_images_kept(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    path = root / "annotations/instances_train2017.json"
    dataset = json.loads(path.read_text())
    first = dataset["images"][0]["id"]
    dataset["annotations"] = [a for a in dataset["annotations"] if a["image_id"] != first]  # image 0: none
    dataset["annotations"][0]["bbox"][2] = 0  # zero width
    dataset["annotations"][1]["iscrowd"] = 1
    path.write_text(json.dumps(dataset))
    split = load_split(root / "train2017", path)
    assert split.skipped == {"degenerate_boxes": 1, "crowd_boxes": 1, "unknown_category": 0}
    assert len(split) == 12 and split.targets[0]["boxes"].shape == (0, 4)
    model = create_model("retinanet_moe", num_classes=4, **SMALL)
    losses = model([split.image(0), split.image(1)], [split.targets[0], split.targets[1]])  # a negative image trains
    assert all(torch.isfinite(v) for v in losses.values())


def test_missing_coco_names_the_path_the_layout_and_the_synthetic_option(tmp_path):
    config = RunConfig.model_validate(
        {"data": {"name": "coco", "root": str(tmp_path)}, "model": {"name": "retinanet_moe"}}
    )
    with pytest.raises(DataError) as error:
        check_coco_layout(config.data)
    message = str(error.value)
    assert str(tmp_path / "train2017") in message and "annotations/instances_val2017.json" in message
    assert "synthetic_coco" in message and "\n" not in message


# --- model ------------------------------------------------------------------------------------------------


def test_moe_heads_keep_torchvisions_contract_and_add_aux_losses(synthetic_root):
    data = load_coco(synthetic_root, *STANDARD)
    model = create_model(
        "retinanet_moe", num_classes=4, aux_weights=AuxWeights(importance=0.1, kl_uniform=0.1), **SMALL
    )
    images = [data.train.image(i) for i in range(3)]
    losses = model(images, data.train.targets[:3])
    assert set(losses) == {"classification", "bbox_regression", "importance_loss", "kl_uniform_loss"}
    routings = model.routings()
    assert list(routings) == ["cls_head", "box_head"]
    assert all(len(levels) == 5 and levels[0].gates.shape == (3, 4) for levels in routings.values())
    assert all(int((r.gates > 0).sum(dim=1).max()) == 2 for r in routings["cls_head"])  # k = 2 per image per level
    # each subnet's aux loss is ONE loss over its 5 levels' gates together (3 images x 5 levels = 15 tokens)
    joint = {name: 0.0 for name in ("importance_loss", "kl_uniform_loss")}
    for levels in routings.values():
        assert concat_routings(levels).gates.shape == (15, 4)
        for name, value in weighted_aux_losses(concat_routings(levels), None, model.aux_weights).items():
            joint[name] += float(value.detach())
    for name, value in joint.items():
        assert float(losses[name].detach()) == pytest.approx(value, rel=1e-6), name
    sum(losses.values()).backward()
    head = model.head.classification_head.moe
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.gate.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.experts.parameters())
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 3 and set(detections[0]) == {"boxes", "scores", "labels"}


@pytest.mark.parametrize(
    ("moe", "losses_expected"),
    [
        ({"routing": "soft", "slots_per_expert": 2}, {"classification", "bbox_regression"}),
        ({"routing": "relu", "relu_l1_initial": 0.1}, {"classification", "bbox_regression", "relu_l1_loss"}),
        ({"moe_at": "layer4", "shared_experts": 1, "expert_width": 32}, {"classification", "bbox_regression"}),
    ],
    ids=["soft_heads", "relu_heads", "shared_expert_layer4"],
)
def test_todays_routers_and_shared_experts_in_a_detector(moe, losses_expected):
    """Soft MoE and ReLU routing in the heads (per image and FPN level) and a shared expert in layer4: a
    training forward gives their losses, and a backward reaches the gates and every shared expert."""
    images = [torch.rand(3, 160, 160), torch.rand(3, 160, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 60, 80]]), "labels": torch.tensor([1])}] * 2
    model = create_model("retinanet_moe", num_classes=3, **{**SMALL, **moe})
    losses = model(images, targets)
    assert set(losses) == losses_expected
    sum(losses.values()).backward()
    layers = [m for m in model.modules() if hasattr(m, "shared_experts")]
    assert layers and all(p.grad is not None for layer in layers for p in layer.gate.parameters())
    assert all(p.grad is not None for layer in layers for p in layer.shared_experts.parameters())
    assert sum(len(layer.shared_experts) for layer in layers) == moe.get("shared_experts", 0)


def test_layer4_variant_and_dense_baseline():
    images, targets = (
        [torch.rand(3, 160, 160)],
        [{"boxes": torch.tensor([[10.0, 10, 60, 80]]), "labels": torch.tensor([1])}],
    )
    layer4 = create_model(
        "retinanet_moe",
        num_classes=3,
        moe_at="layer4",
        expert_width=32,
        aux_weights=AuxWeights(importance=0.1),
        **SMALL,
    )
    assert "importance_loss" in layer4(images, targets)
    assert [len(r) for r in layer4.routings().values()] == [1]
    dense = create_model("retinanet", num_classes=3, **SMALL)
    assert set(dense(images, targets)) == {"classification", "bbox_regression"} and dense.routings() == {}


def test_weights_from_a_dense_retinanet_fill_every_expert(tmp_path):
    dense = create_model("retinanet", num_classes=4, **SMALL)
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    moe = create_model("retinanet_moe", num_classes=4, **SMALL)
    counts = load_weights(moe, tmp_path / "dense.pt")
    assert counts["skipped"] == 0
    for expert in moe.head.classification_head.moe.experts:
        torch.testing.assert_close(expert[0][0][0].weight, dense.head.classification_head.conv[0][0].weight)
        torch.testing.assert_close(expert[1].bias, dense.head.classification_head.cls_logits.bias)
    torch.testing.assert_close(moe.backbone.body.conv1.weight, dense.backbone.body.conv1.weight)
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="bad.pt: no tensor matches"):
        load_weights(moe, tmp_path / "bad.pt")


def test_expert_init_copy_reproduces_the_dense_detector_and_fresh_does_not(tmp_path):
    """The paper's second stage from a dense checkpoint: with every expert a copy of the dense subnet, the
    MoE head's outputs are the dense head's (mixed sigmoid probabilities of identical experts, turned back
    into logits); fresh experts give other outputs. Noise on the copies makes experts differ."""
    torch.manual_seed(0)
    dense = create_model("retinanet", num_classes=4, **SMALL).eval()
    torch.save({"model": dense.state_dict()}, tmp_path / "dense.pt")  # a --save-model file
    features = [torch.randn(2, 256, s, s) for s in (20, 10, 5, 3, 2)]
    with torch.no_grad():
        expected = dense.head(features)
        for init, same in (("copy", True), ("fresh", False)):
            moe = create_model(
                "retinanet_moe", num_classes=4, weights=str(tmp_path / "dense.pt"), expert_init=init, **SMALL
            ).eval()
            got = moe.head(features)
            for key in ("cls_logits", "bbox_regression"):
                assert torch.allclose(got[key], expected[key], atol=1e-4) == same, (init, key)
        noisy = create_model(
            "retinanet_moe", num_classes=4, weights=str(tmp_path / "dense.pt"), expert_init_noise=0.1, **SMALL
        )
    experts = noisy.head.regression_head.moe.experts
    assert not torch.equal(experts[0][1].weight, experts[1][1].weight)


def test_detection_config_options_reach_the_model(synthetic_root, tmp_path):
    """detection_scope, moe_at, noise, gate and expert_init from a run config."""
    data = load_coco(synthetic_root, *STANDARD)
    dense = create_model("retinanet", num_classes=data.num_classes, **SMALL)
    torch.save({"model": dense.state_dict()}, tmp_path / "dense.pt")
    config = detection_config(
        synthetic_root.parent,
        model={
            "moe_at": "cls_head",
            "weights": str(tmp_path / "dense.pt"),
            "expert_init": "copy",
        },
        moe={
            "gate": {"type": "relu_gap_fc", "noisy": True},
            "losses": {"kl_uniform": 0.25, "detection_scope": "per_level"},
        },
    )
    model = build_detector(config, data)
    head = model.head.classification_head
    assert list(model.routings()) == ["cls_head"]
    assert model.aux_scope == "per_level" and model.aux_weights.kl_uniform == 0.25
    assert type(head.moe.gate).__name__ == "ReluGapFcGate" and head.moe.router.noise.bias is None
    torch.testing.assert_close(head.moe.experts[2][1].weight, dense.head.classification_head.cls_logits.weight)


def test_moe_in_one_head_subnet_only():
    cls_only = create_model("retinanet_moe", num_classes=3, moe_at="cls_head", **SMALL)
    assert list(cls_only.routings()) == ["cls_head"]
    assert type(cls_only.head.regression_head).__name__ == "RetinaNetRegressionHead"
    box_only = create_model("retinanet_moe", num_classes=3, moe_at="box_head", **SMALL)
    assert list(box_only.routings()) == ["box_head"]


def test_detection_aux_loss_is_one_loss_over_all_levels_hand_worked():
    """Two levels that each send every image to one expert, but to different ones: over all levels the
    experts are used evenly (loss 0), while per-level losses would penalise that size specialisation."""
    router = TopKRouter(2, MoESpec(num_experts=2, k=1))
    levels = [
        router(torch.tensor([[5.0, 0.0], [5.0, 0.0]]), torch.zeros(2, 2, 1, 1)),
        router(torch.tensor([[0.0, 5.0], [0.0, 5.0]]), torch.zeros(2, 2, 1, 1)),
    ]
    weights = AuxWeights(importance=1.0, kl_uniform=1.0)
    joint = module_aux_losses(levels, [], weights)
    assert float(joint["importance_loss"]) == pytest.approx(0.0, abs=1e-9)
    assert float(joint["kl_uniform_loss"]) == pytest.approx(0.0, abs=1e-9)
    per_level = module_aux_losses(levels, [torch.zeros(2, 2, 1, 1)] * 2, weights, scope="per_level")
    # each level: Imp = [2, 0], unbiased var 2 / mean^2 1 = 2; KL = 1 * log(1 * 2) = log 2; two levels summed
    assert float(per_level["importance_loss"]) == pytest.approx(4.0)
    assert float(per_level["kl_uniform_loss"]) == pytest.approx(2 * math.log(2))


def test_objects_map_to_the_fpn_level_of_their_anchor_size():
    areas = torch.tensor([16.0**2, 64.0**2, 140.0**2, 600.0**2])
    assert fpn_level_of_objects(areas, 1.0).tolist() == [0, 1, 2, 4]
    assert fpn_level_of_objects(areas[:1], 4.0).tolist() == [1]  # the resize counts


# --- end to end -------------------------------------------------------------------------------------------


def _check_detection_metrics(history):
    last = history[-1]
    for epoch in history:  # in [0, 1]: COCOeval's -1 would mean a size bucket without ground truth
        for name in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"):
            assert 0 <= epoch[f"val_{name}"] <= 1, name
    affinity = json.loads(last["affinity"])
    assert set(affinity) == {"0", "1"}
    assert len(affinity["0"]["fpn_level"]) == 4 and len(affinity["0"]["fpn_level"][0]) == 5
    assert len(affinity["0"]["object_size"][0]) == len(SIZE_BUCKETS)
    for key in ("moe0_importance_cv", "moe0_object_size_mutual_info_bits", "moe1_fpn_level_mutual_info_bits"):
        assert key in last
    assert last["train_images"] > 0 and torch.isfinite(torch.tensor(last["train_loss"]))


def test_train_loop_on_synthetic_coco(synthetic_root):
    """Two short epochs: the loss falls and the AP figures move with the model (boxes above the score
    threshold, some in the right place from epoch 1)."""
    # the cache folder holds synthetic_coco_12x6_160px_seed0
    config = detection_config(synthetic_root.parent, train={"epochs": 2})
    history = train_loop(config, lambda metrics, **_: None)
    _check_detection_metrics(history)
    first, last = history
    assert last["train_loss"] < first["train_loss"]
    assert first["val_ap50"] > 0 and last["val_ap50"] > 0
    assert [first[f"val_{n}"] for n in COCO_STATS] != [last[f"val_{n}"] for n in COCO_STATS]


def test_train_loop_on_tiny_coco():
    root = shared_path("tiny-coco")
    config = detection_config(
        root,
        data={
            "name": "coco",
            "root": str(root),
            "batch_size": 2,
            "val_batch_size": 2,
            "coco": {
                "train_images": "images",
                "train_annotations": "instances.json",
                "val_images": "images",
                "val_annotations": "instances.json",
                "min_size": 160,
                "max_size": 224,
                "max_val_images": 4,
            },
        },
        train={"epochs": 1, "device": "cpu", "max_steps_per_epoch": 2},
    )
    history = train_loop(config, lambda metrics, **_: None)
    _check_detection_metrics(history)
    assert load_detection_dataset(config.data).num_classes == 81


def _eval_worker(rank: int, world: int, store: str, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    metrics = _evaluate_once(pathlib.Path(root), Session(collective=Collective()))
    if rank == 0:
        pathlib.Path(out).write_text(json.dumps(metrics))
    dist.destroy_process_group()


def _evaluate_once(root: pathlib.Path, session: Session) -> dict:
    config = detection_config(root, data={"val_batch_size": 2})
    data = load_detection_dataset(config.data)
    torch.manual_seed(0)
    model = build_detector(config, data)
    model.score_thresh = 0.0  # untrained: keep low-score boxes so AP has something to rank
    return evaluate(model, data, config, torch.device("cpu"), session)


@pytest.mark.ray(cluster=False)
def test_evaluation_over_two_ranks_sees_every_image_once(synthetic_root, tmp_path):
    single = _evaluate_once(synthetic_root.parent, Session())
    out = tmp_path / "two.json"
    mp.start_processes(
        _eval_worker,
        args=(2, str(tmp_path / "store"), str(synthetic_root.parent), str(out)),
        nprocs=2,
        start_method="spawn",
    )
    double = json.loads(out.read_text())
    for name in COCO_STATS:
        assert double[f"val_{name}"] == pytest.approx(single[f"val_{name}"], abs=1e-9), name
    assert single["val_ap50"] > 0
    for layer, tables in json.loads(single["affinity"]).items():
        for kind, table in tables.items():
            torch.testing.assert_close(torch.tensor(json.loads(double["affinity"])[layer][kind]), torch.tensor(table))
    for key in ("moe0_importance_cv", "moe0_object_size_mutual_info_bits", "moe1_fpn_level_mutual_info_bits"):
        assert double[key] == pytest.approx(single[key], rel=1e-6), key
