import pytest
import yaml

from harness.config import RunConfig, apply_overrides, flatten, load_study, validate_run
from harness.errors import ConfigError

from .helpers import REPO

SEARCH_SPACES = REPO / "search_spaces"


@pytest.mark.parametrize("name", sorted(p.name for p in SEARCH_SPACES.glob("*.yaml")))
def test_shipped_studies_validate(name):
    """Every shipped study loads and every one of its trials validates."""
    from harness.tuning.search import expand_trials, parse_sweep

    study = load_study(SEARCH_SPACES / name)
    trials = expand_trials(study.base.model_dump(mode="json"), parse_sweep(study.sweep))
    assert trials and all(t.config.model.name == study.base.model.name for t in trials)


def write_study(tmp_path, base, name="t"):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": base}))
    return path


@pytest.mark.parametrize(
    "base, field, message",
    [
        ({"moe": {"num_experts": 4, "k": 5}}, "base.moe", "k=5 exceeds num_experts=4"),
        ({"moe": {"num_experts": 0, "k": 1}}, "base.moe.num_experts", "greater than or equal to 1"),
        ({"moe": {"losses": {"importance": -0.1}}}, "base.moe.losses.importance", "greater than or equal to 0"),
        (
            {"moe": {"constraint": {"type": "mean_importance", "threshold": 0}}},
            "base.moe.constraint.threshold",
            "greater than 0",
        ),
        ({"moe": {"position": 5}}, "base.moe.position", "1..4"),
        (
            {"moe": {"gate": {"type": "softmax"}}},
            "base.moe.gate.type",
            "unknown gate 'softmax'; valid: attentive, conv_gap_fc, gap_fc, relu_gap_fc or package.module:name",
        ),
        ({"model": {"name": "resnet50"}}, "base.model.name", "unknown model 'resnet50'; valid:"),
        (
            {"model": {"name": "small_cnn_moe", "expert": {"conv": [1], "fc": [5], "batchnorm": [1]}}},
            "base.model.expert",
            "batchnorm: conv indices [1] out of range",
        ),
        ({"moe": {"gate": {"type": "conv_gap_fc", "input": "image"}}}, "base", "set moe.gate.type: gap_fc"),
        (
            {"moe": {"routing": {"type": "expert_choice"}, "bias_balancing": {"update_rate": 0.1}}},
            "base.moe",
            "bias_balancing: has no effect",
        ),
        ({"moe": {"routing": {"type": "expert_choice"}, "losses": {"load": 0.1}}}, "base.moe", "losses.load:"),
        ({"train": {"epochs": "two"}}, "base.train.epochs", "valid integer"),
        ({"data": {"name": "imagenet"}}, "base.data.name", "'cifar100'"),
    ],
)
def test_invalid_fields_are_named(tmp_path, base, field, message):
    with pytest.raises(ConfigError) as info:
        load_study(write_study(tmp_path, base))
    text = str(info.value)
    assert f"{field}: " in text and message in text
    assert "\n" not in text


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"base.moe.num_expert: unknown key; did you mean 'num_experts'\?"):
        load_study(write_study(tmp_path, {"moe": {"num_expert": 4}}))


def test_a_recorded_config_with_retired_options_still_validates():
    """Configs recorded before options were retired (checkpoints, a sweep's saved state) name them with the
    value that remains: dropped. Another value is a one-line error naming the field."""
    recorded = {
        "model": {"name": "resnet18_moe", "cls_mixture": "probabilities"},
        "moe": {
            "expert_layout": "reference",
            "gate": {"noise_form": "pavlitska", "noisy": True},
            "losses": {"sample_similarity": {"scaling": "reference"}},
        },
    }
    config = validate_run(recorded)
    assert config.moe.gate.noisy and "noise_form" in recorded["moe"]["gate"]  # the caller's dict is untouched
    with pytest.raises(ConfigError, match=r"^base.moe.gate.noise_form: 'shazeer' was retired; only 'pavlitska'"):
        validate_run({"model": {"name": "resnet18_moe"}, "moe": {"gate": {"noise_form": "shazeer"}}})


def test_a_study_file_with_retired_options_loads_or_names_the_field(tmp_path):
    """The same for a study file (read by train and sweep before any run config is built)."""
    kept = write_study(tmp_path, {"model": {"name": "resnet18_moe"}, "moe": {"expert_layout": "reference"}})
    assert load_study(kept).base.model.name == "resnet18_moe"
    other = write_study(tmp_path, {"model": {"name": "resnet18_moe"}, "moe": {"expert_layout": "inner_narrow"}})
    with pytest.raises(ConfigError, match=r"study.yaml: base.moe.expert_layout: 'inner_narrow' was retired"):
        load_study(other)


def test_overrides_are_relative_to_base_and_parsed_as_yaml(tmp_path):
    path = write_study(tmp_path, {"train": {"epochs": 5}})
    study = load_study(
        path,
        [
            "train.epochs=2",
            "moe.position=[1, 3]",
            "moe.constraint={type: relative_importance, threshold: 0.5}",
            "name=renamed",
        ],
    )
    assert study.base.train.epochs == 2
    assert study.base.moe.position == [1, 3]
    assert study.base.moe.constraint.threshold == 0.5
    assert study.name == "renamed"


def test_bad_overrides(tmp_path):
    path = write_study(tmp_path, {})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_study(path, ["train.epochs"])
    with pytest.raises(ConfigError, match="base.train.epoch: unknown key; did you mean 'epochs'"):
        load_study(path, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="train.epochs: is a value"):
        apply_overrides({"base": {"train": {"epochs": 3}}}, ["train.epochs.x=1"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nbase:\n  train: {epochs: 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+:\d+: invalid YAML"):
        load_study(path)


def test_missing_study_file():
    with pytest.raises(ConfigError, match="nope.yaml: no such study file"):
        load_study("nope.yaml")


def test_moe_model_needs_moe_section():
    with pytest.raises(ConfigError, match="needs a 'moe' section"):
        validate_run({"moe": None})
    assert validate_run({"model": {"name": "resnet18"}, "moe": None}).moe is None


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}
    assert "moe.losses.importance" in flatten(RunConfig().model_dump())


def test_relative_paths_are_pinned_to_the_launching_directory(tmp_path):
    from harness.config import absolutize_paths

    base = absolutize_paths({"data": {"name": "synthetic_coco"}, "model": {"weights": "w/retina.pt"}}, cwd=tmp_path)
    assert base["data"]["root"] == str(tmp_path / ".cache")
    assert base["model"]["weights"] == str(tmp_path / "w" / "retina.pt")
    coco = absolutize_paths({"data": {"name": "coco"}}, cwd=tmp_path)
    assert coco["data"]["root"] == str(tmp_path / "data" / "coco")
    mnist = absolutize_paths({"data": {"name": "mnist"}}, cwd=tmp_path)
    assert mnist["data"].get("root") is None  # no default: the loader asks for it
