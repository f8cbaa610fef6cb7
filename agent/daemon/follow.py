"""A switch's view of its modem that follows the modem to a new port when a reset re-enumerates it.

AT+CFUN=1,1 on a USB modem (Dell/Sierra style refresh) makes it vanish and come back, possibly
as another tty. The session's run loop reconnects it wherever discovery finds it; this wrapper
waits for that and carries on the switch's calls on the new port, so the switch finishes its
verification there instead of failing on the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

import structlog

from agent.errors import PortGoneError
from agent.models import Registration
from agent.modem.driver import Modem

if TYPE_CHECKING:
    from agent.daemon.session import ModemSession

log = structlog.get_logger(__name__)
T = TypeVar("T")


class _FollowingChannel:
    """URC subscriptions that move to the new channel; a re-enumeration counts as a boot."""

    def __init__(self, owner: FollowingModem) -> None:
        self._owner = owner

    def subscribe(
        self, prefixes: str | Iterable[str], callback: Callable[[str], None]
    ) -> Callable[[], None]:
        prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
        unsubscribe = self._owner.current.channel.subscribe(prefixes, callback)

        async def follow() -> None:
            nonlocal unsubscribe
            while True:
                await self._owner.current.channel.lost_event.wait()
                modem = await self._owner.reconnected()
                unsubscribe()
                unsubscribe = modem.channel.subscribe(prefixes, callback)
                # the modem answered on its new port after its probe: it has booted
                callback("RDY")

        task = asyncio.create_task(follow(), name="switch-follow")

        def stop() -> None:
            task.cancel()
            unsubscribe()

        return stop


class FollowingModem:
    """`SwitchModem` over a session's current Modem, surviving a re-enumeration."""

    def __init__(self, session: ModemSession, modem: Modem, timeout: float) -> None:
        self._session = session
        self.current = modem
        self.timeout = timeout

    @property
    def channel(self) -> _FollowingChannel:
        """The AT channel of whichever port the modem is on."""
        return _FollowingChannel(self)

    async def reconnected(self) -> Modem:
        """Wait until the session has the modem again on a live port."""
        session = self._session
        if session.finder is None:
            raise PortGoneError(session.port or session.id, "port lost and no discovery to follow")
        async with asyncio.timeout(self.timeout):
            while True:
                modem = session.modem
                ready = session.connected.is_set() and modem is not self.current
                if ready and modem is not None and not modem.channel.is_lost:
                    log.info("switch_followed_modem", modem=session.id, port=modem.port)
                    self.current = modem
                    return modem
                waiter = asyncio.ensure_future(session.connected.wait())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await waiter
                waiter.cancel()

    async def _call(self, op: Callable[[Modem], Awaitable[T]]) -> T:
        modem = self.current
        if modem.channel.is_lost and self._session.finder is not None:
            modem = await self.reconnected()
        try:
            return await op(modem)
        except PortGoneError:
            if self._session.finder is None:
                raise
            return await op(await self.reconnected())

    async def probe(self) -> None:
        """Wait until the modem answers (on whichever port it is now)."""
        await self._call(lambda m: m.probe())

    async def read_iccid(self) -> str | None:
        """ICCID of the running profile."""
        return await self._call(lambda m: m.read_iccid())

    async def registration(self) -> Registration:
        """Current registration."""
        return await self._call(lambda m: m.registration())

    async def set_cfun(self, fun: int, *, reset: bool = False) -> None:
        """AT+CFUN; a reset that takes the port away with it has done its job."""
        if not reset:
            await self._call(lambda m: m.set_cfun(fun))
            return
        try:
            await self.current.set_cfun(fun, reset=True)
        except PortGoneError:
            # gone before or instead of its OK: the reset happened; the modem comes back elsewhere
            log.info("switch_reset_reenumerates", modem=self._session.id)
