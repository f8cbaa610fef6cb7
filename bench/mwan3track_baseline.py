"""The reference for failover benches: what OpenWrt's mwan3track does with its own defaults.

mwan3track (net/mwan3, `/usr/sbin/mwan3track`) pings a track address once per round through the
interface (`ping -I <dev> -c 1 -W <timeout>`), then sleeps; an interface starts with
`score = down + up`, each failed round takes one off, and when the score falls to `up` the
interface is declared offline (`disconnected`, and mwan3's hotplug takes it out of the routing
policy); after that `up` good rounds in a row bring it back (`connected`). The defaults the
script falls back on when the config sets nothing: `interval 10`, `timeout 4`, `down 5`,
`up 5`, `count 1`, `reliability 1`, `failure_interval = recovery_interval = interval`.

`Mwan3Track` is that loop, with the agent's ICMP probe as the `ping` (bound to the interface,
so it tests that link whatever the main table says), and `on_down`/`on_up` in place of the
hotplug calls. `MetricMover` is the route move the bench gives it: the interface's default
route in the main table goes from its primary metric to one above every other interface's.

    python -m bench.mwan3track_baseline --iface wwan0 --target 198.19.0.1   # prints events
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.health.icmp import IcmpProbe
from agent.health.probes import LinkBinding

#: mwan3track's defaults (values the script uses when the interface's config names none).
INTERVAL_S = 10.0
TIMEOUT_S = 4.0
DOWN = 5
UP = 5
#: Route protocol of the routes the baseline puts in place (RTPROT_STATIC, as netifd's are).
RTPROT_STATIC = 4

Hook = Callable[[str], Awaitable[None]]


@dataclass
class Mwan3Track:
    """One interface's tracker: mwan3track's score machine around one ping per round."""

    iface: str
    target: str
    on_down: Hook
    on_up: Hook
    interval: float = INTERVAL_S
    timeout: float = TIMEOUT_S
    down: int = DOWN
    up: int = UP
    source: str | None = None
    #: "online", "disconnecting", "offline" or "connecting", as mwan3track writes STATUS.
    status: str = "online"
    score: int = field(init=False)
    #: (monotonic time, event) for every transition, for the bench.
    events: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.score = self.down + self.up

    def reset_online(self) -> None:
        """Start over as a freshly started tracker on a working link does."""
        self.score = self.down + self.up
        self.status = "online"

    async def ping(self) -> bool:
        """`ping -I <iface> -c 1 -W <timeout> <target>`: one echo request through the link."""
        link = LinkBinding(interface=self.iface, source=self.source)
        result = await IcmpProbe(self.target, self.timeout, link=link).run()
        return result.ok

    async def round(self, ok: bool) -> float:
        """Apply one round's outcome to the score; the sleep before the next round."""
        if not ok:
            self.score -= 1
            if self.score < self.up:
                self.score = 0
            else:
                self.status = "disconnecting"
            if self.score == self.up:
                self.status, self.score = "offline", 0
                self.events.append((time.monotonic(), "disconnected"))
                await self.on_down(self.iface)
            return self.interval  # failure_interval defaults to interval
        self.score += 1
        if self.score > self.up:
            self.status, self.score = "online", self.down + self.up
        else:
            self.status = "connecting"
        if self.score == self.up:
            self.status = "online"
            self.events.append((time.monotonic(), "connected"))
            await self.on_up(self.iface)
        return self.interval  # recovery_interval defaults to interval

    async def run(self) -> None:
        """Round after round until cancelled: ping, score, sleep (mwan3track's main loop)."""
        while True:
            pause = await self.round(await self.ping())
            await asyncio.sleep(pause)


class MetricMover:
    """Moves default routes in the main table by metric, as mwan3's policy change does.

    `place(iface, gateway, metric)` puts an interface's default route in place; `demote(iface)`
    raises it above every other one, `restore(iface)` puts its own metric back.
    """

    def __init__(self) -> None:
        self.ipr = AsyncIPRoute()
        self._routes: dict[str, tuple[int, str, int]] = {}

    def close(self) -> None:
        self.ipr.close()

    def _demoted(self) -> int:
        return max(metric for _, _, metric in self._routes.values()) + 10

    async def _delete(self, index: int, metric: int) -> None:
        # Absent is what we want: the route sits at one metric or the other.
        with contextlib.suppress(NetlinkError):
            await self.ipr.route(
                "del", dst="0.0.0.0/0", oif=index, priority=metric, proto=RTPROT_STATIC
            )

    async def _replace(self, iface: str, metric: int) -> None:
        index, gateway, own = self._routes[iface]
        for other in {own, self._demoted()} - {metric}:
            await self._delete(index, other)
        await self.ipr.route(
            "replace",
            dst="0.0.0.0/0",
            gateway=gateway,
            oif=index,
            priority=metric,
            proto=RTPROT_STATIC,
        )

    async def place(self, iface: str, gateway: str, metric: int) -> None:
        index = int((await self.ipr.link_lookup(ifname=iface))[0])
        self._routes[iface] = (index, gateway, metric)
        await self._replace(iface, metric)

    async def demote(self, iface: str) -> None:
        await self._replace(iface, self._demoted())

    async def restore(self, iface: str) -> None:
        await self._replace(iface, self._routes[iface][2])

    async def remove_all(self) -> None:
        demoted = self._demoted() if self._routes else 0
        for index, _, own in self._routes.values():
            for metric in (own, demoted):
                await self._delete(index, metric)
        self._routes.clear()


async def _main(iface: str, target: str, interval: float, timeout: float) -> None:
    async def report(event: str) -> Hook:
        async def hook(name: str) -> None:
            print(json.dumps({"at": time.time(), "iface": name, "event": event}), flush=True)

        return hook

    tracker = Mwan3Track(iface, target, await report("down"), await report("up"), interval, timeout)
    await tracker.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--iface", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--interval", type=float, default=INTERVAL_S)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.iface, args.target, args.interval, args.timeout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
