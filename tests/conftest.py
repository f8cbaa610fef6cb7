"""Shared test plumbing: outcome of each test phase, for fixtures that print diagnostics."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator

import pytest
from hypothesis import HealthCheck, settings

from hw_fixtures.testing import EmulatorHandle, start_emulator

# Hypothesis budgets: "default" in CI (each property's own max_examples, else 100), "fuzz" for
# `make fuzz` (a million inputs per target, no deadline). HYPOTHESIS_PROFILE selects.
settings.register_profile(
    "fuzz",
    max_examples=1_000_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item (item.rep_setup / rep_call / rep_teardown)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def emu_factory() -> Iterator[Callable[..., EmulatorHandle]]:
    """Start emulators (fast delays) with extra arguments; all are stopped after the test."""
    handles: list[EmulatorHandle] = []

    def start(*args: str) -> EmulatorHandle:
        handle = start_emulator("--fast", "--log-level", "warning", *args)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()
