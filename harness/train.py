"""``python -m harness.train <study.yaml> [--set key=value ...]``: run a study's ``base`` config, in this
process (:func:`harness.training.loop.train_loop`) or, with ``distributed.num_workers`` >= 1, through Ray Train
(:mod:`harness.training.ray_train`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from .cli import add_overrides_argument
from .config import absolutize_paths, load_study, validate_run
from .console import epoch_line, placement_table, step_progress, summary_lines, verbose_line
from .errors import HarnessError
from .tasks.base import Session
from .training.loop import train_loop


# The end-of-run summary without --verbose: the task's figures, each MoE layer's balance, test-time k.
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.train", description="Run a study's base config.")
    parser.add_argument("study", help="study YAML file (name, base, sweep)")
    add_overrides_argument(parser, "override a base field, e.g. --set train.epochs=2 (repeatable)")
    parser.add_argument(
        "--save-model",
        type=pathlib.Path,
        metavar="PATH",
        help="write the trained model's weights here (a later run's model.weights)",
    )
    parser.add_argument("--verbose", action="store_true", help="every metric on every epoch line and at the end")
    parser.add_argument("--dry-run", action="store_true", help="validate the study and print what would run, then exit")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study, args.overrides)
        config = study.base
        if args.save_model is not None and config.distributed.num_workers:
            raise HarnessError(
                "--save-model: only for runs in this process (distributed.num_workers: 0); a Ray "
                "Train run's checkpoints hold its weights (replicated.pt)"
            )
        if config.distributed.num_workers:  # workers do not run in this directory
            config = validate_run(absolutize_paths(config.model_dump(mode="json")))
        workers = config.distributed.num_workers
        where = f"Ray Train, {workers} workers" if workers else "in this process"
        print(
            f"study {study.name}: {config.model.name} on {config.data.name}, {config.train.epochs} epochs, {where}",
            flush=True,
        )
        if args.dry_run:
            return 0
        if workers:
            from .training.ray_train import fit  # Ray only when asked for: it is slow to import and start

            history = fit(config, study.name, verbose=args.verbose).return_value
        else:
            line = verbose_line if args.verbose else epoch_line
            session = Session(save_model=args.save_model, progress=step_progress)
            history = train_loop(
                config, lambda m, **_: print(line(m, config.train.epochs), flush=True), session=session
            )
        final = history[-1]
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("final metrics:" if args.verbose else "final metrics (all of them with --verbose):")
    print("\n".join(summary_lines(final, args.verbose)))
    print(placement_table(json.loads(final["placement"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
