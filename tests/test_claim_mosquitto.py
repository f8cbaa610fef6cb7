"""Three claim drivers on a real Mosquitto, each configured to think it is first in line: the
broker's order of claims decides, and exactly one holds the group emergency."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from agent.siblings.adapter import ClaimDriver, run_claim_client
from agent.siblings.claim import ClaimConfig, ClaimPhase
from tests.mosquitto import MOSQUITTO, MosquittoBroker

pytestmark = pytest.mark.skipif(not MOSQUITTO, reason="mosquitto not installed")

DEVICES = ("tablet", "laptop", "phone2")
WAIT_S = 20.0


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


async def until(changed: asyncio.Event, cond: Callable[[], bool], what: str) -> None:
    """Wait for a condition, re-checked whenever a driver's state changes."""
    async with asyncio.timeout(WAIT_S):
        while not cond():
            changed.clear()
            if cond():
                break
            await changed.wait()
    assert cond(), what


def make_drivers(awake: dict[str, bool], changed: asyncio.Event) -> list[ClaimDriver]:
    drivers = []
    for me in DEVICES:
        others = tuple(d for d in DEVICES if d != me)
        # Misconfigured on purpose: each puts itself first, so all three claim at once.
        cfg = ClaimConfig(
            device=me,
            group="family",
            order=(me, *others),
            others=others,
            ttl=30.0,
            switch_timeout=60.0,
            failback_stable=60.0,
        )

        def on_wake(up: bool, me: str = me) -> None:
            awake[me] = up

        drivers.append(
            ClaimDriver(cfg, "esim-agent", None, on_wake, on_state=lambda _s: changed.set())
        )
    return drivers


@pytest.mark.parametrize("round_", range(3))
async def test_three_racing_claimants_exactly_one_holds(
    broker: MosquittoBroker, round_: int
) -> None:
    awake: dict[str, bool] = {}
    changed = asyncio.Event()
    drivers = make_drivers(awake, changed)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_claim_client(d, broker.host, broker.port, stop=stop, keepalive=10))
        for d in drivers
    ]
    try:
        # Everyone heard everyone (retained availability and state), and no one is mid-claim.
        await until(
            changed,
            lambda: (
                any(awake.values())
                and all(
                    d.state.synced and d.state.phase is not ClaimPhase.CLAIMING for d in drivers
                )
            ),
            "a claimant to win and the others to stand down",
        )
        holders = [d.config.device for d in drivers if d.state.phase is ClaimPhase.AWAKE]
        assert len(holders) == 1, holders
        assert [k for k, v in awake.items() if v] == holders
        winner = holders[0]
        # Every loser sees the winner's claim as the one live claim.
        await until(
            changed,
            lambda: all(
                set(d.state.claims) == {winner} for d in drivers if d.config.device != winner
            ),
            "the losers to see only the winner's claim",
        )
    finally:
        stop.set()
        # Bounded: a client's disconnect must not hold the test (each run cleans up on cancel).
        _done, pending = await asyncio.wait(tasks, timeout=WAIT_S)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # Stopping sleeps the winner before its claim is cleared.
    assert not any(awake.values())
