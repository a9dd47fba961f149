"""``python -m harness.aggregate results/<study>``: Tune's experiment folder -> Parquet tables.

Reads only what the sweep left on disk (``study.json`` and Tune's trial folders), so it can run again at
any time and gives the same tables. Every table is written atomically (temporary file, then rename).

``trials.parquet``: one row per trial, errored ones included (columns in the README).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import tempfile
from typing import Any

import pandas as pd

from .config import flatten, set_dotted, validate_run
from .errors import HarnessError

SCHEMA_VERSION = 1
STUDY_FILE = "study.json"
# Tune's own bookkeeping in every result; only the wall time is kept (as wall_time_s).
_TUNE_KEYS = {
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration", "trial_id",
    "date", "time_this_iter_s", "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
    "config", "experiment_tag", "checkpoint_path",
}


def write_study_file(folder: pathlib.Path, name: str, base: dict[str, Any], trials: list[dict[str, Any]], swept: list[str]) -> None:
    """What the sweep intends to run: base config, trials (name + overrides) and the swept keys."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / STUDY_FILE, json.dumps({"name": name, "base": base, "trials": trials, "swept": swept}, indent=1))


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_parquet(frame: pd.DataFrame, path: pathlib.Path) -> None:
    """Write to a temporary file beside ``path`` and rename it over ``path``: readers see the old table or
    the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_results(trial_dir: pathlib.Path) -> list[dict[str, Any]]:
    """Tune's ``result.json``: one JSON object per report."""
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _error_message(trial_dir: pathlib.Path) -> str | None:
    """The one line that says what went wrong: the harness's own error when it raised one, else the last
    line of the traceback Tune saved."""
    path = trial_dir / "error.txt"
    if not path.exists():
        return None
    text = path.read_text()
    ours = re.findall(r"harness\.errors\.\w+: (.+)", text)
    if ours:
        return ours[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def _trial_status(trial_dir: pathlib.Path, results: list[dict[str, Any]], epochs: int) -> str:
    if (trial_dir / "error.txt").exists():
        return "error"
    if results and int(results[-1].get("epoch", 0)) >= epochs:
        return "ok"
    return "incomplete"


def _config_columns(config: dict[str, Any]) -> dict[str, Any]:
    """Flattened run config as ``config.<dotted key>``; lists as JSON text (one type per column)."""
    return {
        f"config.{key}": json.dumps(value) if isinstance(value, (list, dict)) else value
        for key, value in flatten(config).items()
    }


def trials_table(folder: pathlib.Path) -> pd.DataFrame:
    """One row per trial of the study in ``folder``."""
    study_path = folder / STUDY_FILE
    if not study_path.exists():
        raise HarnessError(f"{folder}: not a study folder (no {STUDY_FILE}); run python -m harness.sweep first")
    study = json.loads(study_path.read_text())
    rows = []
    for index, trial in enumerate(study["trials"]):
        raw = json.loads(json.dumps(study["base"]))
        for key, value in trial["overrides"].items():
            set_dotted(raw, key, value)
        config = validate_run(raw).model_dump(mode="json")
        trial_dir = folder / trial["name"]
        results = _read_results(trial_dir)
        last = dict(results[-1]) if results else {}
        row: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "study": study["name"],
            "trial": trial["name"],
            "trial_index": index,
            "status": _trial_status(trial_dir, results, config["train"]["epochs"]),
            "error": _error_message(trial_dir),
            "epochs": len({r.get("epoch") for r in results}),
            "wall_time_s": last.get("time_total_s"),
        }
        row.update(_config_columns(config))
        row.update({f"sweep.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in trial.get("values", {}).items()})
        row.update({k: v for k, v in last.items() if k not in _TUNE_KEYS and k != "time_total_s" and k not in row})
        rows.append(row)
    return pd.DataFrame(rows)


def aggregate(folder: pathlib.Path | str) -> dict[str, pd.DataFrame]:
    """Build every table of the study in ``folder`` and write it there; returns them by name."""
    folder = pathlib.Path(folder)
    tables = {"trials": trials_table(folder)}
    for name, frame in tables.items():
        atomic_write_parquet(frame, folder / f"{name}.parquet")
    return tables


def summary(tables: dict[str, pd.DataFrame], swept_keys: list[str], metrics: tuple[str, ...]) -> str:
    """A short comparison: one line per trial with its swept values, status and key metrics."""
    trials = tables["trials"]
    columns = ["trial", "status"] + [f"sweep.{k}" for k in swept_keys if f"sweep.{k}" in trials]
    columns += [m for m in metrics if m in trials]
    view = trials[columns].rename(columns=lambda c: c.removeprefix("sweep."))
    counts = trials["status"].value_counts().to_dict()
    head = f"{len(trials)} trials: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    errors = [f"  {t}: {e}" for t, e in zip(trials["trial"], trials["error"]) if isinstance(e, str)]
    return "\n".join([head, view.to_string(index=False, float_format=lambda v: f"{v:.4g}")] + (["errors:"] + errors if errors else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.aggregate", description="Write a study's Parquet tables.")
    parser.add_argument("folder", help="the study's results folder, e.g. results/quickstart")
    args = parser.parse_args(argv)
    try:
        tables = aggregate(args.folder)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, frame in tables.items():
        print(f"{pathlib.Path(args.folder) / name}.parquet: {len(frame)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
