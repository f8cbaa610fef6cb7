"""Profile downloads in the daemon: on a working layer only, cancelled when that layer drops.

    result = await daemon.provision.download(code, confirmation_code=None, modem="m1")

The card side runs on the modem's session under its eUICC lock, like every profile command
(agent/daemon/commands.py); the ES9+ side (agent/euicc/es9.py) leaves through the active layer's
link (its interface, fwmark and source address, agent/health/probes.py `connect_on_link`) when
the daemon has a data path, else by the host's routes. A download starts only while the active
layer is up or degraded and no switch runs; when that stops being true the download task is
cancelled and the flow (agent/euicc/download.py) cancels the session on the card and on the
SM-DP+ (shielded), so nothing half-installed is left.

Store and forward: a layer with `activation_code` (or `activation_code_file`) whose profile is
not on its modem's card is downloaded on the first working link, retried on the one Backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import msgspec
import structlog

from agent.backoff import Backoff
from agent.config import LayerConfig, read_secret
from agent.errors import AgentError, ConfigError
from agent.euicc.activation import ActivationCode, masked, parse_activation_code
from agent.euicc.download import (
    DEFAULT_TAC,
    Downloader,
    DownloadResult,
    Phase,
    tac_from_imei,
)
from agent.euicc.es9 import CONNECT_TIMEOUT_S, Connector, Es9Client, Es9Refused, Resolve
from agent.euicc.lpa import Lpa
from agent.health.probes import LinkBinding, connect_on_link
from agent.policy.engine import Phase as PolicyPhase

if TYPE_CHECKING:
    from agent.daemon.app import Daemon
    from agent.daemon.session import ModemSession

log = structlog.get_logger(__name__)

#: Store and forward retries a failed download on this schedule (the one Backoff).
RETRY_INITIAL_S: Final = 5.0
RETRY_MAX_S: Final = 900.0
#: Progress events within a phase: when the bytes moved this share of the total, or this long
#: after the last one.
PROGRESS_STEP: Final = 0.10
PROGRESS_EVERY_S: Final = 1.0

#: Called with the phase, the package bytes loaded so far and their total (0 if unknown).
OnProgress = Callable[[Phase, int, int], None]
ProfileState = Literal["installed", "missing", "downloading", "unknown"]


class NoWorkingLink(AgentError):
    """No layer can carry a download now: none active, the active one not up, a switch running,
    or the active layer's interface without an address."""

    code = "no_working_link"


class LinkLost(AgentError):
    """The link under a download went down or a switch started: the download was cancelled.
    `cancelled` says whether the sessions on the card and the SM-DP+ were closed."""

    code = "link_lost"

    def __init__(self, message: str, cancelled: bool) -> None:
        super().__init__(message)
        self.cancelled = cancelled


class DownloadBusy(AgentError):
    """A download already runs on this modem."""

    code = "busy"


class InstalledProfile(msgspec.Struct, kw_only=True):
    """What `download` returns (and `profile_download` answers): the profile as installed."""

    modem: str
    iccid: str | None
    profile_name: str | None = None
    service_provider_name: str | None = None
    profile_class: str | None = None
    isdp_aid: str | None = None
    #: "enabled" or "disabled" as the card lists the profile after the download (and enable).
    state: str | None = None
    smdp_address: str
    transaction_id: str
    bpp_bytes: int
    notification_sent: bool
    #: The layer whose link carried the ES9+ traffic.
    layer: str
    #: With enable=True: the safe switch's outcome ("switched", "rolled_back", "failed").
    enable_outcome: str | None = None
    enable_error: str | None = None


def layer_code(layer: LayerConfig) -> tuple[ActivationCode, str | None] | None:
    """A layer's activation code and confirmation code (files read now: they may change), or
    None when it has none. ConfigError when a file is unreadable or the code does not parse."""
    key = f"layers.{layer.name}"
    try:
        text = read_secret(layer.activation_code, layer.activation_code_file)
        confirmation = read_secret(layer.confirmation_code, layer.confirmation_code_file)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(key, None, f"cannot read a code file: {exc}") from None
    if not text:
        return None
    try:
        code = parse_activation_code(text)
    except AgentError as exc:
        raise ConfigError(f"{key}.activation_code", None, str(exc)) from None
    return code, (confirmation or None)


class ProgressThrottle:
    """Which progress reports become events: each phase change, then within a phase when the
    bytes moved PROGRESS_STEP of the total or PROGRESS_EVERY_S passed. Pure (time passed in)."""

    def __init__(self) -> None:
        self._phase: Phase | None = None
        self._done = 0
        self._at = 0.0

    def admit(self, phase: Phase, done: int, total: int, now: float) -> bool:
        """Whether this report should go out."""
        if phase == self._phase:
            if done == self._done:
                return False
            moved = total > 0 and (done - self._done >= total * PROGRESS_STEP or done >= total)
            if not moved and now - self._at < PROGRESS_EVERY_S:
                return False
        self._phase, self._done, self._at = phase, done, now
        return True


@dataclass
class _Running:
    """One download in flight: the layer its traffic uses, and why it was stopped (if it was)."""

    layer: str
    task: asyncio.Task[DownloadResult] | None = None
    stopped: str | None = None


@dataclass
class _Forward:
    """Store and forward's memory of one layer's download attempts."""

    attempts: int = 0
    last_error: str | None = None
    next_try_at: float | None = None
    #: The code installed another profile than the layer names: it is not tried again.
    spent: bool = False


@dataclass(frozen=True)
class _UnsentCancel:
    """A session the card cancelled but the SM-DP+ was not told of (the link was gone)."""

    smdp_address: str
    transaction_id: str
    signed: bytes


class Provisioner:
    """One per daemon: downloads on request (`download`) and store and forward (`run`)."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._running: dict[str, _Running] = {}
        self._wake = asyncio.Event()
        self._forward: dict[str, _Forward] = {}
        #: Sent on the next working link (with the store-and-forward retries).
        self._cancels: list[_UnsentCancel] = []

    # ---- the working link ----------------------------------------------------------------

    def working_layer(self) -> tuple[str, LinkBinding | None]:
        """The active layer and the binding its traffic leaves by (None: host routes);
        NoWorkingLink when no download may start now."""
        d = self.d
        policy = d.policy
        if policy is None or policy.active is None:
            raise NoWorkingLink("no working link: no layer is active yet")
        active = policy.active
        if policy.phase == PolicyPhase.SWITCHING:
            raise NoWorkingLink(f"no working link: a switch from {active} is in progress")
        state, reason = d.fed.get(active, ("unknown", "no_data"))
        if state not in ("up", "degraded"):
            raise NoWorkingLink(f"no working link: the active layer {active} is {state} ({reason})")
        binding = self._binding(active)
        if binding is not None and binding.bound:
            sibling = any(x.name == active and x.is_sibling for x in d.cfg.layers)
            # Our own modem's link needs its data connection's address; a sibling's interface
            # (Wi-Fi, tether) is the host's to address.
            if not sibling and not d.link_status(active).get("addresses"):
                raise NoWorkingLink(
                    f"no working link: {active}'s interface {binding.interface} has no address "
                    "(no route for ES9+)"
                )
            return active, binding
        return active, None

    def _binding(self, layer: str) -> LinkBinding | None:
        links = self.d.datalinks
        if links is None or layer not in links.datapath.layers():
            return None
        return links.binding(layer)

    def link_changed(self) -> None:
        """The daemon calls this when a layer's health or the policy's active layer or phase
        changed: downloads whose link stopped working are cancelled; store and forward looks
        again."""
        self._wake.set()
        for modem, running in self._running.items():
            if running.task is None or running.task.done() or running.stopped is not None:
                continue
            try:
                layer, _ = self.working_layer()
            except NoWorkingLink as exc:
                running.stopped = str(exc).removeprefix("no working link: ")
            else:
                if layer != running.layer:
                    running.stopped = f"the active layer changed from {running.layer} to {layer}"
            if running.stopped is not None:
                log.warning(
                    "download_link_lost", modem=modem, layer=running.layer, reason=running.stopped
                )
                running.task.cancel()

    def downloading(self, modem: str) -> bool:
        """Whether a download runs on the modem now (it holds the modem's lock meanwhile)."""
        return modem in self._running

    # ---- one download --------------------------------------------------------------------

    async def download(
        self,
        code: ActivationCode,
        *,
        confirmation_code: str | None = None,
        modem: str | None = None,
        enable: bool = False,
        on_progress: OnProgress | None = None,
    ) -> InstalledProfile:
        """Download and install the profile of `code` onto `modem`'s eUICC (the only modem
        when None) over the active layer's link; with enable=True then safe-switch to it.

        on_progress(phase, bytes, total) gets every report of the flow, unthrottled (see
        ProgressThrottle, `progress_events`); a listener that raises is logged, not fatal.

        Raises, before anything reaches the card or the SM-DP+:
          NoWorkingLink (`.code` "no_working_link"): no active layer, it is not up/degraded,
            a switch runs, or its interface has no address;
          DownloadBusy ("busy"): a download or a switch already runs on that modem;
          ConfigError: no such modem (or several and none named), no [rsp] ci_certs.
        And once started (the eUICC is left without a half-installed profile every time):
          LinkLost ("link_lost"): the active layer went down or changed, or a switch began; the
            download was cancelled, `.cancelled` says whether both sessions were closed;
          DownloadError (`.phase`, `.cancelled`), Es9Error / Es9Refused (names the SM-DP+ and
            its subject/reason codes), PortGoneError (modem gone), TimeoutError.
        Cancelling the caller cancels the download the same way (CancelSession on both sides).
        With enable=True a failed switch does not raise: see enable_outcome / enable_error.
        """
        session = self._session(modem)
        if session.id in self._running:
            raise DownloadBusy(f"a download already runs on {session.id}")
        if session.switching:
            raise DownloadBusy(f"{session.id} is switching profiles right now")
        layer, binding = self.working_layer()
        es9 = self._es9(code, binding)
        running = _Running(layer=layer)
        self._running[session.id] = running
        log.info(
            "download_starting",
            modem=session.id,
            layer=layer,
            code=masked(code),
            bound=binding.interface if binding else None,
        )
        try:
            result = await self._run(
                session,
                es9=es9,
                code=code,
                confirmation_code=confirmation_code,
                on_progress=on_progress,
                running=running,
            )
            installed = self._installed(session, result, layer)
        finally:
            self._running.pop(session.id, None)
            self._wake.set()
        log.info("download_installed", modem=session.id, iccid=installed.iccid, layer=layer)
        self.d.publisher.event(
            "profile_downloaded",
            {"modem": session.id, "iccid": installed.iccid, "name": installed.profile_name},
        )
        if enable and installed.iccid is not None:
            report = await self.d.switch_modem(session, installed.iccid)
            installed.enable_outcome = report.outcome
            installed.enable_error = report.error
            installed.state = next(
                (p.state for p in session.profiles if p.iccid == installed.iccid), installed.state
            )
        return installed

    async def _run(
        self,
        session: ModemSession,
        *,
        es9: Es9Client,
        code: ActivationCode,
        confirmation_code: str | None,
        on_progress: OnProgress | None,
        running: _Running,
    ) -> DownloadResult:
        imei = session.info.identity.imei if session.info is not None else None
        tac = tac_from_imei(imei) or DEFAULT_TAC
        downloader: Downloader | None = None

        def report(phase: Phase, done: int, total: int) -> None:
            if on_progress is None:
                return
            try:
                on_progress(phase, done, total)
            except Exception as exc:  # a listener's bug must not break the download
                log.error("download_progress_failed", error=repr(exc))

        async def op(lpa: Lpa) -> DownloadResult:
            nonlocal downloader
            downloader = Downloader(
                lpa, es9, code, confirmation_code=confirmation_code, tac=tac, progress=report
            )
            return await downloader.run()

        async def under_lock() -> DownloadResult:
            result = await session.with_lpa(op)
            assert isinstance(result, DownloadResult)
            return result

        task = asyncio.create_task(under_lock(), name=f"download-{session.id}")
        running.task = task

        def keep_unsent_cancel(_: object) -> None:
            if downloader is not None and downloader.unsent_cancel is not None:
                tid, signed = downloader.unsent_cancel
                log.warning("download_cancel_unsent", smdp=es9.smdp_address, transaction_id=tid)
                self._cancels.append(_UnsentCancel(es9.smdp_address, tid, signed))
                self._wake.set()

        task.add_done_callback(keep_unsent_cancel)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if running.stopped is None:
                # Our caller was cancelled: the download goes with it (and cancels both sides).
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(task, return_exceptions=True)
            cancelled = downloader is not None and downloader.session_cancelled
            unsent = downloader is not None and downloader.unsent_cancel is not None
            told = ""
            if cancelled:
                told = "; session cancelled on the eUICC and the SM-DP+"
            elif unsent:
                told = "; session cancelled on the eUICC, the SM-DP+ is told on the next link"
            raise LinkLost(f"download cancelled: {running.stopped}{told}", cancelled) from None

    def _installed(
        self, session: ModemSession, result: DownloadResult, layer: str
    ) -> InstalledProfile:
        state = next((p.state for p in session.profiles if p.iccid == result.iccid), None)
        return InstalledProfile(
            modem=session.id,
            iccid=result.iccid,
            profile_name=result.profile_name,
            service_provider_name=result.service_provider_name,
            profile_class=result.profile_class,
            isdp_aid=result.isdp_aid,
            state=state,
            smdp_address=result.smdp_address,
            transaction_id=result.transaction_id,
            bpp_bytes=result.bpp_bytes,
            notification_sent=result.notification_sent,
            layer=layer,
        )

    def _session(self, modem: str | None) -> ModemSession:
        sessions = self.d.sessions
        if modem is None:
            if len(sessions) == 1:
                return next(iter(sessions.values()))
            raise ConfigError("modem", None, "name the modem to download onto")
        session = sessions.get(modem)
        if session is None:
            session = next((s for s in sessions.values() if modem in (s.port, s.cfg.port)), None)
        if session is None:
            raise ConfigError("modem", None, f"no modem {modem!r}")
        return session

    def _es9(self, code: ActivationCode, binding: LinkBinding | None) -> Es9Client:
        return self.es9_client(code.smdp_address, binding)

    def es9_client(self, smdp_address: str, binding: LinkBinding | None) -> Es9Client:
        """An ES9+ client for the SM-DP+ that leaves by `binding`'s link (None: the host's
        routes), TLS checked against [rsp] ci_certs; downloads and notifications share it."""
        rsp = self.d.cfg.rsp
        if not rsp.ci_certs:
            raise ConfigError("rsp.ci_certs", None, "no CI root certificate configured")
        connect: Connector | None = None
        if binding is not None:
            bound = binding

            async def on_link(address: str, port: int) -> socket.socket:
                return await connect_on_link(address, port, bound, CONNECT_TIMEOUT_S)

            connect = on_link
        return Es9Client(
            smdp_address,
            [Path(c) for c in rsp.ci_certs],
            resolve=[Resolve.parse(r) for r in rsp.resolve],
            connect=connect,
        )

    def progress_events(self, modem: str, request_id: str | None) -> OnProgress:
        """An on_progress that publishes throttled `download_progress` events on MQTT."""
        throttle = ProgressThrottle()

        def publish(phase: Phase, done: int, total: int) -> None:
            if throttle.admit(phase, done, total, time.monotonic()):
                self.d.publisher.event(
                    "download_progress",
                    {
                        "modem": modem,
                        "phase": phase.value,
                        "bytes": done,
                        "total": total,
                        "request_id": request_id,
                    },
                )

        return publish

    # ---- store and forward ---------------------------------------------------------------

    def profile_state(self, layer: LayerConfig) -> tuple[ProfileState, str] | None:
        """Whether a layer's profile is on its modem's eUICC, and why not; None for a sibling
        layer (no profile of ours)."""
        if layer.is_sibling:
            return None
        session = self.d.sessions.get(layer.modem)
        if session is not None and session.id in self._running and self._wanted(layer):
            return "downloading", "downloading from its activation code"
        if session is None or not session.online:
            return "unknown", "modem offline"
        if session.eid is None:
            # A fresh eUICC lists no profile at all: only an unread one is unknown.
            return "unknown", "eUICC not read"
        if any(p.iccid == layer.profile for p in session.profiles):
            return "installed", "on the eUICC"
        if not (layer.activation_code or layer.activation_code_file):
            return "missing", "not on the eUICC, and the layer has no activation_code"
        fwd = self._forward.get(layer.name)
        if fwd is not None and fwd.last_error is not None:
            wait = ""
            if fwd.next_try_at is not None and not fwd.spent:
                wait = f"; next try in {max(0.0, fwd.next_try_at - time.monotonic()):.0f} s"
            return "missing", f"download failed ({fwd.attempts}x): {fwd.last_error}{wait}"
        try:
            self.working_layer()
        except NoWorkingLink as exc:
            return "missing", f"waiting to download: {exc}"
        return "missing", "download pending"

    def _wanted(self, layer: LayerConfig) -> bool:
        """A layer store and forward should download now: it has a code, its modem's eUICC
        was read, and its profile is not on it."""
        if layer.is_sibling or not (layer.activation_code or layer.activation_code_file):
            return False
        fwd = self._forward.get(layer.name)
        if fwd is not None and fwd.spent:
            return False
        session = self.d.sessions.get(layer.modem)
        if session is None or not session.online or session.eid is None:
            return False
        return not any(p.iccid == layer.profile for p in session.profiles)

    async def run(self) -> None:
        """Store and forward (a supervised task): download every layer's missing profile on
        the first working link, and tell SM-DP+s of sessions a lost link left open; failures
        wait on the one Backoff, never a hot loop."""
        backoff = Backoff(RETRY_INITIAL_S, RETRY_MAX_S)
        while True:
            self._wake.clear()
            try:
                self.working_layer()
            except NoWorkingLink:
                await self._wake.wait()
                continue
            due = [x for x in self.d.cfg.layers if self._wanted(x)]
            if not due and not self._cancels:
                await self._wake.wait()
                continue
            cancels_sent = await self._send_cancels()
            failed = [x for x in due if not await self._forward_one(x)]
            if cancels_sent and not failed:
                backoff.reset()
                continue
            delay = backoff.next()
            for x in failed:
                self._forward[x.name].next_try_at = time.monotonic() + delay
            await asyncio.sleep(delay)

    async def _send_cancels(self) -> bool:
        """cancelSession for every session a lost link left open on an SM-DP+; False when one
        could not be sent (it is kept for the next try)."""
        ok = True
        for pending in list(self._cancels):
            try:
                _, binding = self.working_layer()
                es9 = self.es9_client(pending.smdp_address, binding)
                await es9.cancel_session(pending.transaction_id, pending.signed)
            except NoWorkingLink:
                return False
            except Es9Refused as exc:
                log.info("download_cancel_refused", smdp=pending.smdp_address, error=str(exc))
            except (AgentError, TimeoutError) as exc:
                log.warning("download_cancel_retry", smdp=pending.smdp_address, error=str(exc))
                ok = False
                continue
            else:
                log.info(
                    "download_cancel_sent",
                    smdp=pending.smdp_address,
                    transaction_id=pending.transaction_id,
                )
            self._cancels.remove(pending)
        return ok

    async def _forward_one(self, layer: LayerConfig) -> bool:
        """One store-and-forward download; False when it failed and should be retried."""
        fwd = self._forward.setdefault(layer.name, _Forward())
        fwd.next_try_at = None
        try:
            found = layer_code(layer)
        except ConfigError as exc:
            fwd.last_error = str(exc)
            log.warning("store_forward_code_unreadable", layer=layer.name, error=str(exc))
            return False
        if found is None:
            return True
        code, confirmation = found
        fwd.attempts += 1
        log.info(
            "store_forward_downloading", layer=layer.name, code=masked(code), attempt=fwd.attempts
        )
        try:
            installed = await self.download(
                code,
                confirmation_code=confirmation,
                modem=layer.modem,
                on_progress=self.progress_events(layer.modem, None),
            )
        except NoWorkingLink:
            fwd.attempts -= 1
            return True  # not a failure: the next working link wakes us
        except (AgentError, TimeoutError) as exc:
            fwd.last_error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "store_forward_failed",
                layer=layer.name,
                code=masked(code),
                attempt=fwd.attempts,
                error=fwd.last_error,
            )
            return False
        if installed.iccid != layer.profile:
            fwd.spent = True
            fwd.last_error = (
                f"the activation code installed {installed.iccid}, not the layer's {layer.profile}"
            )
            log.error("store_forward_wrong_profile", layer=layer.name, iccid=installed.iccid)
            return True
        fwd.last_error = None
        log.info("store_forward_installed", layer=layer.name, iccid=installed.iccid)
        self.d.publisher.event(
            "layer_profile_installed",
            {"layer": layer.name, "modem": layer.modem, "iccid": installed.iccid},
        )
        return True
