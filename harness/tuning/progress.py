"""The sweep's live progress view, as a Ray Tune ``ProgressReporter``: a compact table of trials (name,
status, swept values, epoch, the study's main metric, one balance metric). On a terminal it redraws in
place every couple of seconds; elsewhere (CI, ``ray job logs``) it logs a status line every 30 s and one
line per finished trial, so a long sweep stays a few lines per minute.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, TextIO

from ray.tune import ProgressReporter

from ..config import resolve_entry

BALANCE_METRIC = "moe0_importance_cv"
# Set by the sweep's driver on every run, a resumed one too (Tune restores the reporter from the first).
VERBOSE_ENV = "HARNESS_SWEEP_VERBOSE"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _duration(seconds: float) -> str:
    """``45 -> "1 min"``, ``5700 -> "1 h 35 min"``: whole minutes, rounded up."""
    minutes = max(1, math.ceil(seconds / 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


class TrialTable(ProgressReporter):
    """Tune's reporter API (``should_report`` / ``report``) over the harness's trials, whose Tune config
    holds ``{"trial": {"name", "values", ...}}``.

    Args:
        swept_keys: the study's swept fields (their values become columns).
        main_metric: ``val_top1`` (classification) or ``val_ap`` (detection).
        total: the study's number of trials.
        stream: where to write (stdout); redrawn in place when it is a terminal.
        interval_s: seconds between reports (default 2 on a terminal, 30 elsewhere).
    """

    def __init__(
        self,
        swept_keys: list[str],
        main_metric: str,
        total: int,
        stream: TextIO | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.swept_keys = swept_keys
        self.total = total  # Tune creates trials as slots free up: it knows only some of them at first
        self.columns = ["trial", "status", *swept_keys, "epoch", main_metric, BALANCE_METRIC]
        self.main_metric = main_metric
        self._stream = stream  # None: sys.stdout when writing (Tune pickles the reporter with the sweep)
        self.interval_s = interval_s
        self._last = float("-inf")
        self._start = time.monotonic()
        self._drawn_lines = 0
        self._logged: set[str] = set()
        self._finished_at_start: int | None = None  # trials finished before this run's first report

    def setup(self, start_time: float | None = None, **kwargs: Any) -> None:
        """Called by Tune at every ``fit``, a resumed one too (the reporter comes back from the sweep's
        saved state): the clock and the drawing start afresh; trials already logged stay logged."""
        self._start = time.monotonic()
        self._last = float("-inf")
        self._drawn_lines = 0
        self._finished_at_start = None

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def tty(self) -> bool:
        """Redraw in place: on a terminal, unless ``--verbose`` prints other lines between the drawings."""
        return self.stream.isatty() and os.environ.get(VERBOSE_ENV) != "1"

    def should_report(self, trials: list, done: bool = False) -> bool:
        interval = self.interval_s if self.interval_s is not None else (2.0 if self.tty else 30.0)
        return done or time.monotonic() - self._last >= interval

    def rows(self, trials: list) -> list[list[str]]:
        """One row of :attr:`columns` per trial, in the study's order."""
        rows = []
        for trial in sorted(trials, key=lambda t: t.config["trial"]["name"]):
            result = trial.last_result or {}
            values = resolve_entry(trial.config)["values"]
            status = "done" if trial.status == "TERMINATED" else trial.status.lower()
            rows.append(
                [
                    trial.config["trial"]["name"],
                    status,
                    *[_value(values.get(k)) for k in self.swept_keys],
                    _value(result.get("epoch")),
                    _value(result.get(self.main_metric)),
                    _value(result.get(BALANCE_METRIC)),
                ]
            )
        return rows

    def table(self, trials: list) -> str:
        """The rows under a header, columns padded to their widest cell."""
        rows = [self.columns, *self.rows(trials)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.columns))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)

    def status(self, trials: list) -> str:
        """``[mm:ss] 3/8 finished (2 done, 1 error), 2 running, 3 waiting, about 12 min left``: the time
        left at this run's pace so far (trials it finished per second), once it has finished one."""
        counts: dict[str, int] = {}
        for trial in trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        finished = counts.get("TERMINATED", 0) + counts.get("ERROR", 0)
        running = counts.get("RUNNING", 0)
        elapsed = time.monotonic() - self._start
        minutes, seconds = divmod(int(elapsed), 60)
        if self._finished_at_start is None:  # a resumed sweep's earlier trials do not count toward its pace
            self._finished_at_start = finished
        finished_here, left = finished - self._finished_at_start, self.total - finished
        eta = f", about {_duration(elapsed / finished_here * left)} left" if finished_here > 0 and left > 0 else ""
        return (
            f"[{minutes:02d}:{seconds:02d}] {finished}/{self.total} finished ({counts.get('TERMINATED', 0)} done, "
            f"{counts.get('ERROR', 0)} error), {running} running, {self.total - finished - running} waiting{eta}"
        )

    def report(self, trials: list, done: bool, *sys_info: Any) -> None:
        self._last = time.monotonic()
        if self.tty:
            text = self.status(trials) + "\n" + self.table(trials)
            # Move up over the previous drawing and clear it: the table redraws in place.
            prefix = f"\x1b[{self._drawn_lines}F\x1b[J" if self._drawn_lines else ""
            self.stream.write(prefix + text + "\n")
            self._drawn_lines = text.count("\n") + 1
        else:
            lines = [self.status(trials)]
            for row in self.rows(trials):  # each trial once, when it finishes
                if row[1] in ("done", "error") and row[0] not in self._logged:
                    self._logged.add(row[0])
                    swept = " ".join(f"{k}={v}" for k, v in zip(self.swept_keys, row[2:]))
                    figures = [f"{h} {c}" for h, c in zip(self.columns[-3:], row[-3:]) if c != "-"]
                    lines.append(f"  {row[0]} {row[1]} | " + " | ".join([swept, *figures]))
            self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()
