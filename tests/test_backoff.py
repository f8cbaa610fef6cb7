"""The one retry schedule: capped exponential steps, jittered to half..whole, reset on success."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from agent.backoff import Backoff, backoff_delay
from agent.daemon import supervisor as sup
from agent.daemon.supervisor import Supervisor


def test_backoff_grows_is_capped_and_jittered() -> None:
    assert backoff_delay(0, 1.0, 60.0, lambda: 1.0) == 1.0
    assert backoff_delay(3, 1.0, 60.0, lambda: 1.0) == 8.0
    assert backoff_delay(30, 1.0, 60.0, lambda: 1.0) == 60.0
    assert backoff_delay(10_000, 1.0, 60.0, lambda: 0.0) == 30.0


@given(
    st.integers(min_value=0, max_value=200),
    st.floats(min_value=0.001, max_value=10.0),
    st.floats(min_value=1.0, max_value=100.0),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_delay_is_within_half_and_whole_of_the_capped_step(
    attempt: int, initial: float, factor: float, r: float
) -> None:
    maximum = initial * factor
    step = min(maximum, initial * 2.0**attempt)
    delay = backoff_delay(attempt, initial, maximum, lambda: r)
    assert step / 2 - 1e-9 <= delay <= step + 1e-9
    assert delay <= maximum + 1e-9


def test_schedule_doubles_then_resets() -> None:
    b = Backoff(0.5, 4.0, rand=lambda: 1.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.attempt == 6
    b.reset()
    assert b.next() == 0.5


def test_jitter_spreads_clients() -> None:
    delays = {Backoff(1.0, 60.0).next() for _ in range(50)}
    assert len(delays) > 1
    assert all(0.5 <= d <= 1.0 for d in delays)


@pytest.mark.parametrize(("initial", "maximum"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_nonsense_schedules_are_refused(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError, match="backoff needs"):
        Backoff(initial, maximum)


async def test_supervisor_restarts_follow_the_shared_schedule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sup, "BACKOFF_INITIAL_S", 0.04)
    runs = 0
    fourth_run = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 4:
            raise RuntimeError("boom")
        fourth_run.set()
        await asyncio.Event().wait()

    s = Supervisor()
    with capture_logs() as logs:
        s.start("flaky", flaky)
        async with asyncio.timeout(5):
            await fourth_run.wait()
    await s.stop()
    waits = [e["restart_in_s"] for e in logs if e["event"] == "task_crashed"]
    assert len(waits) == 3
    for attempt, wait in enumerate(waits):
        step = 0.04 * 2**attempt
        assert step / 2 - 0.006 <= wait <= step + 0.006
