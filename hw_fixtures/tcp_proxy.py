"""A TCP proxy in front of a broker that a test can cut: a real partition of one device.

Each device's daemon connects to its own proxy instead of the broker. `cut()` drops every
established connection (both sockets aborted: the device sees its session die, the broker sees
a connection lost without DISCONNECT and publishes the device's Last Will) and from then on
new connections are blackholed (accepted and held silently: a connect "succeeds" but CONNACK
never comes, as behind a dead Wi-Fi link) or, with `refuse=True`, closed at once. With
`silent=True` the established connections stay open and lose every byte instead, so each side
learns of the partition only from its own keepalive. `heal()` lets new connections through
again and closes the held (and silenced) ones so their clients retry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S = 5.0
CHUNK = 65536


class BrokerProxy:
    """Listens on 127.0.0.1:<port> and forwards each connection to upstream until cut."""

    def __init__(self, upstream_host: str, upstream_port: int, *, name: str = "") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.name = name
        self.host = "127.0.0.1"
        self.port = 0
        self.blocked = False
        self.refuse = False
        self.silent = False
        #: Connections accepted (forwarded or held) since start, for assertions.
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._held: set[asyncio.StreamWriter] = set()

    @property
    def forwarding(self) -> int:
        """Established connections being forwarded now."""
        return len(self._links)

    @property
    def held(self) -> int:
        """Connections accepted while cut and held without an answer."""
        return len(self._held)

    async def start(self, port: int = 0) -> BrokerProxy:
        """Bind (port 0: any free one) and serve."""
        self._server = await asyncio.start_server(self._accept, self.host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def cut(self, *, refuse: bool = False, silent: bool = False) -> None:
        """Partition: abort every established connection; hold (or refuse) new ones.

        `silent=True` keeps the established connections open but carries no byte either way
        (a radio link out of range): each side finds out only by its own keepalive."""
        self.blocked, self.refuse, self.silent = True, refuse, silent
        if silent:
            log.info("proxy_cut", proxy=self.name, silenced=len(self._links), refuse=refuse)
            return
        links, self._links = self._links, set()
        for down, up in links:
            _abort(down)
            _abort(up)
        log.info("proxy_cut", proxy=self.name, dropped=len(links), refuse=refuse)

    async def heal(self) -> None:
        """Forward new connections again; held ones are closed so their clients reconnect
        (and so are silenced ones: bytes were lost, their streams cannot go on)."""
        self.blocked = False
        held, self._held = self._held, set()
        for writer in held:
            _abort(writer)
        if self.silent:
            links, self._links = self._links, set()
            for down, up in links:
                _abort(down)
                _abort(up)
            self.silent = False
        log.info("proxy_healed", proxy=self.name, released=len(held))

    async def close(self) -> None:
        """Stop listening and drop everything."""
        if self._server is not None:
            self._server.close()
            self._server = None
        # Aborting the sockets ends every connection's handler task.
        await self.cut()
        await self.heal()

    async def __aenter__(self) -> BrokerProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.blocked:
            if self.refuse:
                _abort(writer)
                return
            await self._hold(reader, writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            _abort(writer)
            return
        if self._cut_meanwhile():
            _abort(up_writer)
            _abort(writer)
            return
        link = (writer, up_writer)
        self._links.add(link)
        pumps = [
            asyncio.create_task(_pump(reader, up_writer, self._silenced)),
            asyncio.create_task(_pump(up_reader, writer, self._silenced)),
        ]
        try:
            # Either direction ending (EOF, reset, or a cut aborting the sockets) ends both.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._links.discard(link)
            _abort(up_writer)
            _abort(writer)

    def _silenced(self) -> bool:
        return self.blocked and self.silent

    def _cut_meanwhile(self) -> bool:
        # A method, not the attribute: cut() may have run while we awaited the upstream.
        return self.blocked

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A blackhole: read and discard until the client gives up or heal() closes us."""
        self._held.add(writer)
        try:
            while await reader.read(CHUNK):
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            self._held.discard(writer)
            _abort(writer)


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, silenced: Callable[[], bool]
) -> None:
    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
        while data := await reader.read(CHUNK):
            if silenced():
                continue  # lost on the way
            writer.write(data)
            await asyncio.wait_for(writer.drain(), CONNECT_TIMEOUT_S)


def _abort(writer: asyncio.StreamWriter) -> None:
    # abort(), not close(): nothing buffered is flushed, the peer sees the connection die.
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()
