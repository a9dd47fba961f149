"""Helpers shared by several test modules: where the repository and the shared real data sets are."""

from __future__ import annotations

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> pathlib.Path:
    """A path under ../shared/data, skipping the test when a fresh clone elsewhere lacks it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (only present beside the project checkout)")
    return path


# The bucket the s3_server fixture creates.
S3_BUCKET = "moe-bench"
