"""What the command-line entry points (``python -m harness.train``, ``.sweep``, ``.evaluate``) share."""

from __future__ import annotations

import argparse


def add_overrides_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides``: dotted config fields whose values
    are parsed as YAML."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)
