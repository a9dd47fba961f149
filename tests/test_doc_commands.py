"""Every command the README and docs/ show is one the code accepts: each ``python -m harness.<cli>`` line
uses only flags that CLI has, and for ``train`` and ``sweep`` its study file exists and the command runs
with ``--dry-run`` (validating every trial's config with the command's ``--set`` overrides). The short
ones, the sweeps' ``--dry-run`` lines, run exactly as written."""

import re
import shlex

import pytest

from harness.analysis.aggregate import main as aggregate_main
from harness.bench import main as bench_main
from harness.evaluate import main as evaluate_main
from harness.report import main as report_main
from harness.sweep import main as sweep_main
from harness.train import main as train_main

from .helpers import REPO

CLIS = {
    "train": train_main,
    "sweep": sweep_main,
    "bench": bench_main,
    "report": report_main,
    "aggregate": aggregate_main,
    "evaluate": evaluate_main,
}
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "cluster" / "README.md"]


def documented_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for every ``python -m harness.*`` line of a ``bash`` block, continuation lines
    joined and trailing comments removed."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for command in re.sub(r"\\\n\s*", " ", block).splitlines():
                command = command.split(" #")[0].strip()
                if command.startswith("python -m harness."):
                    found.append((page.name, command))
    return found


COMMANDS = documented_commands()


def test_the_pages_show_commands_of_every_cli():
    shown = {shlex.split(command)[2].removeprefix("harness.") for _, command in COMMANDS}
    assert shown >= {"train", "sweep", "bench", "report"}


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_documented_command_is_accepted(page, command, capsys):
    args = shlex.split(command)
    cli, argv = args[2].removeprefix("harness."), args[3:]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        CLIS[cli](["--help"])
    help_text = capsys.readouterr().out
    for flag in (a.split("=")[0] for a in argv if a.startswith("--")):
        assert flag in help_text, f"{page}: {command}: {flag} is not a flag of harness.{cli}"
    if cli in ("train", "sweep"):
        study = REPO / argv[0]
        assert study.is_file(), f"{page}: {command}: {argv[0]} does not exist"
        dry = [a for a in argv if a != "--resume"]
        if "--dry-run" not in dry:
            dry.append("--dry-run")
        assert CLIS[cli]([str(study), *dry[1:]]) == 0, (page, command, capsys.readouterr().err)
