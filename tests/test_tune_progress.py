"""The sweep's progress view (a Ray Tune reporter) on the trial states Tune hands it, and the driver's
record of each trial's wall-clock segments across a resume."""

import io
from dataclasses import dataclass, field

from harness.tuning.progress import TrialTable


@dataclass
class TuneTrial:
    """What the reporter reads of a ``ray.tune.experiment.Trial``: its config, status and last result."""

    name: str
    status: str
    last_result: dict = field(default_factory=dict)

    @property
    def config(self):
        return {"trial": {"name": self.name, "values": {"moe.gate.type": "gap_fc", "seed": int(self.name[-1])}}}


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    """``time.monotonic`` for the reporter, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_logs_each_finished_trial_once_when_not_a_terminal(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("harness.tuning.progress.time.monotonic", clock)
    out = io.StringIO()
    table = TrialTable(["moe.gate.type", "seed"], "val_top1", total=4, stream=out)
    running = [TuneTrial("t0000", "RUNNING", {"epoch": 1.0, "val_top1": 0.2}), TuneTrial("t0001", "PENDING")]
    assert table.should_report(running)
    table.report(running, done=False)
    assert not table.should_report(running)  # 30 s between reports off a terminal
    finished = [
        TuneTrial("t0000", "TERMINATED", {"epoch": 2.0, "val_top1": 0.41, "moe0_importance_cv": 0.1234}),
        TuneTrial("t0001", "ERROR", {}),
    ]
    assert table.should_report(finished, done=True)
    clock.now += 600  # 2 trials in 10 minutes: the 2 left take about 10 more
    table.report(finished, done=True)
    table.report(finished, done=True)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("0/4 finished (0 done, 0 error), 1 running, 3 waiting")
    assert lines[1] == "[10:00] 2/4 finished (1 done, 1 error), 0 running, 2 waiting, about 10 min left"
    assert (
        lines[2] == "  t0000 done | moe.gate.type=gap_fc seed=0 | epoch 2 | val_top1 0.41 | moe0_importance_cv 0.1234"
    )
    assert lines[3] == "  t0001 error | moe.gate.type=gap_fc seed=1"
    assert len(lines) == 5  # the third report adds its status line only


def test_redraws_the_table_in_place_on_a_terminal():
    out = Terminal()
    table = TrialTable(["moe.gate.type", "seed"], "val_ap", total=2, stream=out)
    trials = [TuneTrial("t0001", "PENDING"), TuneTrial("t0000", "RUNNING", {"epoch": 1.0, "val_ap": 0.05})]
    table.report(trials, done=False)
    first = out.getvalue()
    assert first.splitlines()[1].split() == [
        "trial",
        "status",
        "moe.gate.type",
        "seed",
        "epoch",
        "val_ap",
        "moe0_importance_cv",
    ]
    assert first.splitlines()[2].split() == ["t0000", "running", "gap_fc", "0", "1", "0.05", "-"]
    table.report(trials, done=False)
    assert out.getvalue()[len(first) :].startswith("\x1b[4F\x1b[J")  # up over the 4 lines drawn, then clear


def test_a_resumed_sweep_estimates_the_time_left_from_its_own_pace(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("harness.tuning.progress.time.monotonic", clock)
    table = TrialTable(["seed"], "val_top1", total=100, stream=io.StringIO())
    table.setup()  # Tune's call at the resumed fit: 40 trials finished before it
    earlier = [TuneTrial(f"t{i:04d}", "TERMINATED") for i in range(40)]
    assert table.status(earlier).endswith("0 running, 60 waiting")  # no pace yet: no estimate
    clock.now += 300  # one more in 5 minutes: 59 left, about 4 h 55 min
    assert table.status(earlier + [TuneTrial("t0040", "TERMINATED")]).endswith(", about 4 h 55 min left")


def test_trial_times_survive_a_resume_whose_callback_comes_back_from_the_first_run(tmp_path):
    """Tune pickles the sweep's callbacks when the first run starts and unpickles them at --resume: what a
    callback kept in memory is the first run's, so the file must carry the earlier runs' segments."""
    import pickle

    import cloudpickle

    from harness.analysis.aggregate import TRIAL_TIMES_FILE, read_trial_times
    from harness.storage import Location
    from harness.tuning.callbacks import trial_times_callback

    assert not TRIAL_TIMES_FILE.endswith((".json", ".pkl"))  # Tune's restore would copy it back over ours
    folder = Location(str(tmp_path))
    first = trial_times_callback(folder)
    pickled = cloudpickle.dumps(first)  # as Tune keeps it, from before any trial ran
    first.on_trial_start(0, [], TuneTrial("t0000", "RUNNING"))
    first.on_trial_complete(0, [], TuneTrial("t0000", "TERMINATED"))
    first.on_trial_start(0, [], TuneTrial("t0001", "RUNNING"))  # the driver dies during t0001
    resumed = pickle.loads(pickled)
    resumed.on_trial_start(0, [], TuneTrial("t0001", "RUNNING"))
    resumed.on_trial_complete(0, [], TuneTrial("t0001", "TERMINATED"))
    times = read_trial_times(folder)
    assert sorted(times) == ["t0000", "t0001"]
    assert len(times["t0000"]) == 1 and times["t0000"][0][1] >= times["t0000"][0][0]
    (killed_start, killed_end), (start, end) = times["t0001"]  # the killed run stays open
    assert killed_end is None and end >= start >= killed_start


def test_a_resumed_sweep_rates_only_the_trials_it_finished():
    """``sweep finished in N s (T trials/hour)`` after --resume: 70 trials in the study, 28 run to the end by
    this run, must not read as 70 in this run's time."""
    from harness.analysis.aggregate import trials_finished_since

    times = {
        "t0000": [[10.0, 20.0]],  # finished before the resume at 100
        "t0001": [[30.0, None], [100.0, 150.0]],  # killed, then finished by this run
        "t0002": [[110.0, 160.0]],  # run wholly by this run
        "t0003": [[120.0, None]],  # still open
        "t0004": [],
    }
    assert trials_finished_since(times, 100.0) == 2
    assert trials_finished_since(times, 0.0) == 3
