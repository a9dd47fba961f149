"""``train.step`` (eager | compile | graph, auto): the choice of mode, the fallback's log line, compile
against eager, and the data path that feeds the step without host copies per batch."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch

from harness.config import validate_run
from harness.data import iterate_batches, random_crop_flip
from harness.data.coco import detection_batches, load_coco
from harness.data.synthetic_coco import write_synthetic_coco
from harness.errors import DataError, TrainingError
from harness.moe.collective import LOCAL
from harness.tasks.base import Session
from harness.tasks.classification import TASK
from harness.training import step_modes
from harness.training.loop import build_optimizer, evaluate_each_k, train_loop, train_one_epoch
from harness.training.step_modes import CompiledStep, EagerStep, GraphedStep, build_step_runner, resolve_step_mode
from harness.training.steps import EpochTally

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # only named here: the decision never touches a device
# compile vs eager, per-step training loss, relative: eager runs the padded experts on their valid rows,
# compiled ones on static masked slots (the same sums in another order), and Adam's normalised steps
# carry that rounding into the weights. Both run in float64 (eps 2.2e-16), so rounding stays ~1e-13
# through 3 steps on any machine, while a wrong gradient, a dropped loss term or a changed routing moves
# a loss by more than 1e-4.
COMPILE_RTOL = 1e-9
# graph vs eager on CUDA, fp32: the same kernels, but index_add's atomics sum in any order and the
# graph's Adam reads a float32 learning rate (eager: a double). Not measured yet.
GRAPH_RTOL = 1e-3
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (cluster/gpu_check.sh)")


def run_config(tmp_path, **overrides):
    raw = {
        "seed": 0,
        "data": {
            "name": "synthetic_cifar",
            "root": str(tmp_path),
            "batch_size": 8,
            "synthetic": {"train_per_class": 1, "test_per_class": 1},
        },
        "model": {"name": "resnet18_moe"},
        "moe": {
            "num_experts": 4,
            "k": 2,
            "position": 4,
            "expert_width": 16,
            "capacity_factor": 1.0,
            "dispatch": "padded",
            "losses": {"importance": 0.5},
        },
        "train": {"epochs": 1, "max_steps_per_epoch": 3},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return validate_run(raw)


def test_the_step_mode_is_a_function_of_config_and_device(tmp_path, monkeypatch):
    padded = run_config(tmp_path)
    # For now auto is eager everywhere, saying why: the setting, that the graph path awaits verification
    # on a GPU and by what, and how to opt in ...
    mode, why = resolve_step_mode(padded, CUDA)
    assert mode == "eager" and why.startswith("train.step auto:"), why
    assert all(fact in why for fact in ("verified", "cluster/gpu_check.sh", "train.step: graph")), why
    # ... and once it is, auto means graph where capturable:
    monkeypatch.setattr(step_modes, "AUTO_GRAPH_ON_CUDA", True)
    assert resolve_step_mode(padded, CUDA) == ("graph", None)
    assert resolve_step_mode(padded, CPU)[0] == "eager"
    assert resolve_step_mode(run_config(tmp_path, train={"step": "eager"}), CUDA) == ("eager", None)
    assert resolve_step_mode(run_config(tmp_path, train={"step": "compile"}), CPU) == ("compile", None)
    expert_choice = run_config(
        tmp_path, moe={"dispatch": "auto", "capacity_factor": None, "routing": {"type": "expert_choice"}}
    )
    assert resolve_step_mode(expert_choice, CUDA) == ("graph", None)  # auto dispatch is padded for it
    constrained = run_config(tmp_path, moe={"constraint": {"type": "mean_importance", "threshold": 0.3}})
    assert resolve_step_mode(constrained, CUDA) == ("graph", None)  # hard constraints: device work only
    blocked = {
        "CUDA graphs need a CUDA device (device cpu)": (padded, CPU, 1),
        "moe.dispatch loop: one host read per expert": (run_config(tmp_path, moe={"dispatch": "loop"}), CUDA, 1),
        "moe.dispatch auto (sorted without a capacity_factor): one host read per MoE layer": (
            run_config(tmp_path, moe={"dispatch": "auto", "capacity_factor": None}),
            CUDA,
            1,
        ),
        "moe.gate.type attentive": (
            run_config(tmp_path, model={"name": "small_cnn_moe"}, moe={"gate": {"type": "attentive"}}),
            CUDA,
            1,
        ),
        "optim.name sgd": (run_config(tmp_path, optim={"name": "sgd"}), CUDA, 1),
        "2 ranks": (padded, CUDA, 2),
        "detection:": (
            validate_run(
                {
                    "data": {"name": "synthetic_coco"},
                    "model": {"name": "retinanet_moe"},
                    "moe": {"capacity_factor": 1.0},
                }
            ),
            CUDA,
            1,
        ),
    }
    for reason, (config, device, ranks) in blocked.items():
        for step in ("auto", "graph"):
            config.train.step = step
            mode, why = resolve_step_mode(config, device, world_size=ranks)
            assert mode == "eager" and why.startswith(f"train.step {step}: {reason}") and why.endswith("; eager"), why
    loop_compiled = run_config(tmp_path, moe={"dispatch": "loop"}, train={"step": "compile"})
    assert resolve_step_mode(loop_compiled, CPU)[1].startswith("train.step compile: moe.dispatch loop")


def test_graph_without_a_gpu_falls_back_to_the_eager_step_with_one_log_line(tmp_path, caplog):
    """A non-capturable configuration (here: no CUDA device) trains eagerly, exactly as ``train.step:
    eager`` does, and says why in one warning; ``auto`` on a CPU is eager without a warning."""
    histories = {}
    for step in ("eager", "graph", "auto"):
        config = run_config(
            tmp_path,
            model={"name": "small_cnn_moe"},
            moe={"dispatch": "loop", "expert_width": None},
            train={"step": step, "epochs": 2, "max_steps_per_epoch": 2},
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="harness.training.step_modes"):
            history = train_loop(config, lambda *_, **__: None)
        histories[step] = [
            {k: v for k, v in m.items() if not k.endswith("_s") and k != "images_per_s"} for m in history
        ]
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        if step == "graph":  # one line: the setting asked for, the reason (no CUDA device: cpu), the outcome
            assert len(warnings) == 1 and warnings[0].startswith("train.step graph:"), warnings
            assert "CUDA device" in warnings[0] and "cpu" in warnings[0] and warnings[0].endswith("eager"), warnings
        else:
            assert warnings == []
    assert histories["graph"] == histories["eager"] == histories["auto"]


def recorded_steps(config, device, epochs=1):
    """Train a fresh seeded model ``epochs`` epochs through :func:`train_one_epoch` with the runner
    ``config`` resolves to on ``device``; returns the runner, the model, the data and every step's loss."""
    data = TASK.to_device(TASK.load_data(config), device)
    torch.manual_seed(config.seed)
    model = TASK.build_model(config, data).to(device)
    optimizer = build_optimizer(config, model)
    session = Session(device=device)
    runner = build_step_runner(TASK, model, optimizer, config, device, session)
    losses = []

    def record(batch, epoch, index):
        done = runner(batch, epoch, index)
        if done is not None:
            losses.append(float(done[0].detach()))
        return done

    for epoch in range(1, epochs + 1):
        done = len(losses)
        torch.manual_seed(config.seed * 1_000_003 + epoch)  # the gate noise, as train_loop seeds it
        metrics = train_one_epoch(TASK, model, optimizer, data, config, device, epoch, session, record)
        mine = losses[done:]  # the epoch's mean is of the steps it took (a CUDA graph skips a smaller last batch)
        assert metrics["train_loss"] == pytest.approx(sum(mine) / len(mine))
        assert metrics["train_images"] == min(len(mine) * config.data.batch_size, 100)
    return runner, model, data, losses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA_ONLY)])
def test_compile_trains_like_the_eager_step(tmp_path, device):
    """resnet18_moe with the padded dispatch: three steps through torch.compile give the eager steps'
    losses within COMPILE_RTOL, in float64. On CPU with the aot_eager backend (Dynamo's capture and AOTAutograd's
    forward/backward split, without code generation: inductor takes ~4 min for this model on 2 cores)."""
    device = torch.device(device)
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    losses, seconds = {}, {}
    torch.set_default_dtype(torch.float64)  # see COMPILE_RTOL
    try:
        for step in ("eager", "compile"):
            config = run_config(tmp_path, train={"step": step, "compile_backend": backend, "amp": "off"})
            start = time.perf_counter()
            runner, _, _, losses[step] = recorded_steps(config, device)
            seconds[step] = time.perf_counter() - start
            assert type(runner) is {"eager": EagerStep, "compile": CompiledStep}[step]
    finally:
        torch.set_default_dtype(torch.float32)
    assert len(losses["compile"]) == 3 and all(math.isfinite(x) for x in losses["compile"])
    assert losses["eager"][2] < losses["eager"][0]  # it trains: the comparison is not of constants
    assert losses["compile"] == pytest.approx(losses["eager"], rel=COMPILE_RTOL), (losses, seconds)


def evaluated(model, data, config):
    """The validation figures at the trained k and at every k (``train.test_time_k``), on CUDA."""
    metrics = TASK.evaluate(model, data, config, CUDA, Session())
    metrics.update(evaluate_each_k(model, lambda: TASK.evaluate(model, data, config, CUDA, Session())))
    return metrics


@CUDA_ONLY
def test_graph_trains_and_evaluates_like_eager_on_cuda(tmp_path):
    """One CUDA graph per step: 3 eager warm-up steps, the capture, replays; through a learning-rate
    warm-up (the lr a device tensor the graph reads). Its steps give the eager steps' losses; it skips
    each epoch's smaller last batch (100 images, batch 16: 6 steps, 96 images); its evaluation graphs
    (one per batch shape and k, the last batch of 4 included) give the eager evaluation's figures."""
    runs = {}
    for step in ("eager", "graph"):
        config = run_config(
            tmp_path,
            data={"batch_size": 16, "val_batch_size": 32},
            optim={"lr": 5e-3},
            schedule={"warmup_steps": 8},
            train={"step": step, "amp": "off", "max_steps_per_epoch": None},
        )
        runs[step] = recorded_steps(config, CUDA, epochs=2 if step == "graph" else 1)
    runner, model, data, losses = runs["graph"]
    assert type(runner) is GraphedStep and runner.mode == "graph" and runner.graph is not None
    assert len(losses) == 12 and len(runs["eager"][3]) == 7
    assert losses[:6] == pytest.approx(runs["eager"][3][:6], rel=GRAPH_RTOL)
    assert losses[11] < losses[0]
    config = run_config(tmp_path, data={"batch_size": 16, "val_batch_size": 32}, train={"amp": "off"})
    evaluated(runner.eval_model, data, config)  # the captures (each graph's first batch runs eagerly)
    graphed, eager = (evaluated(m, data, config) for m in (runner.eval_model, model))  # replays only
    assert len(runner.eval_model.graphs) == 2 * 4  # batch shapes 32 and 4, k = 1..4
    numbers = {k: v for k, v in eager.items() if isinstance(v, float)}
    assert {k: graphed[k] for k in numbers} == pytest.approx(numbers, rel=1e-5, abs=1e-6)


def crop_flip_per_batch(images, generator, padding=4):
    """The augmentation as the loop drew it before the draws moved up front: per batch, row offsets,
    column offsets, then flips, each image cropped and flipped by indexing."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def test_the_batches_carry_the_augmentation_drawn_per_batch(tmp_path):
    """The epoch's crop and flip numbers are drawn up front (one copy to the device, not one per batch)
    and are the numbers per-batch draws gave: the same batches, bit for bit, so eager runs train as before."""
    data = TASK.load_data(run_config(tmp_path))
    indices = torch.randperm(100, generator=torch.Generator().manual_seed(3))
    args = (data.train_images, data.train_labels, indices, 32, data.mean, data.std)
    batches = list(iterate_batches(*args, augment_generator=torch.Generator().manual_seed(5)))
    generator, again = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
    assert [b[0].shape[0] for b in batches] == [32, 32, 32, 4]
    for start, (images, labels) in zip(range(0, 100, 32), batches):
        idx = indices[start : start + 32]
        expected = crop_flip_per_batch(data.train_images[idx], generator)
        assert torch.equal(random_crop_flip(data.train_images[idx], again), expected)
        assert torch.equal(images, (expected.float().div_(255) - mean) / std)
        assert torch.equal(labels, data.train_labels[idx])
    plain = next(iterate_batches(*args))[0]
    assert not torch.equal(plain, batches[0][0])  # augmentation did something


def test_prefetched_coco_batches_are_the_plain_ones_and_a_bad_image_still_names_itself(tmp_path):
    root = write_synthetic_coco(tmp_path / "coco", 6, 2, image_size=160, seed=0)
    split = load_coco(
        root, "train2017", "annotations/instances_train2017.json", "val2017", "annotations/instances_val2017.json"
    ).train
    indices = torch.arange(6)
    runs = [
        list(detection_batches(split, indices, 4, flip_generator=torch.Generator().manual_seed(1), prefetch=depth))
        for depth in (0, 2)
    ]
    assert [b[2] for b in runs[1]] == [[0, 1, 2, 3], [4, 5]]
    for (images, targets, _), (images2, targets2, _) in zip(*runs):
        assert all(torch.equal(a, b) for a, b in zip(images, images2))
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, targets2))
    split.files[5].write_bytes(b"not an image")
    batches = detection_batches(split, indices, 4, prefetch=2)
    assert len(next(batches)[0]) == 4  # the batch before the bad image arrives first
    with pytest.raises(DataError, match=str(split.files[5].name)):
        next(batches)


def test_a_lagged_non_finite_check_stops_one_window_later_naming_the_step():
    """On CUDA a window's flags are read when the next window closes (the host never waits mid-epoch);
    the error still names the step that went bad."""
    config = validate_run({"train": {"check_every": 2}})
    tally = EpochTally(config, 1, LOCAL, CPU, lagged=True)
    for loss in (1.0, float("nan"), 1.0):
        tally.add(torch.tensor(loss), {}, [])
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at epoch 1 step 2$"):
        tally.add(torch.tensor(1.0), {}, [])  # closes window 2: window 1 is checked now
    tally = EpochTally(config, 1, LOCAL, CPU, lagged=True)
    tally.add(torch.tensor(1.0), {}, [])
    tally.add(torch.tensor(float("inf")), {}, [])
    with pytest.raises(TrainingError, match=r"at epoch 1 step 2$"):
        tally.finish(images_seen=2)  # the last window is checked at the end of the epoch
