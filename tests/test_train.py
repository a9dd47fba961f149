import re
import subprocess
import sys

import pytest
import torch

from harness.config import validate_run
from harness.errors import TrainingError
from harness.models import create_model
from harness.tasks.base import Session
from harness.train import main
from harness.training.loop import build_optimizer, train_loop, uses_channels_last


def tiny_cifar(tmp_path, **moe):
    return validate_run(
        {
            "seed": 0,
            "data": {
                "name": "synthetic_cifar",
                "root": str(tmp_path),
                "batch_size": 32,
                "synthetic": {"train_per_class": 6, "test_per_class": 1},
            },
            "model": {"name": "resnet18_moe"},
            "moe": {"num_experts": 4, "k": 2, "position": 4, "expert_width": 32, **moe},
            "train": {"epochs": 2},
        }
    )


def test_tiny_resnet_moe_run_reports_every_metric(tmp_path):
    config = tiny_cifar(
        tmp_path,
        losses={"importance": 0.5, "load": 0.1},
        gate={"type": "gap_fc", "noisy": True},
        constraint={"type": "relative_importance", "threshold": 0.5},
    )
    config.train.max_steps_per_epoch = 2
    reports = []
    history = train_loop(config, reports.append)
    final = history[-1]
    assert history == reports
    assert [r["epoch"] for r in reports] == [1.0, 2.0]
    for key in (
        "train_loss",
        "train_task_loss",
        "train_importance_loss",
        "train_load_loss",
        "val_top5",
        "moe0_importance_cv",
        "moe0_load_cv",
        "moe0_living_experts",
        "moe0_usage_entropy_bits",
        "moe0_sample_entropy_bits",
        "moe0_kl_uniform_bits",
        "moe0_mutual_info_bits",
        "moe0_superclass_mutual_info_bits",
        "moe0_expert3_importance_share",
        "images_per_s",
        "epoch_s",
        "setup_s",
        "train_top1",
    ):
        assert key in final, key
    shares = sum(final[f"moe0_expert{j}_importance_share"] for j in range(4))
    assert shares == pytest.approx(1.0)
    assert 0 < final["train_top1"] <= 1 and final["train_images"] == 2 * 32
    # routing fluctuation: from the second epoch on (a fraction of the validation tokens)
    assert "moe0_routing_fluctuation" not in history[0] and 0 <= final["moe0_routing_fluctuation"] <= 1
    assert -1 <= final["moe0_expert_similarity"] <= 1


def test_routing_fluctuation_is_zero_for_a_router_that_never_changes_and_counts_changed_tokens(tmp_path):
    """With the learning rate at 0 and BatchNorm statistics frozen nothing moves, so no validation token
    changes its top-1 expert (with running statistics still updating, 1 of the 100 did); the metric itself
    counts the tokens whose top-1 expert changed (summed over ranks; one process here)."""
    from harness.metrics import routing_fluctuation
    from harness.moe.collective import LOCAL

    config = tiny_cifar(tmp_path)
    config.train.max_steps_per_epoch, config.optim.lr, config.train.frozen_bn = 1, 0.0, True
    history = train_loop(config, lambda *_, **__: None)
    assert history[1]["moe0_routing_fluctuation"] == 0.0
    before, after = torch.tensor([0, 1, 2, 3, -1]), torch.tensor([0, 2, 2, 1, -1])
    assert routing_fluctuation(before, after, LOCAL) == pytest.approx(2 / 5)


def test_small_moe_run_learns_synthetic_cifar(tmp_path):
    """Eight epochs over 600 images lift validation accuracy well above chance (0.01); the whole-model
    experts keep it to about a second of CPU."""
    config = validate_run(
        {
            **tiny_cifar(tmp_path).model_dump(mode="json"),
            "model": {"name": "small_cnn_moe"},
            "optim": {"name": "adam", "lr": 1e-2},
            "train": {"epochs": 8},
        }
    )
    history = train_loop(config, lambda *_, **__: None)
    assert history[-1]["val_top1"] > 0.05 and history[-1]["train_images"] == 600
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_channels_last_is_on_for_cuda_by_default_and_trains_like_nchw(tmp_path):
    """``train.channels_last`` (auto: CUDA only) puts the model's weights in channels_last; a run so laid
    out (padded MoE at stage 2: the dispatch sees channels_last activations) trains like an NCHW one."""
    assert uses_channels_last(tiny_cifar(tmp_path), torch.device("cuda"))
    assert not uses_channels_last(tiny_cifar(tmp_path), torch.device("cpu"))
    losses, layouts = {}, {}
    for channels_last in (False, True):
        config = tiny_cifar(tmp_path, position=2, capacity_factor=1.0, dispatch="padded")
        config.train.channels_last = channels_last
        config.train.epochs = 1
        config.train.max_steps_per_epoch = 2
        config.data.batch_size = 16

        def report(metrics, checkpoint_dir=None, layout=channels_last):
            weight = torch.load(checkpoint_dir / "replicated.pt")["model"]["stem.0.weight"]
            layouts[layout] = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()

        losses[channels_last] = train_loop(config, report, session=Session(checkpoint_every=1))[-1]["train_loss"]
    assert layouts == {False: False, True: True}
    # Different conv kernels round differently, and Adam's normalised steps carry that into the weights:
    # 3.6e-4 apart after 3 steps of 32; a changed routing or a wrong layout is orders of magnitude more.
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_warmup_ramps_the_learning_rate_through_epoch_one_and_clipping_bounds_the_norm(tmp_path):
    import torch

    from harness.training.steps import optimizer_step

    config = validate_run(
        {
            "optim": {"name": "sgd", "lr": 0.1, "clip_grad_norm": 1.0},
            "schedule": {"warmup_steps": 4},
            "moe": None,
            "model": {"name": "resnet18"},
        }
    )
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.optim.lr)
    lrs = []
    for step in range(6):
        model.zero_grad()
        (model(torch.ones(2, 3)).sum() * 1000).backward()  # a huge gradient
        optimizer_step(model, optimizer, config, epoch=1, step=step, session=Session())
        lrs.append(optimizer.param_groups[0]["lr"])
        norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        assert norm <= 1.0 + 1e-5
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_real_mnist_short_run_beats_chance(mnist_root):
    """The reference's tiny experts (1,382 parameters each) on the real MNIST split: 2 epochs (126 steps)."""
    config = validate_run(
        {
            "data": {"name": "mnist", "root": str(mnist_root), "batch_size": 128, "augment": False},
            "model": {"name": "small_cnn_moe"},
            "moe": {"num_experts": 3, "k": 3, "gate": {"type": "attentive"}, "losses": {"importance": 0.2}},
            "optim": {"lr": 0.003},
            "train": {"epochs": 2, "max_steps_per_epoch": 63},  # the full training split holds 469 batches
        }
    )
    final = train_loop(config, lambda m: None)[-1]
    assert final["val_top1"] > 0.7  # chance is 0.1
    for key in ("moe0_mutual_info_bits", "moe0_expert_prediction_mutual_info_bits"):
        assert 0 < final[key] <= 3.33  # at most log2(10)


def test_non_finite_loss_names_epoch_and_step(tmp_path):
    config = tiny_cifar(tmp_path)
    config = config.model_copy(
        update={
            "optim": config.optim.model_copy(update={"name": "sgd", "lr": 1e30}),
            "train": config.train.model_copy(update={"check_every": 4}),
            "data": config.data.model_copy(update={"batch_size": 8}),
        }
    )
    # Step 1 is finite; its update blows the weights up, so step 2's loss is not.
    with pytest.raises(TrainingError, match=r"non-finite loss \((nan|inf)\) at epoch 1 step 2$"):
        train_loop(config, lambda m: None)


def test_cli_prints_progress_and_final_metrics(tmp_path, capsys):
    study = tmp_path / "s.yaml"
    study.write_text(
        f"name: cli\nbase:\n  data: {{name: synthetic_cifar, root: {tmp_path}, batch_size: 16,"
        " synthetic: {train_per_class: 1, test_per_class: 1}}\n"
        "  moe: {num_experts: 2, k: 1, expert_width: 8}\n  train: {epochs: 1, max_steps_per_epoch: 2}\n"
    )
    assert main([str(study), "--set", "moe.position=1"]) == 0
    out = capsys.readouterr().out
    # one short line per epoch: loss, the main metric, each MoE layer's balance, the time
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 1 and re.fullmatch(
        r"epoch 1/1 \| loss [\d.]+ \| val_top1 [\d.e-]+ \| moe0 cv [\d.e-]+ alive \d/2 \| [\d.]+ s", epoch_lines[0]
    ), epoch_lines
    assert "final metrics (all of them with --verbose):" in out and "moe0_importance_cv" in out
    assert "moe0_expert1_load_share" not in out and len(out.splitlines()) < 25
    assert main([str(study), "--set", "moe.position=1", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1 | train_loss" in out and "moe0_mutual_info_bits" in out and "moe0_expert1_load_share" in out


@pytest.mark.ray(cluster=False)
def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    study = tmp_path / "bad.yaml"
    study.write_text("name: bad\nbase:\n  moe: {num_experts: 4, k: 9}\n")
    result = subprocess.run(
        [sys.executable, "-m", "harness.train", str(study)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {study}: base.moe: k=9 exceeds num_experts=4"]


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_is_fused_and_steps_like_the_foreach_one(name):
    """build_optimizer picks PyTorch's fused Adam (one pass, no temporaries); over three steps with the same
    gradients (Adam's moments and weight decay at work) it moves the parameters as the default foreach
    implementation does, to float rounding. (Fixed gradients: with gradients from the model, Adam
    amplifies rounding in near-zero gradients into lr-sized differences by step two.)"""
    config = validate_run(
        {
            "model": {"name": "resnet18_moe"},
            "data": {"name": "synthetic_cifar"},
            "optim": {"name": name, "lr": 0.01, "weight_decay": 1e-4},
        }
    )
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = create_model("resnet18_moe", num_classes=10, num_experts=2, expert_width=8)
        if fused:
            optimizer = build_optimizer(config, model)
        else:
            optimizer = type(optimizer)(model.parameters(), lr=0.01, weight_decay=1e-4, foreach=True)
        assert bool(optimizer.defaults["fused"]) == fused
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for param in model.parameters():
                param.grad = torch.randn(param.shape, generator=generator)
            optimizer.step()
        models.append(model)
    torch.manual_seed(0)
    initial = create_model("resnet18_moe", num_classes=10, num_experts=2, expert_width=8)
    for (key, a), b, start in zip(models[0].named_parameters(), models[1].parameters(), initial.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
        assert not torch.equal(a, start), key  # every parameter moved: the comparison is not vacuous


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizer_steps_when_an_expert_gets_its_first_gradient_late(name):
    """An expert that received no token in the first batch has no gradient at step 1 and one at step 2
    (fused SGD with momentum fails there in torch 2.14, so SGD stays unfused)."""
    config = validate_run(
        {"model": {"name": "resnet18_moe"}, "data": {"name": "synthetic_cifar"}, "optim": {"name": name, "lr": 0.01}}
    )
    model = create_model("resnet18_moe", num_classes=10, num_experts=2, expert_width=8)
    optimizer = build_optimizer(config, model)
    late = [p for key, p in model.named_parameters() if ".experts.1." in key]
    assert late
    for step in (1, 2):
        optimizer.zero_grad(set_to_none=True)
        for param in model.parameters():
            if step == 2 or not any(param is p for p in late):
                param.grad = torch.ones_like(param)
        before = late[0].detach().clone()
        optimizer.step()
        assert torch.equal(late[0], before) == (step == 1)


def test_freezing_keeps_frozen_tensors_and_batchnorm_statistics_bit_identical(tmp_path):
    """``train.freeze`` patterns and ``train.frozen_bn``: after real training steps the frozen parameters
    and every BatchNorm's running statistics are bit-identical; the rest moved."""
    config = validate_run(
        {
            **tiny_cifar(tmp_path).model_dump(mode="json"),
            "train": {"epochs": 1, "max_steps_per_epoch": 2, "freeze": ["stem.*", "stages.0.*"], "frozen_bn": True},
        }
    )
    from harness.data import load_dataset
    from harness.tasks.classification import build_model

    data = load_dataset(config.data)
    torch.manual_seed(config.seed)  # train_loop's seed: the same initial model
    before = {k: v.clone() for k, v in build_model(config, data).state_dict().items()}
    train_loop(config, lambda *_, **__: None, data=data, session=Session(save_model=tmp_path / "trained.pt"))
    after = torch.load(tmp_path / "trained.pt", weights_only=True)["model"]
    frozen = [
        k for k in before if k.startswith(("stem.", "stages.0.")) and "running" not in k and "num_batches" not in k
    ]
    statistics = [k for k in before if "running_" in k]
    assert frozen and statistics
    for key in frozen + statistics:
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    gate = next(k for k in before if k.endswith("gate.fc.weight"))
    assert not torch.equal(after[gate], before[gate])


def test_freeze_pattern_that_matches_nothing_is_an_error(tmp_path):
    from harness.errors import ConfigError

    config = validate_run(
        {**tiny_cifar(tmp_path).model_dump(mode="json"), "train": {"epochs": 1, "freeze": ["backbone.*"]}}
    )
    with pytest.raises(ConfigError, match="train.freeze: 'backbone.\\*' matches no parameter"):
        train_loop(config, lambda *_, **__: None)


def test_test_time_k_evaluates_the_trained_model_at_every_k(tmp_path):
    """``train.test_time_k``: val_top1_k<k> for k = 1..E after the last epoch. At the trained k it is the
    ordinary val_top1; at k = 1 it is the same weights evaluated by a model built with k = 1."""
    from harness.data import load_dataset
    from harness.tasks.classification import build_model, evaluate

    config = validate_run(
        {
            **tiny_cifar(tmp_path).model_dump(mode="json"),
            "model": {"name": "small_cnn_moe"},
            "train": {"epochs": 1, "max_steps_per_epoch": 3, "test_time_k": True},
        }
    )
    data = load_dataset(config.data)
    session = Session(save_model=tmp_path / "model.pt")
    final = train_loop(config, lambda *_, **__: None, data=data, session=session)[-1]
    assert [k for k in final if k.startswith("val_top1_k")] == [f"val_top1_k{k}" for k in (1, 2, 3, 4)]
    assert final["val_top1_k2"] == final["val_top1"]
    k1 = validate_run(
        {
            **config.model_dump(mode="json"),
            "moe": {**config.moe.model_dump(mode="json"), "k": 1},
            "model": {"name": "small_cnn_moe", "weights": str(tmp_path / "model.pt")},
        }
    )
    model = build_model(k1, data)
    assert final["val_top1_k1"] == evaluate(model, data, k1, torch.device("cpu"))["val_top1"]


def test_reference_mutual_information_uses_the_selected_experts_prediction(mnist_root):
    """Krishnamurthy et al.'s I(E;Y) pairs the top-1 expert with the class IT predicts; the project's
    moe0_mutual_info_bits pairs it with the true label. Both recomputed here from the model's outputs."""
    from harness.data import load_dataset
    from harness.metrics.utilization import contingency, mutual_information_bits
    from harness.tasks.classification import build_model, evaluate

    config = validate_run(
        {
            "data": {"name": "mnist", "root": str(mnist_root), "val_batch_size": 500},
            "model": {"name": "small_cnn_moe"},
            "moe": {"num_experts": 5, "k": 5},
        }
    )
    data = load_dataset(config.data)
    model = build_model(config, data)
    metrics = evaluate(model, data, config, torch.device("cpu"))
    from harness.data.base import normalize

    with torch.no_grad():
        out = model.eval()(normalize(data.val_images, data.mean, data.std))
    top1 = out.routings[0].gates.argmax(dim=1)
    predicted = torch.stack(
        [e(normalize(data.val_images, data.mean, data.std)).argmax(1) for e in model.moe.experts], 1
    )
    reference = mutual_information_bits(contingency(top1, predicted.gather(1, top1[:, None]).squeeze(1), 5, 10))
    ours = mutual_information_bits(contingency(top1, data.val_labels, 5, 10))
    assert metrics["moe0_expert_prediction_mutual_info_bits"] == pytest.approx(reference, abs=1e-9)
    assert metrics["moe0_mutual_info_bits"] == pytest.approx(ours, abs=1e-9)
    assert abs(reference - ours) > 1e-3


def test_config_options_reach_the_model(tmp_path):
    """Every fidelity option set in a run config arrives in the built model (not only in create_model)."""
    from harness.data import load_dataset
    from harness.models.resnet_moe import ImageGateTrunk
    from harness.moe import ConvGapFcGate
    from harness.tasks.classification import build_model

    base = tiny_cifar(tmp_path).model_dump(mode="json")
    config = validate_run(
        {
            **base,
            "moe": {
                **base["moe"],
                "gate": {"type": "gap_fc", "input": "image", "noisy": True},
            },
        }
    )
    data = load_dataset(config.data)
    model = build_model(config, data)
    layer = model.stages[3].moe
    assert isinstance(model.image_gate, ImageGateTrunk) and layer.gate.fc.in_features == 256
    assert layer.router.noise is not None and layer.router.noise.bias is None  # Pavlitska's noise: W GAP(x)
    assert (layer.experts[0][1].conv1.in_channels, layer.experts[0][1].conv1.out_channels) == (32, 512)
    config = validate_run(
        {
            **base,
            "moe": {
                **base["moe"],
                "routing": {"type": "balanced_assignment", "sinkhorn_iterations": 3},
                "bias_balancing": {"update_rate": 0.25},
            },
        }
    )
    router = build_model(config, data).stages[3].moe.router
    assert router.method == "balanced_assignment" and router.sinkhorn_iterations == 3
    assert router.bias_update_rate == 0.25 and router.balance_bias is not None
    config = validate_run({**base, "moe": {**base["moe"], "gate": {"type": "conv_gap_fc", "hidden_channels": 8}}})
    gate = build_model(config, data).stages[3].moe.gate
    assert isinstance(gate, ConvGapFcGate) and gate.conv.padding == (0, 0) and gate.conv.out_channels == 8
    mnist_like = validate_run(
        {
            **base,
            "model": {
                "name": "small_cnn_moe",
                "expert": {"conv": [2], "fc": [7, 9]},
                "gate_network": {"conv": [3], "fc": [11], "batchnorm": [0]},
            },
            "moe": {"num_experts": 3, "k": 3, "gate": {"type": "attentive"}},
        }
    )
    small = build_model(mnist_like, data)
    assert small.moe.experts[0].tower.hidden_dim == 9 and small.gate_tower.hidden_dim == 11
    assert small.moe.gate.key.out_features == 9 and not small.gate_relu  # attention dim = the experts' hidden size
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in small.gate_tower.modules())
