"""``python -m harness.evaluate CHECKPOINT [--set KEY=VALUE ...] [--study STUDY.yaml] [--device D] [--json PATH]``:
evaluate a saved model in this process, on the validation split of the config it was trained with, and
print the metrics (test-time k included when ``train.test_time_k`` is on).

CHECKPOINT is a checkpoint folder (``replicated.pt`` and, from an expert-parallel run, ``experts_rank*.pt``,
whatever world size wrote it), one of its files, a folder of ``checkpoint_*`` folders (a Ray Train run or a
Tune trial: the last by name, which is the latest), or a ``--save-model`` file. The config comes from the
checkpoint (``--study`` replaces it: older checkpoints lack one); ``--set`` overrides its fields.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .cli import add_overrides_argument
from .config import RunConfig, apply_overrides, load_study, set_dotted, validate_run
from .console import summary_lines
from .errors import HarnessError
from .storage import Location
from .tasks.base import Session
from .training.checkpoints import EXPERTS_FILE, REPLICATED_FILE, Checkpoint, read_checkpoint, read_model_file, restore
from .training.loop import place_model, resolve_device, task_for, validation_metrics

# Evaluation runs in this process on the checkpoint's weights: no Ray workers, no expert parallelism, and
# no model.weights to start from (the two-stage protocols' first stage is in the checkpoint already).
SINGLE_PROCESS = {"distributed.num_workers": 0, "distributed.expert_parallel": False, "model.weights": None}


@dataclass
class Evaluation:
    """What :func:`evaluate_checkpoint` found: ``metrics`` (the task's validation metrics, as the run
    reports them), the ``config`` evaluated, the ``checkpoint`` read and the file or folder it came from."""

    metrics: dict[str, Any]
    config: RunConfig
    checkpoint: Checkpoint
    source: pathlib.Path


def locate(path: str | pathlib.Path) -> pathlib.Path:
    """The checkpoint folder or ``--save-model`` file that ``path`` names (see the module docstring); a
    path that holds none is a one-line :class:`HarnessError`."""
    path = pathlib.Path(path)
    if path.is_file():
        return path.parent if path.name == REPLICATED_FILE or EXPERTS_FILE.fullmatch(path.name) else path
    if (path / REPLICATED_FILE).is_file():
        return path
    if path.is_dir():
        found = sorted(p for p in path.glob("checkpoint_*") if (p / REPLICATED_FILE).is_file())
        if found:
            return found[-1]
        raise HarnessError(f"{path}: no checkpoint here (no {REPLICATED_FILE}, no checkpoint_* folder holding one)")
    raise HarnessError(
        f"{path}: no such checkpoint (expected a folder with {REPLICATED_FILE}, a run folder of "
        f"checkpoint_* folders, or a --save-model file)"
    )


def evaluation_config(
    checkpoint: Checkpoint, overrides: Sequence[str], study: str | pathlib.Path | None, source: pathlib.Path
) -> RunConfig:
    """The checkpoint's run config (or ``study``'s base) with ``overrides`` (``--set``), made single-process
    (:data:`SINGLE_PROCESS`)."""
    if study is not None:
        raw = load_study(study, list(overrides)).base.model_dump(mode="json")
    elif checkpoint.config is not None:
        raw = apply_overrides({"name": "evaluate", "base": checkpoint.config}, list(overrides))["base"]
    else:
        raise HarnessError(
            f"{source}: the checkpoint records no run config (saved by an older harness); "
            f"pass --study STUDY.yaml with the run's config"
        )
    for key, value in SINGLE_PROCESS.items():
        set_dotted(raw, key, value)
    return validate_run(raw)


def evaluate_checkpoint(
    path: str | pathlib.Path, overrides: Sequence[str] = (), study: str | pathlib.Path | None = None
) -> Evaluation:
    """Build the checkpoint's model in this process, load its weights (experts of every rank gathered to
    their global ids) and run the task's evaluation: the metrics the run reported for that epoch (up to
    float summation order when it ran on several ranks), plus ``val_top1_k<k>`` / ``val_ap_k<k>`` when
    ``train.test_time_k`` is on."""
    source = locate(path)
    checkpoint = read_checkpoint(source) if source.is_dir() else read_model_file(source)
    config = evaluation_config(checkpoint, overrides, study, source)
    device = resolve_device(config)
    task = task_for(config)
    data = task.to_device(task.load_data(config), device)
    model = place_model(task, task.build_model(config, data), config, device)
    restore(checkpoint, model, None, device, where=str(source))
    session = Session(device=device)
    metrics, _ = validation_metrics(task, model, data, config, device, session, config.train.test_time_k)
    return Evaluation(metrics, config, checkpoint, source)


def describe(evaluation: Evaluation) -> str:
    """One line: what was evaluated, from which epoch and world size, where."""
    c, config = evaluation.checkpoint, evaluation.config
    saved = (
        (
            f"epoch {c.epoch}, saved on {c.world_size} rank{'s' if c.world_size > 1 else ''}"
            f"{' (expert parallel)' if c.expert_parallel else ''}"
        )
        if c.epoch
        else "a --save-model file"
    )
    return (
        f"checkpoint {evaluation.source}: {config.model.name} on {config.data.name}, {saved}; "
        f"evaluated in this process on {resolve_device(config)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.evaluate", description="Evaluate a checkpoint in this process and print its metrics."
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint folder (replicated.pt [+ experts_rank*.pt]), a run or "
        "trial folder of checkpoint_* folders (the latest), or a --save-model file",
    )
    add_overrides_argument(
        parser, "override a field of the saved config, e.g. --set train.test_time_k=true (repeatable)"
    )
    parser.add_argument(
        "--study", metavar="YAML", help="take the config from this study's base instead of the checkpoint"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to evaluate (train.device)")
    parser.add_argument(
        "--json", type=pathlib.Path, metavar="PATH", help="also write the epoch, config and metrics here"
    )
    parser.add_argument("--verbose", action="store_true", help="print every metric, not only the summary")
    args = parser.parse_args(argv)
    overrides = args.overrides + ([f"train.device={args.device}"] if args.device else [])
    try:
        evaluation = evaluate_checkpoint(args.checkpoint, overrides, args.study)
        if args.json is not None:
            record = {
                "checkpoint": str(evaluation.source),
                "epoch": evaluation.checkpoint.epoch,
                "config": evaluation.config.model_dump(mode="json"),
                "metrics": evaluation.metrics,
            }
            try:  # written whole or not at all
                Location(args.json).write_text(json.dumps(record, indent=1))
            except OSError as exc:
                raise HarnessError(f"--json {args.json}: cannot write ({exc.strerror})") from None
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2  # bad input, as harness.train and harness.sweep
    print(describe(evaluation))
    print("\n".join(summary_lines(evaluation.metrics, args.verbose)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
