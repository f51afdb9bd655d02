"""Tests that need root (network namespaces, a tmpfs mount): without it they are skipped with
the reason, reported by `pytest -ra`; `.ci/run` runs as root here and sets
RNNSCALE_PRIVILEGED_TESTS=required, and then a test that cannot do its privileged part fails
instead of being skipped, so CI never passes with them not run."""

from __future__ import annotations

import os

import pytest

REQUIRED = "RNNSCALE_PRIVILEGED_TESTS"


def cannot(reason: str):
    """Skip the test for `reason`, or fail it where CI requires privileged tests to run."""
    if os.environ.get(REQUIRED) == "required":
        pytest.fail(f"{REQUIRED}=required, but this test cannot run here: {reason}")
    pytest.skip(reason)
