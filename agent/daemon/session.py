"""One modem as the daemon owns it: its port, its polls, its eUICC, its reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import structlog

from agent.at.channel import AtChannel
from agent.backoff import Backoff
from agent.config import ModemConfig
from agent.daemon.follow import FollowingModem
from agent.errors import AgentError, AtError, AtTimeout, PortGoneError
from agent.euicc.es10 import ProfileInfo
from agent.euicc.lpa import Lpa
from agent.euicc.switch import RefreshStrategy, SafeSwitch, SwitchReport
from agent.euicc.transport import MODE_CGLA, MODE_CSIM, AtApduTransport
from agent.health.layer import ModemSignals, signals_from_modem_info
from agent.models import ModemInfo
from agent.modem.counters import Counters, read_counters
from agent.modem.driver import Modem
from agent.modem.finder import Finder, Identity, spec_for
from agent.modem.vendors import vendor_by_name
from agent.transport.discovery import ModemDevice
from agent.transport.modemmanager import ModemManagerError, inhibited

log = structlog.get_logger(__name__)

RECONNECT_INITIAL_S = 0.5
RECONNECT_MAX_S = 30.0
EUICC_REREAD_TRIES = 6
EUICC_REREAD_DELAY_S = 0.25
_APDU_MODES = {"auto": None, "ccho": MODE_CGLA, "cgla": MODE_CGLA, "csim": MODE_CSIM}


class ModemSession:
    """Owns one modem's port for the daemon's lifetime: connect, poll, reconnect, eUICC work."""

    def __init__(
        self,
        cfg: ModemConfig,
        *,
        state_dir: Path,
        on_update: Callable[[ModemSession], None],
        rollback_timeout: float = 120.0,
        on_poll: Callable[[ModemSession], Awaitable[None]] | None = None,
        finder: Finder | None = None,
        dbus_address: str | None = None,
    ) -> None:
        self.cfg = cfg
        #: Discovery: where `usb` and `imei` entries are found and replugs are noticed.
        self.finder = finder
        #: The udev device the port belongs to (None for a path udev does not know, e.g. a pty).
        self.device: ModemDevice | None = None
        #: The modem's network interface (wwan0, usb0, enx...), when discovery found one.
        self.netdev: str | None = None
        self.dbus_address = dbus_address
        self._generation_seen: int | None = None
        self.id = cfg.id
        self.state_dir = state_dir
        self._on_update = on_update
        self.rollback_timeout = rollback_timeout
        self.modem: Modem | None = None
        self.port: str | None = cfg.port
        self.online = False
        self.info: ModemInfo | None = None
        self.data_active: bool | None = None
        self.profiles: list[ProfileInfo] = []
        self.eid: str | None = None
        self.last_error: str | None = None
        self.switching = False
        self.counters: Counters | None = None
        #: Set when the modem's byte counters restarted (boot URC, profile switch).
        self.counters_reset = False
        self._on_poll = on_poll
        #: Serialises multi-command work (eUICC sessions, switches, polls) on this modem.
        self.lock = asyncio.Lock()
        self.connected = asyncio.Event()
        #: Set once the first connection attempt ended either way: an absent modem must not
        #: hold the daemon's start for the others.
        self.attempted = asyncio.Event()
        self.ever_online = False
        #: Monotonic time the run loop last made progress (the watchdog checks it).
        self.last_tick = time.monotonic()
        self._poll_now = asyncio.Event()
        self._log = log.bind(modem=cfg.id)
        self._unwatch = finder.on_port_removed(self._on_port_removed) if finder else None

    # ---- state views ---------------------------------------------------------------------

    @property
    def enabled_iccid(self) -> str | None:
        """ICCID of the enabled profile as the eUICC last reported it."""
        return next((p.iccid for p in self.profiles if p.state == "enabled"), None)

    def signals(self) -> ModemSignals | None:
        """What the health rules need from the modem; None while never read."""
        if not self.online or self.info is None:
            return ModemSignals(sim_ready=False) if self.info is not None else None
        return signals_from_modem_info(self.info, self.data_active)

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, poll until the port goes, reconnect with backoff; runs until cancelled."""
        backoff = Backoff(RECONNECT_INITIAL_S, RECONNECT_MAX_S)
        while True:
            self.last_tick = time.monotonic()
            try:
                await self._connect()
                backoff.reset()
                await self._poll_loop()
            except (PortGoneError, AtTimeout) as exc:
                self._went_offline(str(exc))
            except AgentError as exc:
                self._went_offline(f"{type(exc).__name__}: {exc}")
            finally:
                await self._close_modem()
            await self._wait_retry(backoff.next())

    async def _wait_retry(self, delay: float) -> None:
        """Back off before the next connect; a device event (a replug) ends the wait early."""
        if self.finder is None:
            await asyncio.sleep(delay)
        else:
            await self.finder.wait_change(delay, since=self._generation_seen)

    def _on_port_removed(self, devnode: str) -> None:
        # udev saw the device go: fail what is in flight now rather than after its timeout
        port, modem = self.port, self.modem
        if port is None or modem is None:
            return
        if devnode in (port, os.path.realpath(port)):
            self._log.warning("modem_port_removed", port=port)
            modem.channel.mark_gone("device removed")

    def _went_offline(self, reason: str) -> None:
        if self.online or self.last_error != reason:
            self._log.warning("modem_offline", port=self.port, reason=reason)
        self.online = False
        self.connected.clear()
        self.last_error = reason
        self.attempted.set()
        self._on_update(self)

    async def _close_modem(self) -> None:
        modem, self.modem = self.modem, None
        if modem is not None:
            await modem.close()

    async def locate(self) -> str:
        """The tty to open now: the configured path, or where discovery finds the usb/imei entry."""
        if self.finder is None:
            if self.cfg.port:
                return self.cfg.port
            raise PortGoneError(self.id, "finding a modem by usb or imei needs discovery")
        # device changes from here on wake the next retry, even those during this attempt
        self._generation_seen = self.finder.generation
        found = await self.finder.locate(spec_for(self.cfg))
        self.device, self.netdev = found.device, found.netdev
        return found.port

    async def _connect(self) -> None:
        port = await self.locate()
        self.port = port
        channel = await AtChannel.open(port)
        vendor = vendor_by_name(self.cfg.vendor) if self.cfg.vendor != "auto" else None
        self.modem = Modem(channel, vendor)
        channel.subscribe("RDY", self._on_boot)
        await self.modem.probe()
        ident = await self.modem.identity()
        if self.finder is not None:
            self.finder.note_identity(
                port, Identity(imei=ident.imei, manufacturer=ident.manufacturer, model=ident.model)
            )
        if self.cfg.imei and ident.imei != self.cfg.imei:
            raise PortGoneError(port, f"modem on this port is not IMEI {self.cfg.imei}")
        if await self.modem.cfun() in (0, 4):
            # Left with its radio off (a run killed in the middle of a CFUN cycle, or by hand):
            # a modem the daemon owns starts on; the policy turns radios off when it wants to.
            self._log.warning("modem_radio_was_off", port=port)
            await self.modem.set_cfun(1)
        self.online = True
        self.last_error = None
        self._log.info("modem_online", port=port, vendor=self.modem.vendor.name, netdev=self.netdev)
        if self.switching:
            # Back after a re-enumeration inside a switch: the switch holds the lock, follows
            # the modem here (FollowingModem) and reads the eUICC itself when it is done.
            self.connected.set()
            self._on_update(self)
            return
        async with self.lock:
            await self._read_euicc()
            await self._read_state()
        self.ever_online = True
        self.connected.set()
        self.attempted.set()
        self._on_update(self)

    async def _poll_loop(self) -> None:
        modem = self.modem
        assert modem is not None
        lost = asyncio.create_task(modem.channel.lost_event.wait(), name=f"{self.id}-lost")
        try:
            while True:
                self.last_tick = time.monotonic()
                self._poll_now.clear()
                waiters = {
                    lost,
                    asyncio.create_task(self._poll_now.wait()),
                    asyncio.create_task(modem.registration_changed.wait()),
                }
                await asyncio.wait(
                    waiters, timeout=self.cfg.poll_interval, return_when=asyncio.FIRST_COMPLETED
                )
                for w in waiters - {lost}:
                    w.cancel()
                # Consumed here, or a single registration URC would wake this loop at once on
                # every turn from then on: back-to-back polls, and a busy loop while switching.
                modem.registration_changed.clear()
                if (gone := modem.channel.lost) is not None:
                    raise gone
                if self.switching:
                    continue  # the switch reads what it needs; polls would only slow it
                async with self.lock:
                    await self._read_state()
                if modem.channel.needs_reprobe:
                    raise AtTimeout(f"{self.port}: modem stopped answering", "AT")
                self._on_update(self)
                if self._on_poll is not None:
                    await self._on_poll(self)
        finally:
            lost.cancel()

    def _on_boot(self, _line: str) -> None:
        self.counters_reset = True

    def poll_soon(self) -> None:
        """Ask for a poll now instead of at the next interval."""
        self._poll_now.set()

    async def _read_state(self) -> None:
        modem = self.modem
        if modem is None:
            raise PortGoneError(self.port or "?", "not connected")
        self.info = await modem.info()
        self.data_active = await modem.data_active()
        self.counters = await read_counters(modem.channel, modem.vendor.name)
        if self.info.registration.state in ("home", "roaming") and self.data_active is False:
            # Like a connection manager with autoconnect: a registered modem gets its context.
            try:
                await modem.activate_data()
                self.data_active = await modem.data_active()
            except AtError as exc:
                self._log.warning("data_activate_failed", error=str(exc))

    async def _read_euicc(self) -> bool:
        try:
            async with self.lpa() as lpa:
                if self.eid is None:
                    self.eid = await lpa.get_eid()
                self.profiles = await lpa.list_profiles()
        except (PortGoneError, AtTimeout):
            raise
        except AgentError as exc:
            # A plain SIM or a modem without APDU access still gives us a working modem.
            self._log.info("euicc_unavailable", error=str(exc))
            return False
        return True

    async def _read_euicc_after_switch(self, report: SwitchReport) -> None:
        # Right after a REFRESH or CFUN cycle the SIM is busy for a while (+CME ERROR: 14):
        # a stale list here would make the daemon believe the old profile still runs.
        for attempt in range(EUICC_REREAD_TRIES):
            if await self._read_euicc():
                return
            await asyncio.sleep(EUICC_REREAD_DELAY_S * (attempt + 1))
        running = report.to_iccid if report.outcome == "switched" else report.from_iccid
        self._log.warning("euicc_list_stale", assumed_enabled=running)
        for p in self.profiles:
            p.state = "enabled" if p.iccid == running else "disabled"

    @contextlib.asynccontextmanager
    async def modemmanager_off(self) -> AsyncIterator[None]:
        """With `share_with_modemmanager`: ModemManager inhibited on this modem for the block.

        Without ModemManager (or without a udev device to name) there is nothing to inhibit and
        the block runs as it is: the eUICC work matters more than the courtesy.
        """
        async with contextlib.AsyncExitStack() as stack:
            if self.cfg.share_with_modemmanager:
                if self.device is None:
                    self._log.warning("modemmanager_inhibit_skipped", reason="no udev device")
                else:
                    try:
                        await stack.enter_async_context(
                            inhibited(self.device.uid, bus_address=self.dbus_address)
                        )
                    except (ModemManagerError, OSError, TimeoutError) as exc:
                        self._log.warning("modemmanager_inhibit_failed", error=str(exc))
            yield

    # ---- eUICC ---------------------------------------------------------------------------

    def lpa(self) -> Lpa:
        """A fresh LPA on this modem's ISD-R channel (use `async with`)."""
        modem = self._require()
        transport = AtApduTransport(
            modem.channel,
            modem.port,
            aid=bytes.fromhex(self.cfg.isdr_aid),
            mode=_APDU_MODES.get(self.cfg.apdu),
            state_dir=self.state_dir,
        )
        return Lpa(transport)

    def refresh_strategy(self) -> RefreshStrategy:
        """The configured refresh strategy, or the vendor's."""
        name: str = self.cfg.refresh
        if name == "auto":
            name = self._require().vendor.refresh
        return RefreshStrategy.from_vendor(name)

    def _require(self) -> Modem:
        if self.modem is None or not self.online:
            raise PortGoneError(self.port or self.id, "modem is offline")
        return self.modem

    async def refresh_profiles(self) -> list[ProfileInfo]:
        """Read the profile list again (after any change)."""
        async with self.lock:
            await self._read_euicc()
        self._on_update(self)
        return self.profiles

    async def safe_switch(
        self, iccid: str, probe: Callable[[], Awaitable[bool]] | None
    ) -> SwitchReport:
        """Enable iccid with verification and automatic rollback (see agent.euicc.switch)."""
        modem = self._require()
        if self.enabled_iccid == iccid:
            # Nothing to switch: a refresh or CFUN cycle here would only drop a working link.
            return SwitchReport(outcome="switched", from_iccid=iccid, to_iccid=iccid)
        self.switching = True
        try:
            async with self.lock, self.modemmanager_off():
                switch = SafeSwitch(
                    FollowingModem(self, modem, self.rollback_timeout),
                    self.lpa,
                    strategy=self.refresh_strategy(),
                    rollback_timeout=self.rollback_timeout,
                    probe=probe,
                )
                report = await switch.run(iccid)
                self.counters_reset = True
                await self._read_euicc_after_switch(report)
                with contextlib.suppress(AtError):
                    await self._read_state()
        finally:
            self.switching = False
        self._on_update(self)
        return report

    async def fresh_counters(self) -> None:
        """Read the byte counters now (before a switch resets them)."""
        modem = self._require()
        async with self.lock:
            self.counters = await read_counters(modem.channel, modem.vendor.name)

    async def with_lpa(self, op: Callable[[Lpa], Awaitable[object]]) -> object:
        """Run one eUICC operation under the modem lock, then re-read the profile list."""
        self._require()
        async with self.lock, self.modemmanager_off():
            async with self.lpa() as lpa:
                result = await op(lpa)
            await self._read_euicc()
        self._on_update(self)
        return result

    async def radio(self, on: bool) -> None:
        """Radio on (CFUN=1) or off (CFUN=4, airplane: the SIM stays readable)."""
        modem = self._require()
        async with self.lock:
            await modem.set_cfun(1 if on else 4)
        self.poll_soon()

    async def wait_online(self, timeout: float) -> bool:
        """Wait until connected, up to timeout; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
        except TimeoutError:
            return False
        return True

    def summary(self) -> dict[str, object]:
        """A JSON-ready view for `status`."""
        return {
            "id": self.id,
            "port": self.port,
            "netdev": self.netdev,
            "online": self.online,
            "eid": self.eid,
            "enabled_iccid": self.enabled_iccid,
            "switching": self.switching,
            "last_error": self.last_error,
            "updated": time.time(),
        }
