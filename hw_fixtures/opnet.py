"""One emulated modem's real interface and the operator network behind it (`--net netns`).

Each modem gets a veth pair made with pyroute2. The far end lives in an "operator" network
namespace that plays the operator: the gateway address 198.18.N.1/24, the shared "internet"
address 198.19.0.1 on its loopback, and an HTTP 204, a TCP echo, a DNS and (for ECM/RNDIS
personalities) a DHCP server, each logging the source address of every request. The near end
is the modem's interface, created straight into the namespace where the agent runs.

Traffic passes only while the modem would carry it (context active, vendor connect done, link
not down): otherwise a FIB rule in the operator namespace blackholes everything that arrives
from the modem, so the near end keeps its carrier and the failure is silent. `degraded` puts
netem delay and loss on the far end when the kernel has sch_netem, else the servers delay
their answers and drop every other DNS query.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterator

import structlog
from pyroute2 import AsyncIPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from hw_fixtures.addressing import SERVER_ADDRESS, ContextAddress, gateway_interface
from hw_fixtures.dataplane import DnsDatagrams, dns_answer, http_probe_reply
from hw_fixtures.dhcp_server import DhcpServer

log = structlog.get_logger(__name__)

FAR_IFNAME = "opgw"
HTTP_PORT, ECHO_PORT, DNS_PORT, DHCP_PORT = 80, 7, 53, 67
BLACKHOLE_PRIORITY = 100
LOCAL_PRIORITY = 1000
LOCAL_TABLE = 255
NETLINK_TIMEOUT = 10.0
IO_TIMEOUT = 10.0
SERVERS = ("http", "tcp", "dns", "dhcp")
BLACKHOLED_PROTOCOLS = (socket.IPPROTO_ICMP, socket.IPPROTO_TCP, socket.IPPROTO_UDP)


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the block with this thread in network namespace `name` (sockets made here stay)."""
    netns.pushns(name)
    try:
        yield
    finally:
        netns.popns()


def _server_sockets(name: str, dhcp: bool) -> dict[str, socket.socket]:
    """Listening sockets made inside the operator namespace."""
    socks: dict[str, socket.socket] = {}
    with inside(name):
        for kind, port in (("http", HTTP_PORT), ("tcp", ECHO_PORT)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(64)
            sock.setblocking(False)
            socks[kind] = sock
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", DNS_PORT))
        udp.setblocking(False)
        socks["dns"] = udp
        if dhcp:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, FAR_IFNAME.encode())
            sock.bind(("0.0.0.0", DHCP_PORT))
            sock.setblocking(False)
            socks["dhcp"] = sock
    return socks


class OperatorNetwork:
    """The operator namespace, veth pair, gate and servers of one modem."""

    def __init__(
        self,
        *,
        name: str,
        interface: str,
        index: int,
        agent_netns: str | None,
        state: Callable[[], str],
        grant: Callable[[], ContextAddress | None],
        router: Callable[[], bool],
        delay: Callable[[], float],
        count: Callable[[int, int], object] | None = None,
        plugged: Callable[[], bool] = lambda: True,
    ) -> None:
        self.name = name
        self.interface = interface
        self.index = index
        self.agent_netns = agent_netns
        # state(): "up", "degraded" or "down" (nothing passes); grant(): the DHCP lease
        self._state = state
        self._grant = grant
        self._router = router
        self._delay = delay
        self._count = count
        self._plugged = plugged
        self.carrier = True
        self.loss = 10.0
        self._dirty = False  # netem figures changed while degraded: apply them again
        self.requests: dict[str, list[str]] = {k: [] for k in SERVERS}
        self.applied = "unset"
        self.netem: bool | None = None  # None: not tried yet
        self._ipr: AsyncIPRoute | None = None
        self._far_index = 0
        self._lock = asyncio.Lock()
        self._servers: list[asyncio.Server] = []
        self._dns: DnsDatagrams | None = None
        self._dhcp: DhcpServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dns_seen = 0
        self._created = False

    # ------------------------------------------------------------------ set-up

    async def start(self) -> None:
        """Create the namespace, the veth pair, addresses, the gate and the servers."""
        await asyncio.wait_for(asyncio.to_thread(netns.create, self.name), NETLINK_TIMEOUT)
        self._created = True
        self._ipr = AsyncIPRoute(netns=self.name)
        ipr = self._ipr
        target = self._agent_fd()
        try:
            await asyncio.wait_for(
                ipr.link(
                    "add",
                    ifname=FAR_IFNAME,
                    kind="veth",
                    peer={"ifname": self.interface, "net_ns_fd": target},
                ),
                NETLINK_TIMEOUT,
            )
        finally:
            os.close(target)
        self._far_index = (await ipr.link_lookup(ifname=FAR_IFNAME))[0]
        lo = (await ipr.link_lookup(ifname="lo"))[0]
        address, prefix = gateway_interface(self.index).split("/")
        await ipr.addr("add", index=self._far_index, address=address, prefixlen=int(prefix))
        await ipr.addr("add", index=lo, address=SERVER_ADDRESS, prefixlen=32)
        await ipr.link("set", index=lo, state="up")
        await ipr.link("set", index=self._far_index, state="up")
        # the local table must come after the blackhole rule, so it moves from priority 0
        await ipr.rule("add", family=socket.AF_INET, priority=LOCAL_PRIORITY, table=LOCAL_TABLE)
        await ipr.rule("del", family=socket.AF_INET, priority=0, table=LOCAL_TABLE)
        await self._near_up()
        await self._start_servers()
        await self.sync()
        log.info("emu_opnet_ready", netns=self.name, interface=self.interface)

    def _agent_fd(self) -> int:
        if self.agent_netns is None:
            return os.open("/proc/self/ns/net", os.O_RDONLY)
        path = self.agent_netns
        if "/" not in path:
            path = os.path.join("/var/run/netns", path)
        return os.open(path, os.O_RDONLY)

    async def _near_up(self) -> None:
        """The modem's interface is up with carrier, as a plugged USB function is."""
        async with AsyncIPRoute(netns=self.agent_netns) as ipr:
            found = await ipr.link_lookup(ifname=self.interface)
            if found:
                await ipr.link("set", index=found[0], state="up")

    async def _start_servers(self) -> None:
        socks = _server_sockets(self.name, dhcp=self._router())
        self._servers.append(await asyncio.start_server(self._serve_http, sock=socks["http"]))
        self._servers.append(await asyncio.start_server(self._serve_tcp, sock=socks["tcp"]))
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(
            lambda: DnsDatagrams(self), sock=socks["dns"]
        )
        self._dns = proto
        if "dhcp" in socks:
            self._dhcp = DhcpServer(socks["dhcp"], self._dhcp_grant, self._logger("dhcp"))
            await self._dhcp.start()

    def _dhcp_grant(self) -> ContextAddress | None:
        return self._grant() if self._state() != "down" and self._router() else None

    def _logger(self, kind: str) -> Callable[[str], None]:
        return self.requests[kind].append

    # -------------------------------------------------------------------- gate

    async def sync(self) -> None:
        """Make the blackhole rule and netem match state() now."""
        async with self._lock:
            want = self._state()
            if self._ipr is None:
                return
            await self._set_carrier(self._plugged())
            if want == self.applied and not self._dirty:
                return
            self._dirty = False
            ipr = self._ipr
            blocked = want == "down"
            if blocked != (self.applied == "down"):
                op = "add" if blocked else "del"
                # per IP protocol, so ARP still resolves the gateway: a blocked packet is
                # dropped at once instead of waiting in the agent's neighbour queue
                for proto in BLACKHOLED_PROTOCOLS:
                    try:
                        await asyncio.wait_for(
                            ipr.rule(
                                op,
                                family=socket.AF_INET,
                                priority=BLACKHOLE_PRIORITY,
                                iifname=FAR_IFNAME,
                                FRA_IP_PROTO=proto,
                                action="FR_ACT_BLACKHOLE",
                            ),
                            NETLINK_TIMEOUT,
                        )
                    except NetlinkError as exc:
                        if exc.code not in (errno.EEXIST, errno.ENOENT):
                            raise
            if blocked:
                for writer in list(self._conns):
                    writer.transport.abort()
                self._conns.clear()
            await self._set_netem(want == "degraded")
            log.info("emu_opnet_state", netns=self.name, state=want)
            self.applied = want

    async def _set_carrier(self, on: bool) -> None:
        """An unplugged modem: the far end goes down, so the near end loses its carrier."""
        if on == self.carrier or self._ipr is None:
            return
        state = "up" if on else "down"
        await asyncio.wait_for(
            self._ipr.link("set", index=self._far_index, state=state), NETLINK_TIMEOUT
        )
        self.carrier = on
        log.info("emu_opnet_carrier", netns=self.name, carrier=on)

    def set_impairment(self, delay_changed: bool = False, loss: float | None = None) -> None:
        """New degraded figures: netem is re-applied at the next sync."""
        if loss is not None:
            self.loss = loss
        self._dirty = self._dirty or delay_changed or loss is not None

    async def _set_netem(self, on: bool) -> None:
        assert self._ipr is not None
        if self.netem is False:
            return
        if not on:
            if self.netem:
                with contextlib.suppress(NetlinkError):
                    await self._ipr.tc("del", "netem", index=self._far_index, handle="1:")
            return
        try:
            await asyncio.wait_for(
                self._ipr.tc(
                    "replace",
                    "netem",
                    index=self._far_index,
                    handle="1:",
                    delay=int(self._delay() * 1_000_000),
                    loss=self.loss,
                ),
                NETLINK_TIMEOUT,
            )
            self.netem = True
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EOPNOTSUPP):
                raise
            # the kernel has no sch_netem: the servers delay and drop instead
            self.netem = False
            log.info("emu_opnet_no_netem", netns=self.name)

    def sync_soon(self) -> None:
        """Schedule sync() from synchronous code (modem state callbacks)."""
        task = asyncio.get_running_loop().create_task(self.sync())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _app_degraded(self) -> bool:
        return self._state() == "degraded" and not self.netem

    async def _pause(self) -> None:
        if self._app_degraded():
            await asyncio.sleep(self._delay())

    def _traffic(self, rx: int, tx: int) -> None:
        if self._count is not None and (rx or tx):
            self._count(rx, tx)

    # ----------------------------------------------------------------- servers

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._state() == "down":
            writer.transport.abort()
            return
        self.requests["tcp"].append(writer.get_extra_info("peername")[0])
        self._conns.add(writer)
        try:
            while True:
                data = await asyncio.wait_for(reader.read(4096), IO_TIMEOUT)
                if not data:
                    break
                self._traffic(0, len(data))
                await self._pause()
                writer.write(data)
                self._traffic(len(data), 0)
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._state() == "down":
            writer.transport.abort()
            return
        self._conns.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
            self.requests["http"].append(writer.get_extra_info("peername")[0])
            self._traffic(0, len(head))
            await self._pause()
            answer, _probe = http_probe_reply(head.split(b"\r\n", 1)[0].decode("latin-1"))
            writer.write(answer)
            self._traffic(len(answer), 0)
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    def on_dns(self, data: bytes, addr: tuple[str, int]) -> None:
        """Answer a DNS query: every A record resolves to the shared server address."""
        if self._state() == "down":
            return
        self.requests["dns"].append(addr[0])
        self._traffic(0, len(data))
        answer = dns_answer(data, SERVER_ADDRESS)
        if answer is None:
            return
        if self._app_degraded():
            self._dns_seen += 1
            if self._dns_seen % 2 == 0:
                return
            asyncio.get_running_loop().call_later(self._delay(), self._send_dns, answer, addr)
            return
        self._send_dns(answer, addr)

    def _send_dns(self, answer: bytes, addr: tuple[str, int]) -> None:
        if self._dns is not None and self._dns.transport is not None:
            with contextlib.suppress(OSError):
                self._dns.transport.sendto(answer, addr)
            self._traffic(len(answer), 0)

    def take_requests(self, reset: bool = False) -> dict[str, list[str]]:
        """Source addresses per server since the last reset."""
        snapshot = {k: list(v) for k, v in self.requests.items()}
        if reset:
            for entries in self.requests.values():
                entries.clear()
        return snapshot

    # ---------------------------------------------------------------- teardown

    async def close(self) -> None:
        """Close the servers and remove the namespace (the veth pair goes with it)."""
        for server in self._servers:
            server.close()
        self._servers.clear()
        for writer in list(self._conns):
            writer.transport.abort()
        if self._dns is not None and self._dns.transport is not None:
            self._dns.transport.close()
        if self._dhcp is not None:
            self._dhcp.close()
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ipr.link("del", index=self._far_index), 5.0)
            self._ipr.close()
            self._ipr = None
        if self._created:
            with contextlib.suppress(OSError):
                netns.remove(self.name)
            self._created = False
        log.info("emu_opnet_removed", netns=self.name)
