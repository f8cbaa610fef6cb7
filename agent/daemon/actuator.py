"""Carries out the policy's actions on the modems: activate a layer, restore after an
emergency, radios on and off; and the safe switches the commands and the recovery ask for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from agent.daemon.session import ModemSession
from agent.errors import AgentError
from agent.euicc.lpa import Lpa
from agent.euicc.switch import SwitchReport
from agent.health.monitor import LayerMonitor
from agent.policy.engine import (
    Action,
    ActivateLayer,
    DisableEmergency,
    EmitEvent,
    EnableEmergency,
    RadioDown,
    RadioUp,
    SleepLayer,
    SwitchDone,
)

if TYPE_CHECKING:
    from agent.daemon.app import Daemon

log = structlog.get_logger(__name__)

VERIFY_INTERVAL_S = 0.3
#: How long an activation waits for a modem that is reconnecting (e.g. after its own switch).
OFFLINE_GRACE_S = 10.0


class Actuator:
    """One per daemon; every job it starts is tracked so shutdown can end them."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._jobs: set[asyncio.Task[Any]] = set()

    # ---- jobs ----------------------------------------------------------------------------

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> None:
        """Run coro as a tracked job; a failure is one log line (a traceback only for bugs)."""
        task = asyncio.create_task(coro, name=name)
        self._jobs.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._jobs.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if isinstance(exc, AgentError):
                log.error("job_failed", job=name, error=f"{type(exc).__name__}: {exc}")
            elif exc is not None:
                log.error("job_failed", job=name, error=repr(exc), exc_info=exc)

        task.add_done_callback(done)

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job and wait for them (bounded)."""
        for job in list(self._jobs):
            job.cancel()
        if self._jobs:
            await asyncio.wait(self._jobs, timeout=timeout)

    # ---- the policy's actions ------------------------------------------------------------

    def execute(self, action: Action) -> None:
        """Start carrying out one action (never blocks the policy loop)."""
        d = self.d
        if isinstance(action, EmitEvent):
            d.timeline.record(action.event)
        elif isinstance(action, ActivateLayer) and action.device is not None:
            self.spawn(f"activate-{action.layer}", self.activate_sibling(action))
        elif isinstance(action, ActivateLayer):
            self.spawn(f"activate-{action.layer}", self.activate(action))
        elif isinstance(action, SleepLayer):
            self.spawn(f"sleep-{action.layer}", self.sleep_layer(action.layer))
        elif isinstance(action, EnableEmergency):
            log.warning("emergency_enabling", layer=action.layer)
        elif isinstance(action, DisableEmergency):
            self.spawn(f"disable-emergency-{action.layer}", self.disable_emergency(action.layer))
        elif isinstance(action, RadioUp | RadioDown):
            session = d.sessions.get(action.modem)
            if session is not None:
                self.spawn(
                    f"radio-{action.modem}", self.radio(session, isinstance(action, RadioUp))
                )

    async def radio(self, session: ModemSession, on: bool) -> None:
        """Radio on or off; an absent modem has no radio to turn, and that is no failure."""
        try:
            await session.radio(on)
        except AgentError as exc:
            log.warning("radio_change_failed", modem=session.id, on=on, error=str(exc))

    def probe_fn(self, profile: str) -> Callable[[], Awaitable[bool]] | None:
        """A one-shot data-path check for the layer that runs profile (any probe passing)."""
        d = self.d
        layer = next((x for x in d.cfg.layers if x.profile == profile), None)
        if layer is None or not d.layer_probes.get(layer.name):
            return None
        probes = [p for _, p, _ in d.layer_probes[layer.name]]

        async def probe() -> bool:
            results = await asyncio.gather(*(p.run() for p in probes))
            return any(r.ok for r in results)

        return probe

    def switch_probe(
        self, session: ModemSession, profile: str
    ) -> Callable[[], Awaitable[bool]] | None:
        """probe_fn, and with a data path the new profile's context brought up first."""
        check = self.probe_fn(profile)
        if self.d.datalinks is None:
            return check
        return self.d.datalinks.switch_probe(session.id, profile, check)

    async def activate(self, action: ActivateLayer) -> None:
        """Carry out an ActivateLayer; always answers the policy with exactly one SwitchDone."""
        d = self.d
        ok, reason, timings = False, "", {}
        held: list[LayerMonitor] = []
        switched = False
        try:
            layer = d.cfg.layer(action.layer)
            session = d.sessions[layer.modem]
            monitor = d.monitors[layer.name]
            deadline = time.monotonic() + d.cfg.timers.switch_timeout
            held = self.hold(layer.modem)
            if not session.online and session.attempted.is_set() and not session.ever_online:
                # Never seen since start: an absent modem, not one coming back from a switch.
                raise AgentError(f"modem {session.id} is absent: {session.last_error}")
            if not await session.wait_online(OFFLINE_GRACE_S):
                raise AgentError(f"modem {session.id} is offline")
            if session.enabled_iccid != layer.profile:
                await d.before_switch(session)
                report = await session.safe_switch(
                    layer.profile, self.switch_probe(session, layer.profile)
                )
                switched = True
                if d.datalinks is not None:
                    d.datalinks.switched(session)
                log.info(
                    "layer_switch_report",
                    layer=layer.name,
                    outcome=report.outcome,
                    phases=msgspec.to_builtins(report.phases),
                    error=report.error,
                )
                if report.outcome != "switched":
                    reason = f"{report.outcome}: {report.error}"
                    return
                monitor.clear()  # its history is of the link before the switch
            timings["switched_at"] = time.monotonic()
            while True:
                health = await monitor.check_once()
                if health.state in ("up", "degraded"):
                    ok = True
                    if d.datalinks is not None:
                        # Verified over its own link: now traffic follows it.
                        await d.datalinks.set_active(layer.name)
                    break
                if time.monotonic() >= deadline:
                    reason = f"not verified: {health.reason}"
                    break
                await asyncio.sleep(VERIFY_INTERVAL_S)
            timings["verified_at"] = time.monotonic()
        except (AgentError, KeyError) as exc:
            # KeyError: a reload removed the layer or its modem while the switch ran.
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("layer_switch_failed", layer=action.layer, error=reason)
        finally:
            for m in held:
                m.resume(reset=switched)
            d.post(
                SwitchDone(
                    layer=action.layer, ok=ok, now=time.monotonic(), reason=reason, timings=timings
                )
            )
            self.refeed(action.modem)

    def hold(self, modem: str) -> list[LayerMonitor]:
        """Pause health reports of every layer on a modem (its link is about to change)."""
        d = self.d
        held = [
            d.monitors[x.name] for x in d.cfg.layers if x.modem == modem and x.name in d.monitors
        ]
        for m in held:
            m.pause()
        return held

    def refeed(self, modem: str) -> None:
        """Report the layers on a modem to the policy again (their profile may have changed)."""
        for x in self.d.cfg.layers:
            if x.modem == modem:
                self.d.feed(x.name)

    async def switch_modem(self, session: ModemSession, iccid: str) -> SwitchReport:
        """A safe switch outside the policy's own activations: health reports on that modem
        are held while it runs, so the policy does not chase the switch's own outage. A modem
        that goes away in the middle ends it with outcome "failed" and the reason."""
        held = self.hold(session.id)
        try:
            if session.enabled_iccid != iccid:
                await self.d.before_switch(session)
            report = await session.safe_switch(iccid, self.switch_probe(session, iccid))
            if self.d.datalinks is not None:
                self.d.datalinks.switched(session)
            return report
        except AgentError as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("profile_switch_interrupted", modem=session.id, to=iccid, error=error)
            return SwitchReport(
                outcome="failed", from_iccid=session.enabled_iccid, to_iccid=iccid, error=error
            )
        finally:
            for m in held:
                m.resume(reset=True)
            self.refeed(session.id)

    async def disable_emergency(self, name: str) -> None:
        """Back from the emergency profile to the modem's home profile (or none at all when
        the modem carries no other layer, e.g. a tablet holding only the group emergency)."""
        d = self.d
        layer = d.cfg.layer(name)
        session = d.sessions.get(layer.modem)
        home = d.home_profile(layer.modem)
        if session is None or session.enabled_iccid != layer.profile:
            return
        if home is None:
            await self.sleep_layer(name)
            d.publisher.event("emergency_disabled", {"layer": name, "restored": None})
            return
        log.info("emergency_disabling", layer=name, restore_to=home)
        report = await self.switch_modem(session, home)
        event = {"layer": name, "restored": home, "outcome": report.outcome, "error": report.error}
        log.info("emergency_disabled", **event)
        d.publisher.event("emergency_disabled", event)

    # ---- sibling layers and companion mode (docs/siblings.md) -----------------------------

    async def activate_sibling(self, action: ActivateLayer) -> None:
        """A sibling layer: no modem work. Verified by the sibling side's verdict (and our own
        probe through its `interface`, when it has probes); traffic then follows its link.
        Our own companion profiles go to sleep once it carries us. Always one SwitchDone."""
        d = self.d
        ok, reason, timings = False, "", {}
        try:
            layer = d.cfg.layer(action.layer)
            timings["switched_at"] = time.monotonic()
            monitor = d.siblings.monitors.get(layer.name)
            if monitor is not None:
                health = await monitor.check_once()
                if health.state not in ("up", "degraded"):
                    raise AgentError(f"own probe through {layer.interface}: {health.reason}")
            elif not d.siblings.usable(layer.name):
                raise AgentError(f"sibling {layer.device} is not usable")
            if d.datalinks is not None and layer.interface is not None:
                await d.datalinks.set_sibling_active(layer.name, layer.interface)
            ok = True
            timings["verified_at"] = time.monotonic()
        except (AgentError, KeyError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("layer_switch_failed", layer=action.layer, error=reason)
        finally:
            d.post(
                SwitchDone(
                    layer=action.layer, ok=ok, now=time.monotonic(), reason=reason, timings=timings
                )
            )
        if ok:
            await self.sleep_companions()

    async def sleep_companions(self) -> None:
        """Our own profiles sleep while a sibling carries us (also the ones found enabled at
        start: the policy never activated them, so it asks for no SleepLayer)."""
        d = self.d
        if d.policy is None:
            return
        for spec in d.policy.config.layers:
            if spec.companion and spec.name != d.policy.active:
                await self.sleep_layer(spec.name)

    async def sleep_modem_emergency(self, modem: str, enabled: str | None) -> None:
        """At start, an emergency profile left enabled (a crash or stop while awake) on a modem
        that carries no other layer goes back to sleep: the policy (and for a group, the
        claim) wakes it again if it is still needed."""
        for layer in self.d.cfg.layers:
            if layer.modem == modem and layer.role == "emergency" and layer.profile == enabled:
                log.warning("euicc_recovering", modem=modem, enabled=enabled, restore_to=None)
                await self.sleep_layer(layer.name)

    async def sleep_layer(self, name: str) -> None:
        """Put one of our own layers to sleep: radio off when `radio_down_when_inactive`,
        else its profile disabled through the LPA (under the modem's lock, list re-read)."""
        d = self.d
        layer = d.cfg.layer(name)
        session = d.sessions.get(layer.modem)
        if session is None or not session.online:
            return
        if d.policy is not None and name in (d.policy.active, d.policy.target):
            return  # the policy chose it again meanwhile
        if layer.radio_down_when_inactive:
            log.info("layer_sleeping", layer=name, how="radio_off")
            await self.radio(session, False)
            return
        if session.enabled_iccid != layer.profile:
            return
        log.info("layer_sleeping", layer=name, how="profile_disabled", iccid=layer.profile)
        held = self.hold(layer.modem)

        async def op(lpa: Lpa) -> None:
            # Under the modem's lock: another sleep (SleepLayer and the companions' sweep
            # may meet) has perhaps done it already.
            if session.enabled_iccid == layer.profile:
                await lpa.disable_profile(layer.profile)

        try:
            await d.before_switch(session)
            await session.with_lpa(op)
            if d.datalinks is not None:
                d.datalinks.switched(session)
            log.info("layer_asleep", layer=name)
        except AgentError as exc:
            log.warning("layer_sleep_failed", layer=name, error=f"{type(exc).__name__}: {exc}")
        finally:
            for m in held:
                m.resume(reset=True)
            self.refeed(layer.modem)
