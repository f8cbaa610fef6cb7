"""A modem's data connection over AT: define the context, activate it, connect it to the USB
network function the way the vendor needs, read what the network granted, and keep it up.

The generic 3GPP rule is AT+CGDCONT (+AT+CGAUTH with credentials) then AT+CGACT; the vendor's
DataDialect (agent/modem/vendors.py) adds the connect command its USB mode needs, or says the
mode's data call is not made over AT at all (QMI/MBIM). Addresses, routes and DHCP are the data
path's business (agent/net/); this module only talks to the modem.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import structlog

from agent.at import parsers
from agent.at.channel import AtResponse
from agent.backoff import backoff_delay
from agent.config import LayerConfig, read_secret
from agent.errors import AgentError, AtError, ParseError
from agent.modem.vendors import ROUTER_MODES, VendorProfile

log = structlog.get_logger(__name__)

#: Reads and context definitions answer at once on every modem seen.
QUERY_TIMEOUT = 10.0
#: Activation waits for the network (27.007 leaves it open; 40 s covers slow attaches).
ACTIVATE_TIMEOUT = 40.0
#: Deactivation and vendor disconnect.
DEACTIVATE_TIMEOUT = 20.0
#: How often the keeper reads AT+CGACT? while up, in case a +CGEV URC never comes.
POLL_INTERVAL = 30.0
#: Reconnect backoff after a failed attempt: first step and cap, in seconds.
BACKOFF_INITIAL = 2.0
BACKOFF_MAX = 60.0
#: 27.007 AT+CGAUTH <auth_prot>: 1 = PAP (what APN credentials from operators mostly mean).
CGAUTH_PAP = 1

_PDP_WIRE = {"ip": "IP", "ipv6": "IPV6", "ipv4v6": "IPV4V6"}


class DataError(AgentError):
    """The data connection could not be brought up; `reason` says why in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DataState(enum.StrEnum):
    """Where the data connection stands."""

    #: No active context (not tried yet, dropped, or taken down).
    DOWN = "down"
    #: An attempt is running.
    CONNECTING = "connecting"
    #: Context active (and connected to the USB function where the vendor needs it).
    UP = "up"
    #: The USB function's data call is not made over AT (QMI/MBIM); the agent leaves it be.
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True, slots=True)
class DataProfile:
    """What a layer wants from the context: APN ('auto' = keep the modem's), type, credentials."""

    apn: str = "auto"
    pdp_type: str = "ip"
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_layer(cls, layer: LayerConfig, base_dir: Path | None = None) -> DataProfile:
        """The profile a `[[layers]]` entry asks for (the password file is read here)."""
        return cls(
            apn=layer.apn,
            pdp_type=layer.pdp_type,
            user=layer.apn_user,
            password=read_secret(layer.apn_password, layer.apn_password_file, base_dir),
        )


@dataclass(frozen=True, slots=True)
class DataStatus:
    """What the data connection is now, for the data path, `status` and MQTT."""

    state: DataState = DataState.DOWN
    interface: str | None = None
    usb_mode: str | None = None
    #: How the host gets its address: static (from the modem's reply), dhcp, or none.
    addressing: str = "static"
    cid: int = 1
    apn: str | None = None
    pdp_type: str | None = None
    #: Granted addresses as 'address/prefixlen'.
    addresses: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain data for JSON."""
        return {
            "state": str(self.state),
            "interface": self.interface,
            "usb_mode": self.usb_mode,
            "addressing": self.addressing,
            "cid": self.cid,
            "apn": self.apn,
            "pdp_type": self.pdp_type,
            "addresses": list(self.addresses),
            "gateways": list(self.gateways),
            "dns": list(self.dns),
            "reason": self.reason,
        }


class Channel(Protocol):
    """The part of AtChannel the data connection uses."""

    async def command(self, command: str, *, timeout: float | None = None) -> AtResponse:
        """Send one command; AtError and subclasses on failure."""
        ...

    def subscribe(
        self, prefixes: str | Iterable[str], callback: Callable[[str], None]
    ) -> Callable[[], None]:
        """Deliver URC lines with these prefixes to callback; returns unsubscribe."""
        ...


StatusCallback = Callable[[DataStatus], Awaitable[None]]


def _prefixed(address: str, subnet: str | None) -> str | None:
    """'addr/len' from a granted address and mask; None for an absent or all-zero address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.is_unspecified:
        return None
    full: int = ip.max_prefixlen
    plen = full
    if subnet:
        if subnet.isdigit():
            plen = int(subnet)
        else:
            with contextlib.suppress(ValueError):
                mask = int(ipaddress.ip_address(subnet))
                ones = bin(mask).count("1")
                if ones and mask == ((1 << ones) - 1) << (full - ones):
                    plen = ones
        if not 0 < plen <= full:
            plen = full
    return f"{ip}/{plen}"


def _usable(address: str | None) -> str | None:
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return None if ip.is_unspecified else str(ip)


def grant_from_contrdp(
    rows: list[parsers.ContextParams], cid: int
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(addresses 'a/len', gateways, dns) of context `cid` from AT+CGCONTRDP rows (pure)."""
    addrs: list[str] = []
    gws: list[str] = []
    dns: list[str] = []
    for row in rows:
        if row.cid != cid:
            continue
        if row.local_address and (a := _prefixed(row.local_address, row.subnet)):
            addrs.append(a)
        # A gateway equal to our own address (some modems say so for /32 grants) is no gateway.
        gw = _usable(row.gateway)
        if gw and not (row.local_address and _usable(row.local_address) == gw):
            gws.append(gw)
        for d in (row.dns_primary, row.dns_secondary):
            if (u := _usable(d)) and u not in dns:
                dns.append(u)
    return tuple(addrs), tuple(dict.fromkeys(gws)), tuple(dns)


class DataConnection:
    """One modem's data context, brought up and kept up over its AT channel."""

    def __init__(
        self,
        channel: Channel,
        vendor: VendorProfile,
        *,
        interface: str | None = None,
        cid: int = 1,
        on_change: StatusCallback | None = None,
        poll_interval: float = POLL_INTERVAL,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.channel = channel
        self.vendor = vendor
        self.cid = cid
        self.on_change = on_change
        self.poll_interval = poll_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._rand = rand
        self._status = DataStatus(interface=interface, cid=cid)
        self._profile: DataProfile | None = None
        self._profile_changed = False
        self._wake = asyncio.Event()
        self._lost = False

    @property
    def status(self) -> DataStatus:
        """The latest status (also passed to on_change on every change)."""
        return self._status

    # ----------------------------------------------------------------------- one-shot steps

    async def _cmd(self, command: str, timeout: float = QUERY_TIMEOUT) -> AtResponse:
        return await self.channel.command(command, timeout=timeout)

    async def read_mode(self) -> str | None:
        """The USB network mode (ecm, rndis, ncm, qmi, mbim) or None when it cannot be told."""
        dialect = self.vendor.data
        if dialect.mode_command is None or dialect.mode_prefix is None:
            return dialect.default_mode
        try:
            resp = await self._cmd(dialect.mode_command)
            number = parsers.parse_usb_mode(resp.text, dialect.mode_prefix)
        except (AtError, ParseError) as exc:
            log.info("data.mode_unknown", vendor=self.vendor.name, error=str(exc))
            return dialect.default_mode
        mode = dialect.modes.get(number)
        if mode is None:
            log.info("data.mode_unlisted", vendor=self.vendor.name, number=number)
        return mode

    async def active(self) -> bool:
        """Whether our context is active per AT+CGACT?."""
        resp = await self._cmd("AT+CGACT?")
        try:
            contexts = parsers.parse_cgact_read(resp.text)
        except ParseError:
            return False
        return any(active for c, active in contexts if c == self.cid)

    async def _current_context(self) -> parsers.PdpContext | None:
        resp = await self._cmd("AT+CGDCONT?")
        try:
            contexts = parsers.parse_cgdcont_read(resp.text)
        except ParseError:
            return None
        return next((c for c in contexts if c.cid == self.cid), None)

    async def up(self, profile: DataProfile) -> DataStatus:
        """Bring the context up for `profile` once; DataError (or AtError) when it fails."""
        self._profile = profile
        await self._set(replace(self._status, state=DataState.CONNECTING, reason=None))
        mode = await self.read_mode()
        dialect = self.vendor.data
        if mode in dialect.not_at_modes:
            reason = f"data function needs {(mode or '').upper()}, not AT"
            await self._set(
                replace(self._status, state=DataState.UNSUPPORTED, usb_mode=mode, reason=reason)
            )
            return self._status
        current = await self._current_context()
        if profile.apn == "auto":
            if current is None:
                raise DataError(f"apn = auto, but the modem has no context {self.cid} defined")
            apn, pdp_type = current.apn, parsers.pdp_family(current.pdp_type)
        else:
            apn, pdp_type = profile.apn, profile.pdp_type
            wire = _PDP_WIRE.get(pdp_type, "IP")
            same = (
                current is not None
                and current.apn.lower() == apn.lower()
                and current.pdp_type.upper() == wire
            )
            if not same:
                if await self.active():
                    # A context is re-defined only while inactive (27.007 §10.1.1).
                    await self._deactivate(mode)
                await self._cmd(f'AT+CGDCONT={self.cid},"{wire}","{apn}"')
            if profile.user:
                await self._authenticate(profile)
        if not await self.active():
            await self._cmd(f"AT+CGACT=1,{self.cid}", ACTIVATE_TIMEOUT)
        if mode in dialect.connect_modes and dialect.connect:
            await self._cmd(dialect.connect.format(cid=self.cid), ACTIVATE_TIMEOUT)
        addresses, gateways, dns = await self._read_grant()
        self._lost = False
        await self._set(
            replace(
                self._status,
                state=DataState.UP,
                usb_mode=mode,
                addressing="dhcp" if mode in ROUTER_MODES else "static",
                apn=apn,
                pdp_type=pdp_type,
                addresses=addresses,
                gateways=gateways,
                dns=dns,
                reason=None,
            )
        )
        return self._status

    async def _authenticate(self, profile: DataProfile) -> None:
        """AT+CGAUTH with the credentials; errors never carry the command (it has the password)."""
        command = f'AT+CGAUTH={self.cid},{CGAUTH_PAP},"{profile.user}","{profile.password or ""}"'
        try:
            await self._cmd(command)
        except AtError as exc:
            detail = "timeout" if isinstance(exc, TimeoutError) else getattr(exc, "text", None)
            raise DataError(f"AT+CGAUTH failed ({detail or 'error'})") from None

    async def _read_grant(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """Address, gateway and DNS per AT+CGCONTRDP, else the address per AT+CGPADDR."""
        try:
            resp = await self._cmd(f"AT+CGCONTRDP={self.cid}")
            grant = grant_from_contrdp(parsers.parse_cgcontrdp(resp.text), self.cid)
            if grant[0]:
                return grant
        except (AtError, ParseError) as exc:
            log.info("data.cgcontrdp_unusable", error=str(exc))
        try:
            resp = await self._cmd(f"AT+CGPADDR={self.cid}")
            rows = parsers.parse_cgpaddr(resp.text)
        except (AtError, ParseError) as exc:
            log.info("data.cgpaddr_unusable", error=str(exc))
            return (), (), ()
        addrs = tuple(
            a for c, found in rows if c == self.cid for x in found if (a := _prefixed(x, None))
        )
        return addrs, (), ()

    async def _deactivate(self, mode: str | None) -> None:
        dialect = self.vendor.data
        if mode in dialect.connect_modes and dialect.disconnect:
            with contextlib.suppress(AtError):
                await self._cmd(dialect.disconnect.format(cid=self.cid), DEACTIVATE_TIMEOUT)
        with contextlib.suppress(AtError):
            await self._cmd(f"AT+CGACT=0,{self.cid}", DEACTIVATE_TIMEOUT)

    async def down(self) -> DataStatus:
        """Disconnect and deactivate the context (errors are logged: the goal is 'down')."""
        if self._status.state != DataState.UNSUPPORTED:
            await self._deactivate(self._status.usb_mode)
            await self._set(self._down_status(None))
        return self._status

    # ----------------------------------------------------------------------- keeping it up

    def set_profile(self, profile: DataProfile) -> None:
        """Another eSIM profile is in use (maybe another APN): the keeper re-creates the context.

        Always re-created, even for an equal DataProfile: with `apn = "auto"` the new
        operator's default context is what counts, and the old bearer belongs to the old one.
        """
        self._profile = profile
        self._profile_changed = True
        self._wake.set()

    def context_lost(self) -> None:
        """Evidence from elsewhere (netlink, a probe) that the context went: check it now."""
        self._lost = True
        self._wake.set()

    def _on_cgev(self, line: str) -> None:
        try:
            event = parsers.parse_cgev(line)
        except ParseError:
            log.debug("data.cgev_unreadable", line=line)
            return
        if event.context_lost and event.cid in (None, self.cid):
            log.info("data.context_lost", cgev=event.name, cid=event.cid)
            self._lost = True
            self._wake.set()

    async def run(self, profile: DataProfile) -> None:
        """Bring the context up and keep it up until cancelled; takes it down on the way out."""
        self._profile = profile
        unsubscribe = self.channel.subscribe(("+CGEV",), self._on_cgev)
        try:
            with contextlib.suppress(AtError):
                # Ask for +CGEV URCs (27.007 §10.1.19); modems that refuse still get polled.
                await self._cmd("AT+CGEREP=2,1")
            await self._keep()
        finally:
            unsubscribe()

    async def _keep(self) -> None:
        attempt = 0
        while True:
            profile = self._profile or DataProfile()
            if self._profile_changed and self._status.state == DataState.UP:
                log.info("data.profile_changed", apn=profile.apn)
                await self.down()
            self._profile_changed = False
            if self._status.state != DataState.UP or self._lost:
                try:
                    status = await self.up(profile)
                except (AtError, DataError) as exc:
                    await self._set(self._down_status(str(exc)))
                    delay = backoff_delay(
                        attempt, self.backoff_initial, self.backoff_max, self._rand
                    )
                    attempt += 1
                    log.info("data.retry", attempt=attempt, delay=round(delay, 2), error=str(exc))
                    await self._sleep(delay)
                    continue
                attempt = 0
                if status.state == DataState.UNSUPPORTED:
                    # Nothing to keep over AT; wait for another profile (maybe another mode).
                    await self._sleep(None)
                    continue
            await self._sleep(self.poll_interval)
            if self._profile_changed:
                continue
            try:
                still = await self.active()
            except AtError as exc:
                log.info("data.check_failed", error=str(exc))
                continue
            if not still:
                log.info("data.context_down", cid=self.cid)
                await self._set(self._down_status("context deactivated"))

    async def _sleep(self, seconds: float | None) -> None:
        """Wait `seconds` (None: forever) or until woken by a URC or a profile change."""
        if not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._wake.wait()
        self._wake.clear()
        if self._lost and self._status.state == DataState.UP:
            await self._set(self._down_status("context deactivated by the network"))

    def _down_status(self, reason: str | None) -> DataStatus:
        return replace(
            self._status,
            state=DataState.DOWN,
            addresses=(),
            gateways=(),
            dns=(),
            reason=reason,
        )

    async def _set(self, status: DataStatus) -> None:
        if status == self._status:
            return
        old = self._status
        self._status = status
        if old.state != status.state:
            log.info(
                "data.state",
                old=str(old.state),
                new=str(status.state),
                apn=status.apn,
                reason=status.reason,
            )
        if self.on_change is not None:
            await self.on_change(status)
