"""Shared test plumbing: outcome of each test phase, for fixtures that print diagnostics."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator

import pytest
from hypothesis import HealthCheck, settings

from hw_fixtures import pki
from hw_fixtures.netns_testing import (
    cleanup_emulator,
    create_netns,
    is_root,
    remove_netns,
    start_netns_emulator,
    sweep_stale,
    unique_name,
)
from hw_fixtures.pki import TestPki
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


# ------------------------------------------------------------------ network namespaces


@pytest.fixture(scope="session")
def netns_sweep() -> list[str]:
    """Root only: remove esa- namespaces left by dead runs, once per session; skip otherwise."""
    if not is_root():
        pytest.skip("needs root: network namespaces and veth pairs")
    return sweep_stale()


@pytest.fixture
def netns_factory(netns_sweep: list[str]) -> Iterator[Callable[..., str]]:
    """make(what="t") -> a new esa-<pid>-<tag>-<what> namespace; all removed after the test."""
    created: list[str] = []

    def make(what: str = "t") -> str:
        name = create_netns(unique_name(what))
        created.append(name)
        return name

    yield make
    for name in created:
        remove_netns(name)


@pytest.fixture
def agent_netns(netns_factory: Callable[..., str]) -> str:
    """A namespace where the agent under test (and the modems' interfaces) live."""
    return netns_factory("agent")


@pytest.fixture
def netns_emu_factory(agent_netns: str) -> Iterator[Callable[..., EmulatorHandle]]:
    """start(*args, modems=None, netns=None) -> an emulator in --net netns mode (fast delays).

    The modems' interfaces land in `netns` (default: the agent_netns fixture). After the test
    every emulator is stopped and its operator namespaces removed, also after a SIGKILL.
    """
    handles: list[EmulatorHandle] = []

    def start(*args: str, modems: int | None = None, netns: str | None = None) -> EmulatorHandle:
        extra = ["--modems", str(modems)] if modems is not None else []
        handle = start_netns_emulator(
            netns or agent_netns, "--fast", "--log-level", "warning", *extra, *args
        )
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        cleanup_emulator(handle)


# ------------------------------------------------------------------ eSIM download test PKI


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """One SGP.26-shaped PKI per test session, generated at run time and written to a temp dir."""
    return pki.generate().write(tmp_path_factory.mktemp("pki"))
