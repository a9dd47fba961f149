"""The catalogue of bad inputs: each goes through a real CLI and must end with exit code 2, one line on
stderr that names the field or file, no traceback, and nothing written (the folder holding the inputs is
unchanged afterwards). The CLIs' ``main`` functions run in this process (fast); the last test runs two of
them as ``python -m`` processes to check the same at the process boundary."""

import json
import pathlib
import pickle
import subprocess
import sys

import pytest
import yaml

from harness.analysis.aggregate import main as aggregate_main
from harness.bench import main as bench_main
from harness.data.synthetic_coco import write_synthetic_coco
from harness.report import main as report_main
from harness.sweep import main as sweep_main
from harness.train import main as train_main

from .helpers import REPO

CLIS = {
    "train": train_main,
    "sweep": sweep_main,
    "aggregate": aggregate_main,
    "report": report_main,
    "bench": bench_main,
}

BASE = {
    "data": {"name": "synthetic_cifar", "batch_size": 8, "synthetic": {"train_per_class": 1, "test_per_class": 1}},
    "moe": {"num_experts": 4, "k": 2, "expert_width": 8},
    "train": {"epochs": 1, "device": "cpu"},
}


def study(
    tmp: pathlib.Path, base_changes: dict | None = None, sweep: dict | None = None, raw: str | None = None
) -> str:
    """Write a study file in ``tmp`` and return its path; ``base_changes`` are dotted keys."""
    path = tmp / "study.yaml"
    if raw is not None:
        path.write_text(raw)
        return str(path)
    base = json.loads(json.dumps(BASE))
    base["data"]["root"] = str(tmp / "cache")
    for dotted, value in (base_changes or {}).items():
        node = base
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    sweep = {"seed": {"grid": [0, 1]}} if sweep is None else sweep
    path.write_text(yaml.safe_dump({"name": "bad", "base": base, "sweep": sweep}))
    return str(path)


def cifar_root(tmp: pathlib.Path, payload: bytes) -> pathlib.Path:
    folder = tmp / "cifar" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(payload)
    return folder.parent


class Exploit:
    """Unpickling this calls os.system: the restricted unpickler must refuse it."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def coco_study(tmp: pathlib.Path, damage) -> str:
    root = write_synthetic_coco(tmp / "coco", 4, 2, image_size=160)
    damage(root)
    return study(
        tmp,
        {
            "data": {
                "name": "coco",
                "root": str(root),
                "batch_size": 2,
                "val_batch_size": 2,
                "coco": {"min_size": 160, "max_size": 160},
            },
            "model.name": "retinanet_moe",
            "model.backbone": "resnet18",
        },
    )


def truncate_first_train_image(root: pathlib.Path) -> None:
    image = sorted((root / "train2017").iterdir())[0]
    image.write_bytes(image.read_bytes()[:100])


def _set(path: pathlib.Path, text: str) -> None:
    path.write_text(text)


# (case id, CLI, argv builder (tmp -> argv), text the one-line error must contain)
CASES = [
    ("yaml_syntax", "train", lambda t: [study(t, raw="name: x\nbase: {data: [\n")], "invalid YAML"),
    ("study_missing", "train", lambda t: [str(t / "nope.yaml")], "nope.yaml: no such study file"),
    ("study_not_mapping", "train", lambda t: [study(t, raw="- a\n- b\n")], "expected a mapping with 'name'"),
    ("wrong_type", "train", lambda t: [study(t, {"train.epochs": "ten"})], "train.epochs"),
    ("unknown_key_hint", "train", lambda t: [study(t, {"moe.num_expert": 4})], "did you mean 'num_experts'"),
    ("k_above_e", "train", lambda t: [study(t, {"moe.k": 5})], "k=5 exceeds num_experts=4"),
    ("no_experts", "train", lambda t: [study(t, {"moe.num_experts": 0, "moe.k": 1})], "moe.num_experts"),
    ("negative_loss_weight", "train", lambda t: [study(t, {"moe.losses.importance": -0.5})], "moe.losses.importance"),
    (
        "threshold_not_positive",
        "train",
        lambda t: [study(t, {"moe.constraint": {"type": "relative_importance", "threshold": 0}})],
        "moe.constraint.threshold",
    ),
    ("position_out_of_range", "train", lambda t: [study(t, {"moe.position": 5})], "moe.position"),
    ("unknown_gate", "train", lambda t: [study(t, {"moe.gate.type": "softmax"})], "moe.gate.type"),
    ("unknown_loss", "train", lambda t: [study(t, {"moe.losses.entropy": 0.1})], "moe.losses"),
    ("unknown_model", "train", lambda t: [study(t, {"model.name": "vit_moe"})], "unknown model 'vit_moe'"),
    ("unknown_dataset", "train", lambda t: [study(t, {"data.name": "imagenet"})], "data.name"),
    ("model_data_mismatch", "train", lambda t: [study(t, {"model.name": "retinanet_moe"})], "does not fit data"),
    (
        "expert_parallel_in_process",
        "train",
        lambda t: [study(t, {"distributed.expert_parallel": True})],
        "distributed.expert_parallel needs distributed.num_workers >= 1",
    ),
    ("set_without_equals", "train", lambda t: [study(t), "--set", "train.epochs"], "expected KEY=VALUE"),
    ("set_unknown_key", "train", lambda t: [study(t), "--set", "train.epoch=2"], "train.epoch"),
    (
        "missing_data_root",
        "train",
        lambda t: [study(t, {"data": {"name": "cifar100", "root": str(t / "absent")}})],
        "absent: no such directory",
    ),
    (
        "corrupt_cifar_pickle",
        "train",
        lambda t: [study(t, {"data": {"name": "cifar100", "root": str(cifar_root(t, b"\x80\x04garbage"))}})],
        "cifar-100-python",
    ),
    (
        "pickle_executes_code",
        "train",
        lambda t: [study(t, {"data": {"name": "cifar100", "root": str(cifar_root(t, pickle.dumps(Exploit())))}})],
        "refusing to load global posix.system",
    ),
    (
        "corrupt_coco_json",
        "train",
        lambda t: [coco_study(t, lambda r: _set(r / "annotations/instances_train2017.json", '{"images": ['))],
        "instances_train2017.json: not valid JSON",
    ),
    (
        "missing_coco_image",
        "train",
        lambda t: [coco_study(t, lambda r: sorted((r / "val2017").iterdir())[0].unlink())],
        "image file not found",
    ),
    ("truncated_coco_image", "train", lambda t: [coco_study(t, truncate_first_train_image)], "cannot read image"),
    (
        "coco_absent",
        "sweep",
        lambda t: [study(t, {"data": {"name": "coco", "root": str(t / "coco")}, "model.name": "retinanet_moe"})],
        "synthetic_coco",
    ),
    ("empty_sweep", "sweep", lambda t: [study(t, sweep={})], "sweep: nothing varies"),
    ("negative_table_interval", "sweep", lambda t: [study(t), "--tables-every", "-1"], "--tables-every: must be >= 0"),
    ("empty_grid", "sweep", lambda t: [study(t, sweep={"seed": {"grid": []}})], "sweep.seed"),
    ("invalid_trial_combination", "sweep", lambda t: [study(t, sweep={"moe.k": {"grid": [2, 5]}})], "t0001"),
    (
        "unknown_sweep_key",
        "sweep",
        lambda t: [study(t, sweep={"moe.num_expert": {"grid": [2, 4]}})],
        "did you mean 'moe.num_experts'",
    ),
    ("unknown_domain", "sweep", lambda t: [study(t, sweep={"seed": {"normal": [0, 1]}})], "sweep.seed"),
    (
        "results_dir_unwritable",
        "sweep",
        lambda t: [study(t), "--results-dir", "/proc/moe-bench-results"],
        "--results-dir",
    ),
    (
        "results_dir_holds_a_study",
        "sweep",
        lambda t: [study(t), "--results-dir", str(_occupied(t))],
        "already holds results of this study",
    ),
    (
        "resume_without_study",
        "sweep",
        lambda t: [study(t), "--resume", "--results-dir", str(t / "results")],
        "holds no sweep to resume",
    ),
    (
        "bench_batch_size_zero",
        "bench",
        lambda t: ["--device", "cpu", "--batch-size", "0"],
        "--batch-size: must be a positive",
    ),
    (
        "bench_memory_batch_negative",
        "bench",
        lambda t: ["--device", "cpu", "--memory-batch-size", "-1"],
        "--memory-batch-size",
    ),
    ("bench_repeat_zero", "bench", lambda t: ["--device", "cpu", "--repeat", "0"], "--repeat: must be a positive"),
    ("bench_only_not_a_regex", "bench", lambda t: ["--device", "cpu", "--only", "E4_k2_L4["], "--only: not a regular"),
    ("bench_json_unwritable", "bench", lambda t: ["--device", "cpu", "--json", "/proc/moe-bench/bench.json"], "--json"),
    # refused after the --json folder was probed: the folders the probe made must be gone again
    (
        "bench_graph_on_cpu",
        "bench",
        lambda t: ["--device", "cpu", "--mode", "graph", "--json", str(t / "new" / "b.json")],
        "--mode graph needs --device cuda",
    ),
    ("aggregate_not_a_study", "aggregate", lambda t: [str(t)], "not a study folder"),
    ("paper_not_a_study", "report", lambda t: ["--paper", "krishnamurthy", str(t)], "not a study folder"),
]


def _occupied(tmp: pathlib.Path) -> pathlib.Path:
    folder = tmp / "results" / "bad"
    folder.mkdir(parents=True)
    (folder / "study.json").write_text("{}")
    return tmp / "results"


def _tree(folder: pathlib.Path) -> dict[str, int]:
    """Every file (its size) and folder (-1) under ``folder``: an empty folder left behind counts too."""
    return {str(p.relative_to(folder)): p.stat().st_size if p.is_file() else -1 for p in folder.rglob("*")}


def catalogue_argv(cli: str, make_argv, tmp: pathlib.Path) -> list[str]:
    """The case's arguments, a sweep's results always under ``tmp`` (never the repository's results/)."""
    argv = make_argv(tmp)
    if cli == "sweep" and "--results-dir" not in argv:
        argv += ["--results-dir", str(tmp / "results")]
    return argv


@pytest.mark.parametrize("case, cli, make_argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_writes_nothing(case, cli, make_argv, expected, tmp_path, capsys):
    argv = catalogue_argv(cli, make_argv, tmp_path)
    capsys.readouterr()
    before = _tree(tmp_path)
    code = CLIS[cli](argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (case, err)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert expected in err, err
    assert _tree(tmp_path) == before, f"{case} wrote files"


# Run in a fresh interpreter, where no earlier test's cluster is connected: ray.init records its caller and
# refuses, so a CLI that reached Ray before refusing its input is caught even if it shut Ray down again.
NO_RAY_SCRIPT = """
import pathlib, sys, tempfile
import ray
from tests.test_bad_inputs import CASES, CLIS, catalogue_argv
reached = []
def refuse(*args, **kwargs):
    reached.append(case)
    raise RuntimeError("ray.init called")
ray.init = refuse
for case, cli, make_argv, _ in CASES:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            code = CLIS[cli](catalogue_argv(cli, make_argv, pathlib.Path(tmp)))
        except RuntimeError:
            continue  # refuse() recorded it
    if code != 2 or ray.is_initialized():
        reached.append(case)
print("reached Ray:", sorted(set(reached)))
"""


@pytest.mark.ray(cluster=False)
def test_no_bad_input_reaches_ray():
    proc = subprocess.run([sys.executable, "-c", NO_RAY_SCRIPT], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "reached Ray: []"


def test_every_cli_has_bad_inputs_and_every_case_its_own_id():
    """A CLI without a case would have its refusals untested; a repeated id would hide a case's failures
    behind another's (pytest suffixes duplicate ids instead of refusing them)."""
    ids = [case for case, *_ in CASES]
    assert sorted({cli for _, cli, _, _ in CASES}) == sorted(CLIS)
    assert sorted(case for case in ids if ids.count(case) > 1) == []


def test_bench_refuses_cuda_without_a_gpu(capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench_main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "error: --device cuda: no CUDA device is available"


@pytest.mark.ray(cluster=False)
@pytest.mark.parametrize("module", ["harness.train", "harness.sweep"])
def test_the_process_exits_2_with_one_line_and_no_traceback(module, tmp_path):
    path = study(tmp_path, {"moe.k": 9})
    proc = subprocess.run([sys.executable, "-m", module, path], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "k=9 exceeds num_experts=4" in proc.stderr
