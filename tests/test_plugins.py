"""Methods of your own (issue 34): a balancing loss, a gate and a model defined outside ``harness``
(``tests/plugin_methods.py``), named in a study by import path, validated with their arguments, and trained
by a real sweep."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
import torch
import yaml

from harness.config import validate_run
from harness.data import load_dataset
from harness.errors import ConfigError
from harness.moe import MoESpec, build_moe_layer, weighted_aux_losses
from harness.tasks.classification import build_model

from .helpers import REPO

PLUGINS = "tests.plugin_methods"


def _config(**moe) -> dict:
    return {
        "data": {"name": "synthetic_cifar", "synthetic": {"train_per_class": 1, "test_per_class": 1}},
        "model": {"name": f"{PLUGINS}:tiny_moe", "args": {"width": 6}},
        "moe": {"num_experts": 3, "k": 1, **moe},
    }


def test_a_custom_loss_enters_the_loss_dict_with_its_weight():
    """Gates all on expert 0 of 3: the plugin's usage-entropy loss is log 3; weight 0.5 makes it ln(3) / 2."""
    config = validate_run(_config(losses={"custom": [{"function": f"{PLUGINS}:usage_entropy_loss", "weight": 0.5}]}))
    weights = config.moe.losses.aux_weights()
    layer = build_moe_layer([torch.nn.Identity() for _ in range(3)], 2, 2, MoESpec(num_experts=3, k=1))
    with torch.no_grad():
        layer.gate.fc.weight.zero_()
        layer.gate.fc.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
    routing = layer(torch.randn(4, 2, 1, 1)).routing
    losses = weighted_aux_losses(routing, None, weights)
    assert list(losses) == ["usage_entropy_loss"]
    assert losses["usage_entropy_loss"].item() == pytest.approx(0.5 * math.log(3), abs=1e-6)


def test_a_custom_gate_and_model_are_built_from_the_config():
    config = validate_run(_config(gate={"type": f"{PLUGINS}:CosineGate", "args": {"scale": 4}}))
    model = build_model(config, load_dataset(config.data))
    assert type(model).__name__ == "TinyMoE" and model.stem.out_channels == 6
    assert type(model.moe.gate).__name__ == "CosineGate" and model.moe.gate.scale == 4.0
    assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 100)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": {"name": "tests.no_such_module:f"}}, "cannot import 'tests.no_such_module'"),
        ({"model": {"name": f"{PLUGINS}:missing_moe"}}, "has no 'missing_moe'"),
        ({"model": {"name": f"{PLUGINS}:tiny_moe", "args": {"widht": 6}}}, "args.widht: Extra inputs"),
        ({"model": {"name": f"{PLUGINS}:tiny_moe", "args": {"width": "6"}}}, "args.width: Input should be a valid"),
        ({"model": {"name": f"{PLUGINS}:usage_entropy_loss"}}, "must take (num_classes, in_channels"),
        ({"model": {"name": "resnet18_moe", "args": {"width": 6}}}, "only a model of your own takes args"),
        ({"moe": {"gate": {"type": "gap_fc", "args": {"scale": 2}}}}, "only a gate of your own takes args"),
        ({"moe": {"gate": {"type": "cosine"}}}, "unknown gate 'cosine'"),
        ({"moe": {"gate": {"type": f"{PLUGINS}:CosineGate", "args": {"scale": [1]}}}}, "args.scale"),
        (
            {"moe": {"losses": {"custom": [{"function": f"{PLUGINS}:usage_entropy_loss", "weight": 1, "name": "z"}]}}},
            "the key 'z_loss' is taken",
        ),
        (
            {
                "moe": {
                    "losses": {"custom": [{"function": f"{PLUGINS}:usage_entropy_loss", "weight": 1, "args": {"x": 1}}]}
                }
            },
            "args.x: Extra inputs",
        ),
    ],
    ids=[
        "no_module",
        "no_name",
        "unknown_arg",
        "string_for_int",
        "wrong_signature",
        "args_for_registered_model",
        "args_for_built_in_gate",
        "unknown_gate",
        "gate_arg_type",
        "loss_key_taken",
        "loss_unknown_arg",
    ],
)
def test_bad_plugins_are_one_line_errors_naming_the_field(change, message):
    raw = _config()
    for section, value in change.items():
        raw[section] = {**raw.get(section, {}), **value} if section == "moe" else value
    with pytest.raises(ConfigError) as error:
        validate_run(raw)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.ray
def test_a_sweep_trains_methods_defined_outside_the_package(ray_cluster, tmp_path, capsys):
    """Two trials of the plugin model with the plugin gate and loss, on the shared Ray cluster: both finish,
    and the custom loss is in the epochs table."""
    from harness.sweep import main

    base = _config(
        gate={"type": f"{PLUGINS}:CosineGate"},
        losses={"custom": [{"function": f"{PLUGINS}:usage_entropy_loss", "weight": 0.1}]},
    )
    base["data"].update(root=str(tmp_path / "cache"), batch_size=16)
    base.update(optim={"name": "sgd", "lr": 0.01}, train={"epochs": 1, "max_steps_per_epoch": 3})
    study = tmp_path / "plugins.yaml"
    study.write_text(yaml.safe_dump({"name": "plugins", "base": base, "sweep": {"seed": {"grid": [0, 1]}}}))
    assert main([str(study), "--results-dir", str(tmp_path / "results")]) == 0
    assert "2 trials: 2 ok" in capsys.readouterr().out
    epochs = pd.read_parquet(tmp_path / "results" / "plugins" / "epochs.parquet")
    assert (epochs["train_usage_entropy_loss"] > 0).all() and epochs["val_top1"].notna().all()


def test_a_module_that_fails_to_import_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "broken_methods.py").write_text("def loss(routing, inputs):\n    return (\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = _config(losses={"custom": [{"function": "broken_methods:loss", "weight": 1.0}]})
    with pytest.raises(ConfigError) as error:
        validate_run(raw)
    assert "broken_methods:loss: importing 'broken_methods' failed: SyntaxError" in str(error.value)
    assert "\n" not in str(error.value)


def test_the_documented_example_validates_and_trains_a_step(tmp_path, monkeypatch, capsys):
    """docs/extending.md's module and study, written to a folder as a user would: the sweep's ``--dry-run``
    accepts every trial, and its model trains one step with the custom gate and loss."""
    from harness.sweep import main

    page = (REPO / "docs" / "extending.md").read_text()
    (tmp_path / "my_methods.py").write_text(re.search(r"```python\n(.*?)```", page, flags=re.S).group(1))
    (tmp_path / "my_study.yaml").write_text(re.search(r"```yaml\n(.*?)```", page, flags=re.S).group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["my_study.yaml", "--dry-run"]) == 0
    assert "4 trials" in capsys.readouterr().out
    study = yaml.safe_load((tmp_path / "my_study.yaml").read_text())
    study["base"]["data"]["synthetic"] = {"train_per_class": 1, "test_per_class": 1}
    study["base"]["data"]["root"] = str(tmp_path / "cache")
    config = validate_run(study["base"])
    model = build_model(config, load_dataset(config.data)).train()
    output = model(torch.randn(4, 3, 32, 32))
    losses = weighted_aux_losses(output.routings[0], None, config.moe.losses.aux_weights())
    (output.logits.sum() + losses["usage_entropy_loss"]).backward()
    assert model.moe.gate.weight.grad is not None
