"""The daemon's modem session polls on its interval, woken early by registration URCs only once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from agent.config import ModemConfig
from agent.daemon.session import ModemSession
from hw_fixtures.testing import start_emulator


async def test_a_registration_urc_wakes_one_poll_not_a_busy_loop(tmp_path: Path) -> None:
    with start_emulator("--vendor", "generic", "--fast") as emu:
        states: list[str | None] = []
        updated = asyncio.Event()

        def on_update(s: ModemSession) -> None:
            states.append(s.info.registration.state if s.info else None)
            updated.set()

        async def until(cond: Callable[[], bool]) -> None:
            async with asyncio.timeout(10.0):
                while not cond():
                    await updated.wait()
                    updated.clear()

        session = ModemSession(
            ModemConfig(id="m0", port=emu.port, poll_interval=600.0),
            state_dir=tmp_path,
            on_update=on_update,
        )
        task = asyncio.create_task(session.run())
        try:
            await until(lambda: session.online and session.info is not None)
            modem = session.modem
            assert modem is not None
            emu.control("set_registration", state="searching")
            # The URC wakes the loop long before the 600 s interval, the poll reads it, and the
            # wake-up is consumed: left set, every turn of the loop would poll again at once
            # (and spin without yielding to the modem while a profile switch runs).
            await until(
                lambda: states[-1] == "searching" and not modem.registration_changed.is_set()
            )
            polls = len(states)
            emu.control("set_registration", state="home")
            await until(lambda: states[-1] == "home")
            assert len(states) > polls
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
