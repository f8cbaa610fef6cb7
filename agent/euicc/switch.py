"""Safe profile switch: enable, let the modem re-attach, verify, and roll back on its own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from enum import StrEnum
from typing import Protocol

import msgspec
import structlog

from agent.errors import AgentError, Es10Error
from agent.euicc.iccid import normalize_iccid
from agent.euicc.lpa import Lpa
from agent.models import Registration

log = structlog.get_logger(__name__)

REGISTERED = ("home", "roaming")
BOOT_URCS = ("RDY", "+CFUN", "+CPIN", "^SYSSTART", "^BOOT", "*EMRDY", "+PACSP")
ROLLBACK_TIMEOUT_S = 120.0
POLL_S = 0.5


class RefreshStrategy(StrEnum):
    """What the modem needs after EnableProfile to run on the new profile."""

    NONE = "none"  # no refresh flag, nothing done: the modem takes it at its next restart
    REFRESH = "refresh"  # refresh flag; the modem re-reads the card on the eUICC's REFRESH
    CFUN = "cfun"  # refresh flag, then AT+CFUN=0 / AT+CFUN=1
    RESET = "reset"  # refresh flag, then AT+CFUN=1,1

    @classmethod
    def from_vendor(cls, name: str) -> RefreshStrategy:
        """Map a vendor profile's refresh field (auto/cfun/reset/none/refresh) to a strategy."""
        return cls.REFRESH if name in ("auto", "") else cls(name)


class UrcSource(Protocol):
    """The URC side of agent.at.channel.AtChannel."""

    def subscribe(
        self, prefixes: str | Iterable[str], callback: Callable[[str], None]
    ) -> Callable[[], None]:
        """Call callback for each URC line with one of prefixes; returns an unsubscribe."""
        ...


class SwitchModem(Protocol):
    """What the switch needs from agent.modem.driver.Modem."""

    @property
    def channel(self) -> UrcSource:
        """The AT channel (for boot URCs after a reset)."""
        ...

    async def probe(self) -> None:
        """Wait until the modem answers and re-apply the session settings."""
        ...

    async def read_iccid(self) -> str | None:
        """ICCID of the running profile."""
        ...

    async def registration(self) -> Registration:
        """Current registration."""
        ...

    async def set_cfun(self, fun: int, *, reset: bool = False) -> None:
        """AT+CFUN."""
        ...


class SwitchPhases(msgspec.Struct, kw_only=True):
    """Milliseconds spent in each phase; null for a phase that did not run."""

    enable: float | None = None
    refresh: float | None = None
    reattach: float | None = None
    verify: float | None = None
    rollback: float | None = None


class SwitchReport(msgspec.Struct, kw_only=True):
    """Outcome of a safe switch: switched, rolled_back, or failed (previous profile restored)."""

    outcome: str
    from_iccid: str | None
    to_iccid: str
    phases: SwitchPhases = msgspec.field(default_factory=SwitchPhases)
    error: str | None = None
    total_ms: float = 0.0
    # What the card had enabled when it was read again after a failed attempt (None: not read,
    # or no profile enabled).
    enabled_iccid: str | None = None


class SwitchError(AgentError):
    """A phase of the switch did not complete; the message names it."""


async def kick_modem(
    modem: SwitchModem, strategy: RefreshStrategy, reset_settle_s: float = 10.0
) -> None:
    """Make the modem take a newly enabled profile the way its vendor needs (after EnableProfile).

    REFRESH and NONE need nothing here: the eUICC's REFRESH (or the next restart) does it.
    """
    if strategy is RefreshStrategy.CFUN:
        await modem.set_cfun(0)
        await modem.set_cfun(1)
    elif strategy is RefreshStrategy.RESET:
        booted = asyncio.Event()
        unsubscribe = modem.channel.subscribe(BOOT_URCS, lambda _line: booted.set())
        try:
            await modem.set_cfun(1, reset=True)
            # Commands sent while the modem reboots are lost; its boot URCs say it is back.
            # Some modems announce nothing: probe() then waits for AT to answer.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(reset_settle_s):
                    await booted.wait()
        finally:
            unsubscribe()
        await modem.probe()


LpaFactory = Callable[[], Lpa]
Probe = Callable[[], Awaitable[bool]]


def _describe(exc: BaseException) -> str:
    """Our errors carry their own message; anything else is named by its type too."""
    if isinstance(exc, AgentError | TimeoutError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _log_foreign(exc: BaseException, phase: str) -> None:
    """A failure that is not one of the agent's own errors is a bug somewhere: keep its trace."""
    if not isinstance(exc, AgentError | TimeoutError):
        log.error("euicc_switch_unexpected_error", phase=phase, exc_info=exc)


def _ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000.0, 3)


class SafeSwitch:
    """One switch attempt on one modem; run() never leaves a working eUICC with no profile."""

    def __init__(
        self,
        modem: SwitchModem,
        lpa_factory: LpaFactory,
        *,
        strategy: RefreshStrategy = RefreshStrategy.REFRESH,
        rollback_timeout: float = ROLLBACK_TIMEOUT_S,
        probe: Probe | None = None,
        poll_s: float = POLL_S,
        reset_settle_s: float = 10.0,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        self.modem = modem
        self.lpa_factory = lpa_factory
        self.strategy = strategy
        self.rollback_timeout = rollback_timeout
        self.probe = probe
        self.poll_s = poll_s
        self.reset_settle_s = reset_settle_s
        self.on_phase = on_phase
        self._phase = "enable"
        self._iccid_readable = True

    async def run(self, to_iccid: str) -> SwitchReport:
        """Switch to to_iccid, verify, and roll back to the previous profile on failure."""
        started = time.monotonic()
        target = normalize_iccid(to_iccid)
        async with self.lpa_factory() as lpa:
            profiles = await lpa.list_profiles()
        previous = next((p.iccid for p in profiles if p.state == "enabled"), None)
        # A modem that cannot report the ICCID at all is verified by registration and probe only.
        self._iccid_readable = await self.modem.read_iccid() is not None
        if not self._iccid_readable:
            log.warning("euicc_switch_iccid_unverifiable", to_iccid=target)
        report = SwitchReport(outcome="failed", from_iccid=previous, to_iccid=target)
        log.info("euicc_switch_start", from_iccid=previous, to_iccid=target, strategy=self.strategy)
        try:
            if not any(p.iccid == target for p in profiles):
                raise Es10Error("EnableProfile", 1, "iccidOrAidNotFound")
            self._enter("enable")
            await self._enable_phase(target, report)
        except Exception as exc:
            # Any failure, ours or not (a probe's bug, a decoder's ValueError): the enable may
            # have half-happened (a lost reply), so make sure the old profile runs.
            report.error = f"enable: {_describe(exc)}"
            _log_foreign(exc, "enable")
            await self._restore(previous, report)
            report.outcome = "failed"
            return await self._reread(report, started)
        try:
            async with asyncio.timeout(self.rollback_timeout):
                await self._attach_phases(target, report)
        except Exception as exc:
            report.error = (
                _describe(exc)
                or f"{self._phase}: no working link on {target} within {self.rollback_timeout:g} s"
            )
            _log_foreign(exc, self._phase)
            log.warning("euicc_switch_rollback", to_iccid=target, error=report.error)
            restored = await self._restore(previous, report)
            report.outcome = "rolled_back" if restored else "failed"
            return await self._reread(report, started)
        report.outcome = "switched"
        return self._done(report, started)

    async def _reread(self, report: SwitchReport, started: float) -> SwitchReport:
        """After a failure, report what the card really runs, not what the switch meant to do."""
        try:
            async with asyncio.timeout(self.rollback_timeout):
                async with self.lpa_factory() as lpa:
                    profiles = await lpa.list_profiles()
        except Exception as exc:
            log.warning("euicc_switch_reread_failed", error=_describe(exc))
            report.error = f"{report.error}; card not re-read: {_describe(exc)}"
            return self._done(report, started)
        enabled = next((p.iccid for p in profiles if p.state == "enabled"), None)
        report.enabled_iccid = enabled
        if enabled != report.from_iccid and report.outcome == "rolled_back":
            report.outcome = "failed"
        return self._done(report, started)

    def _enter(self, phase: str) -> None:
        # Progress for a person watching (the CLI's spinner); the report keeps the timings.
        self._phase = phase
        if self.on_phase is not None:
            self.on_phase(phase)

    def _done(self, report: SwitchReport, started: float) -> SwitchReport:
        report.total_ms = _ms(started)
        log.info(
            "euicc_switch_done",
            outcome=report.outcome,
            from_iccid=report.from_iccid,
            to_iccid=report.to_iccid,
            error=report.error,
            total_ms=report.total_ms,
        )
        return report

    async def _enable_phase(self, target: str, report: SwitchReport) -> None:
        t = time.monotonic()
        async with self.lpa_factory() as lpa:
            await lpa.enable_profile(target, refresh=self.strategy is not RefreshStrategy.NONE)
        report.phases.enable = _ms(t)

    async def _kick_modem(self) -> None:
        await kick_modem(self.modem, self.strategy, self.reset_settle_s)

    async def _wait_iccid(self, iccid: str) -> None:
        while self._iccid_readable:
            if await self.modem.read_iccid() == iccid:
                return
            await asyncio.sleep(self.poll_s)

    async def _wait_registered(self) -> Registration:
        while True:
            reg = await self.modem.registration()
            if reg.state in REGISTERED:
                return reg
            if reg.state == "denied":
                raise SwitchError(f"registration denied on the new profile ({reg.act})")
            await asyncio.sleep(self.poll_s)

    async def _attach_phases(self, target: str, report: SwitchReport) -> None:
        t = time.monotonic()
        self._enter("refresh")
        await self._kick_modem()
        await self._wait_iccid(target)
        report.phases.refresh = _ms(t)
        t = time.monotonic()
        self._enter("reattach")
        await self._wait_registered()
        report.phases.reattach = _ms(t)
        t = time.monotonic()
        self._enter("verify")
        if self._iccid_readable and await self.modem.read_iccid() != target:
            raise SwitchError("verify: the modem runs another profile than the one enabled")
        if self.probe is not None and not await self.probe():
            raise SwitchError("verify: data-path probe failed")
        report.phases.verify = _ms(t)

    async def _restore(self, previous: str | None, report: SwitchReport) -> bool:
        """Re-enable previous and wait until it is registered; True when it works again."""
        if previous is None:
            return False
        self._enter("rollback")
        t = time.monotonic()
        try:
            async with asyncio.timeout(self.rollback_timeout):
                changed = False
                for attempt in range(3):
                    try:
                        async with self.lpa_factory() as lpa:
                            changed = await lpa.enable_profile(previous, refresh=True)
                        break
                    except Exception as exc:
                        log.warning("euicc_rollback_enable_retry", attempt=attempt, error=str(exc))
                        await asyncio.sleep(self.poll_s)
                else:
                    return False
                if changed:
                    await self._kick_modem()
                await self._wait_iccid(previous)
                await self._wait_registered()
            return True
        except Exception as exc:
            log.error("euicc_rollback_failed", previous=previous, error=_describe(exc))
            report.error = f"{report.error}; rollback: {_describe(exc) or 'timed out'}"
            return False
        finally:
            report.phases.rollback = _ms(t)
