import sys

import pytest
import torch
import yaml

from harness.errors import ConfigError
from harness.models import MODELS
from harness.sweep import main
from harness.tuning.search import expand_trials, parse_sweep

BASE = {"data": {"name": "synthetic_cifar"}, "moe": {"num_experts": 4, "k": 2}, "train": {"epochs": 1}}


def trials_of(sweep, base=BASE):
    return expand_trials(base, parse_sweep(sweep))


def test_grid_cross_product_in_key_order_with_sub_configs():
    trials = trials_of(
        {
            "moe.gate.type": {"grid": ["gap_fc", "conv_gap_fc"]},
            "moe.constraint": {"grid": [None, {"type": "relative_importance", "threshold": 0.5}]},
            "seed": {"grid": [0, 1, 2]},
        }
    )
    assert len(trials) == 12
    assert [t.name for t in trials[:2]] == ["t0000", "t0001"]
    assert trials[0].values == {"moe.gate.type": "gap_fc", "moe.constraint": None, "seed": 0}
    assert trials[3].config.moe.constraint.threshold == 0.5 and trials[3].config.seed == 0
    assert trials[-1].config.moe.gate.type == "conv_gap_fc" and trials[-1].config.seed == 2


def test_random_domains_are_seeded_and_within_bounds():
    sweep = {
        "optim.lr": {"loguniform": [1e-4, 1e-2]},
        "moe.losses.importance": {"uniform": [0.0, 1.0]},
        "moe.num_experts": {"randint": [2, 6]},
        "data.batch_size": {"choice": [16, 32]},
        "moe.k": 1,
        "num_samples": 5,
    }
    first, second = trials_of(sweep), trials_of(sweep)
    assert len(first) == 5
    assert [t.overrides for t in first] == [t.overrides for t in second]
    for t in first:
        assert 1e-4 <= t.config.optim.lr <= 1e-2 and 0 <= t.config.moe.losses.importance <= 1
        assert 2 <= t.config.moe.num_experts < 6 and t.config.data.batch_size in (16, 32) and t.config.moe.k == 1
    assert len({t.config.optim.lr for t in first}) == 5
    assert "moe.k" not in parse_sweep(sweep).swept_keys  # a constant is not a dimension


def test_named_dimension_sets_several_keys():
    trials = trials_of(
        {
            "method": {
                "grid": [
                    {"name": "soft", "moe.losses.importance": 0.5},
                    {"name": "hard", "moe.constraint": {"type": "mean_importance", "threshold": 0.3}},
                ]
            },
        }
    )
    assert [t.values["method"] for t in trials] == ["soft", "hard"]
    assert trials[0].config.moe.losses.importance == 0.5 and trials[0].config.moe.constraint is None
    assert trials[1].config.moe.constraint.type == "mean_importance" and "method" not in trials[1].overrides


@pytest.mark.parametrize(
    "sweep, message",
    [
        (
            {"moe.num_expert": {"grid": [2, 4]}},
            "sweep.moe.num_expert: no such config key; did you mean 'moe.num_experts'?",
        ),
        ({"moe.k.x": {"grid": [1]}}, "sweep.moe.k.x: moe.k is a value, not a section"),
        ({"seed": {"gird": [0, 1]}}, "sweep.seed: unknown domain 'gird'; did you mean 'grid'?"),
        ({"seed": {"grid": []}}, "sweep.seed.grid: expected a non-empty list"),
        ({"optim.lr": {"uniform": [0.1]}}, "sweep.optim.lr.uniform: expected [low, high]"),
        ({"optim.lr": {"uniform": [0.1, 0.01]}}, "low must be below high"),
        ({"optim.lr": {"loguniform": [0, 0.1]}}, "bounds must be > 0"),
        ({"seed": {"randint": [0.5, 3]}}, "expected an integer"),
        ({"seed": 3}, "sweep: nothing varies between trials"),
        ({}, "sweep: nothing varies between trials"),
        ({"seed": {"grid": [0, 1]}, "num_samples": 0}, "sweep.num_samples: expected an integer >= 1"),
        (
            {"seed": {"grid": [0, 1]}, "scheduler": {"type": "hyperband"}},
            "sweep.scheduler.type: expected one of fifo, asha",
        ),
        (
            {"seed": {"grid": [0, 1]}, "scheduler": {"type": "asha", "metrc": "x"}},
            "sweep.scheduler: unknown key 'metrc'",
        ),
        ({"method": {"grid": [{"moe.losses.importanc": 0.5}]}}, "did you mean 'moe.losses.importance'?"),
    ],
)
def test_bad_search_spaces_name_the_key(sweep, message):
    with pytest.raises(ConfigError) as info:
        trials_of(sweep)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_invalid_combinations_fail_before_anything_runs_and_list_the_trials():
    with pytest.raises(ConfigError) as info:
        trials_of({"moe.k": {"grid": [1, 3, 5]}, "moe.num_experts": {"grid": [2, 4]}})
    text = str(info.value)
    assert text.startswith("sweep: 3 of 6 trials are invalid: ")
    assert "t0002 (moe.k=3, moe.num_experts=2): moe: k=3 exceeds num_experts=2" in text
    assert "t0004 (moe.k=5, moe.num_experts=2)" in text and "t0005 (moe.k=5, moe.num_experts=4)" in text


def test_dry_run_prints_the_trials(tmp_path, capsys):
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"name": "dry", "base": BASE, "sweep": {"seed": {"grid": list(range(7))}}}))
    assert main([str(study), "--dry-run", "--set", "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("study dry: 7 trials\n  t0000: seed=0\n") and "... 2 more" in out
    assert not (tmp_path / "results").exists()


def tiny_linear(num_classes: int) -> torch.nn.Module:
    """A dense classifier whose size is easy to count by hand: 3 * 32 * 32 * 100 weights + 100 biases =
    307,300 float32 parameters on CIFAR-100's images, no buffers."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, num_classes))


@pytest.fixture
def tiny_linear_model(monkeypatch):
    """``tiny_linear`` registered as a model for one test; counts how often it is built."""
    built = []

    def constructor(num_classes: int) -> torch.nn.Module:
        built.append(num_classes)
        return tiny_linear(num_classes)

    monkeypatch.setitem(MODELS, "tiny_linear", constructor)
    return built


def test_dry_run_estimates_the_disk_of_the_finished_study(tmp_path, capsys, tiny_linear_model):
    # One checkpoint per finished trial of 307,300 parameters x 4 bytes: with Adam x 3 (weights and two
    # moments) = 3,687,600 B, with SGD and momentum x 2 = 2,458,400 B; 6,146,000 B for the two trials.
    sweep = {"optim.name": {"grid": ["adam", "sgd"]}}
    study = tmp_path / "s.yaml"
    study.write_text(
        yaml.safe_dump({"name": "disk", "base": {**BASE, "model": {"name": "tiny_linear"}}, "sweep": sweep})
    )
    assert main([str(study), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "disk: about 6.15 MB of checkpoints once the study has finished (an estimate: each of 2 trials keeps its "
        "last checkpoint, 2.46 MB to 3.69 MB of weights and optimizer state; a running trial keeps up to "
        "num_to_keep=2)"
    )
    assert tiny_linear_model == [100]  # one model config: built once (on the meta device), for CIFAR-100's classes
    assert main([str(study), "--dry-run", "--set", "distributed.checkpoint_every=0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "disk: no checkpoints (distributed.checkpoint_every: 0)"


def test_the_disk_estimate_is_what_a_checkpoint_weighs(tmp_path, tiny_linear_model):
    from harness.config import validate_run
    from harness.sweep import checkpoint_bytes
    from harness.training.checkpoints import save_checkpoint

    config = validate_run({**BASE, "model": {"name": "tiny_linear"}})
    model = tiny_linear(100)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 3, 32, 32)).sum().backward()
    optimizer.step()  # creates both moments
    save_checkpoint(tmp_path, model, optimizer, [{"epoch": 1.0}], 0, False, 1, config.model_dump(mode="json"))
    written = (tmp_path / "replicated.pt").stat().st_size
    assert checkpoint_bytes(config) == 3_687_600 and written == pytest.approx(3_687_600, rel=0.01)


def test_cli_refuses_bad_sweep_with_one_line(tmp_path, capsys):
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"name": "bad", "base": BASE, "sweep": {"moe.k": {"grid": [9]}}}))
    assert main([str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sweep: 1 of 1 trials are invalid: t0000 (moe.k=9)") and "\n" not in err


def test_trial_resources_and_concurrency():
    from harness.config import validate_run
    from harness.sweep import max_concurrent_trials, trial_actor_resources, trial_resources
    from harness.tuning.search import SweepSpec

    in_process = validate_run({})
    assert trial_resources(in_process, use_gpu=False) == {"CPU": 1.0}
    shared_gpu = validate_run({"distributed": {"resources_per_worker": {"CPU": 1, "GPU": 0.25}}})
    assert trial_resources(shared_gpu, use_gpu=True) == {"CPU": 1.0, "GPU": 0.25}
    train_backed = validate_run({"distributed": {"num_workers": 2, "resources_per_worker": {"CPU": 2}}})
    # the driver's CPU on top of the workers'; the trial's own process reserves only the driver's CPU
    assert trial_resources(train_backed, use_gpu=True) == {"CPU": 5.0, "GPU": 2.0}
    assert trial_actor_resources(train_backed, use_gpu=True) == {"CPU": 1.0}
    assert trial_actor_resources(shared_gpu, use_gpu=True) == {"CPU": 1.0, "GPU": 0.25}
    trials = trials_of({"seed": {"grid": list(range(10))}}, {**BASE, "distributed": {"num_workers": 2}})
    spec = SweepSpec({"seed": ("grid", list(range(10)))})
    assert max_concurrent_trials(spec, trials, {"CPU": 9.0}, use_gpu=False) == 3  # 2 worker CPUs + 1 driver CPU
    assert max_concurrent_trials(spec, trials, {"CPU": 1.0}, use_gpu=False) == 1
    assert max_concurrent_trials(SweepSpec(spec.domains, max_concurrent_trials=3), trials, {"CPU": 64.0}, False) == 3
    # a swept num_workers: the largest trial decides, wherever it stands in the sweep
    mixed_spec = parse_sweep({"distributed.num_workers": {"grid": [0, 2]}})
    mixed = expand_trials(BASE, mixed_spec)
    assert max_concurrent_trials(mixed_spec, mixed, {"CPU": 9.0}, use_gpu=False) == 2  # 2 = len(mixed)
    assert max_concurrent_trials(mixed_spec, mixed, {"CPU": 5.0}, use_gpu=False) == 1  # 3 CPUs for t0001
    # a searched sweep: its trials, not its grid points, bound the concurrency
    searched = parse_sweep({"optim.lr": {"uniform": [0.01, 0.1]}, "search": {"type": "optuna", "num_samples": 6}})
    assert max_concurrent_trials(searched, expand_trials(BASE, searched), {"CPU": 4.0}, use_gpu=False) == 4


def test_asha_and_optuna_rank_by_the_studys_main_metric_unless_told():
    """With no ``metric``, ASHA stops and Optuna optimises by COCO AP in a detection study and by top-1 in a
    classification one; an explicit metric wins."""
    from harness.sweep import build_searcher, build_trial_scheduler

    detection = {"data": {"name": "synthetic_coco"}, "model": {"name": "retinanet_moe"}, "train": {"epochs": 2}}
    for base, expected in ((detection, "val_ap"), (BASE, "val_top1")):
        for sweep in (
            {"seed": {"grid": [0, 1]}, "scheduler": {"type": "asha"}},
            {"optim.lr": {"uniform": [0.01, 0.1]}, "search": {"type": "optuna", "num_samples": 2}},
        ):
            spec = parse_sweep(sweep)
            trials = expand_trials(base, spec)
            ranker = build_searcher(spec, trials, trials[0].config) or build_trial_scheduler(spec, trials[0].config)
            assert ranker.metric == expected, (base, sweep)
    told = parse_sweep({"seed": {"grid": [0, 1]}, "scheduler": {"type": "asha", "metric": "val_ap50"}})
    assert build_trial_scheduler(told, expand_trials(detection, told)[0].config).metric == "val_ap50"


def test_searched_sweep_validates_grid_points_at_both_ends_and_names_missing_extras(monkeypatch):
    base = {"model": {"name": "resnet18_moe"}, "moe": {"num_experts": 4, "k": 2}}
    spec = parse_sweep(
        {
            "moe.k": {"grid": [1, 2]},
            "optim.lr": {"loguniform": [1.0e-4, 1.0e-2]},
            "moe.num_experts": {"randint": [2, 5]},
            "search": {"type": "optuna", "num_samples": 3},
        }
    )
    points = expand_trials(base, spec)
    assert [p.name for p in points] == ["g000", "g001"] and spec.searcher_trials == 6
    assert points[1].overrides == {"moe.k": 2} and points[1].values == {"moe.k": 2}  # the searcher sets the rest
    # num_experts may be drawn as 2: then k=2 is fine, but a grid point with k=3 is not at the low end
    bad = parse_sweep({"moe.k": {"grid": [1, 3]}, "moe.num_experts": {"randint": [2, 5]}, "search": {"type": "optuna"}})
    with pytest.raises(ConfigError, match=r"1 of 2 trials are invalid: g001 .*k=3 exceeds num_experts=2"):
        expand_trials(base, bad)
    with pytest.raises(ConfigError, match="under sweep.search a choice takes plain values"):
        parse_sweep(
            {
                "moe.constraint": {"choice": [None, {"type": "importance", "threshold": 0.5}]},
                "search": {"type": "optuna"},
            }
        )
    with pytest.raises(ConfigError, match="set search.num_samples"):
        parse_sweep({"optim.lr": {"uniform": [0.1, 0.2]}, "num_samples": 2, "search": {"type": "optuna"}})
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the optuna extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'moe-bench\[optuna\]'"):
        parse_sweep({"optim.lr": {"uniform": [0.1, 0.2]}, "search": {"type": "optuna"}})


def test_a_chosen_tracker_that_is_not_installed_is_one_clear_error(tmp_path, monkeypatch):
    from harness.config import load_study

    study = tmp_path / "s.yaml"
    study.write_text("name: s\nbase: {}\nsweep: {seed: {grid: [0, 1]}}\ntracking: {mlflow: {experiment: x}}\n")
    assert load_study(study).tracking.mlflow.experiment == "x"
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(
        ConfigError, match=r"tracking: mlflow needs the mlflow package.*pip install 'moe-bench\[mlflow\]'"
    ):
        load_study(study)
