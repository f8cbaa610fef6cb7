"""Moving a profile to another device of the group: both daemons' sides (docs/transfer.md).

Source (`profile_transfer`): journal the transfer, ask the target over MQTT
(`profile_transfer_in`) until it answers verified or failed, then disable and delete the old
profile and send its notifications. The steps are agent.euicc.transfer's pure machine; this
module carries out its actions and journals each record before acting on it, so a restart
resumes where it stopped. Target (`profile_transfer_in`): download the new activation code,
safe-switch to it with a data-path check, answer verified; asked again with the same transfer id
it answers for the same work instead of downloading twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, cast

import msgspec
import structlog

from agent.errors import AgentError
from agent.euicc import transfer as machine
from agent.euicc.activation import ActivationCodeError, parse_activation_code
from agent.euicc.lpa import Lpa
from agent.euicc.switch import SwitchReport
from agent.euicc.transfer import Transfer
from agent.mqtt.commands import CommandRejected
from agent.mqtt.reach import settings_from_config
from agent.mqtt.request import RequestFailed, request
from agent.mqtt.topics import check_segment

if TYPE_CHECKING:
    from agent.daemon.app import Daemon
    from agent.daemon.session import ModemSession

log = structlog.get_logger(__name__)

#: From start until the target must have verified; after it the source gives up, untouched.
TRANSFER_DEADLINE_S: Final = 1800.0
#: How long the target holds one request before answering "in_progress" (a long poll).
ASK_WAIT_S: Final = 60.0
#: Beyond the long poll: broker round trips, a busy target.
ANSWER_MARGIN_S: Final = 30.0
#: The target's whole job: a download can take many minutes over a slow modem, then the switch.
TARGET_JOB_TIMEOUT_S: Final = 1500.0
#: After the switch, how long the new profile's data path has to answer a probe.
DATA_PATH_TIMEOUT_S: Final = 60.0
DATA_PATH_RETRY_S: Final = 1.0
#: The source's notification step: bounded, whatever the SM-DP+ does.
NOTIFY_TIMEOUT_S: Final = 120.0
#: The source's disable (a safe switch away from the old profile) or delete; retried after.
SOURCE_STEP_TIMEOUT_S: Final = 300.0
#: Finished transfers kept in the journal (for `status` and after-the-fact questions).
KEEP_FINISHED: Final = 20
#: Error codes of the target's intake that no retry can change.
_DEFINITIVE: Final = frozenset(
    {
        "commands_disabled",
        "unknown_command",
        "command_not_allowed",
        "unauthorized",
        "invalid_payload",
        "invalid_json",
        "payload_too_large",
        "unknown_modem",
        "not_configured",
        "not_allowed",
    }
)

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Iccid = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{18,22}[Ff]?$")]
CodeText = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
ConfirmationCode = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
TransferId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{8,64}$")]


class TransferArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`profile_transfer`: move from_iccid (on `modem`, found when left out) to device `to`."""

    from_iccid: Iccid
    to: Name
    code: CodeText
    confirmation_code: ConfirmationCode | None = None
    modem: Name | None = None


class TransferInArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`profile_transfer_in`: a sibling's request to install and verify `code`."""

    transfer_id: TransferId
    code: CodeText
    confirmation_code: ConfirmationCode | None = None
    modem: Name | None = None
    wait_s: Annotated[float, msgspec.Meta(ge=0, le=240)] = ASK_WAIT_S


class Incoming(msgspec.Struct, kw_only=True):
    """The target's journal of one transfer: downloading, installed, verified or failed."""

    id: str
    modem: str
    step: str = "downloading"
    iccid: str | None = None
    error: str | None = None


# ------------------------------------------------------------------------------ the journal


class Journal:
    """One small JSON file per transfer under `<state_dir>/transfers/`, written atomically
    (temporary file, fsync, rename, fsync of the directory) and readable only by us: a
    source record holds the activation code until the transfer ends."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _write(self, name: str, data: bytes) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def save(self, t: Transfer) -> None:
        """Journal a source record; a finished one loses its codes (no longer needed)."""
        if t.finished:
            t = msgspec.structs.replace(t, code="", confirmation_code=None)
        self._write(f"out-{t.id}.json", msgspec.json.encode(t))
        if t.finished:
            self._prune()

    def save_in(self, rec: Incoming) -> None:
        """Journal a target record."""
        self._write(f"in-{rec.id}.json", msgspec.json.encode(rec))

    def load_in(self, transfer_id: str) -> Incoming | None:
        """The target record of transfer_id, if any (an unreadable one counts as none)."""
        try:
            return msgspec.json.decode(
                (self.dir / f"in-{transfer_id}.json").read_bytes(), type=Incoming
            )
        except (OSError, msgspec.DecodeError):
            return None

    def outgoing(self) -> list[Transfer]:
        """Every readable source record, oldest first; a corrupt file is logged and skipped."""
        out = []
        for path in sorted(self.dir.glob("out-*.json"), key=lambda p: p.stat().st_mtime):
            try:
                out.append(msgspec.json.decode(path.read_bytes(), type=Transfer))
            except (OSError, msgspec.DecodeError) as exc:
                log.error("transfer_journal_unreadable", file=str(path), error=str(exc))
        return out

    def _prune(self) -> None:
        done = [t for t in self.outgoing() if t.finished]
        for t in done[:-KEEP_FINISHED]:
            with contextlib.suppress(OSError):
                (self.dir / f"out-{t.id}.json").unlink()


# ------------------------------------------------------------------------------- the service


class TransferService:
    """Both sides of transfers for one daemon; its jobs outlive the command that started them
    (a caller's timeout never cancels a transfer) and end only with the daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._out: dict[str, asyncio.Task[Transfer]] = {}
        self._in: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._in_progress: dict[str, Incoming] = {}

    @property
    def journal(self) -> Journal:
        """The journal under the current state_dir."""
        return Journal(Path(self.d.cfg.state_dir) / "transfers")

    def emit(self, name: str, data: Mapping[str, object]) -> None:
        """A transfer event: structured log line and `<base>/<device>/events`."""
        log.info(name, **data)
        self.d.publisher.event(name, dict(data))

    def _job(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        async def run() -> Any:
            return await coro

        return asyncio.create_task(run(), name=name)

    # ---- lifecycle -------------------------------------------------------------------------

    def resume(self) -> None:
        """At start: every unfinished source transfer continues from its journaled step."""
        for t in self.journal.outgoing():
            if not t.finished and t.id not in self._out:
                self._out[t.id] = self._job(self._drive(t, machine.Resume(now=time.time())), t.id)

    async def close(self) -> None:
        """Stop every job (the journal already holds where each one is)."""
        jobs = [*self._out.values(), *self._in.values()]
        for job in jobs:
            job.cancel()
        if jobs:
            await asyncio.wait(jobs, timeout=10.0)

    # ---- source --------------------------------------------------------------------------

    async def start(self, args: TransferArgs) -> object:
        """`profile_transfer`: start (or join) a transfer and wait for its end."""
        cfg = self.d.cfg
        iccid = args.from_iccid.rstrip("Ff")
        if args.to == cfg.device_id:
            raise CommandRejected("invalid_payload", "the target is this device")
        try:
            check_segment(args.to)
        except ValueError as exc:
            raise CommandRejected("invalid_payload", f"to: {exc}") from None
        if not cfg.mqtt.enabled:
            raise CommandRejected("not_configured", "a transfer talks to the target over MQTT")
        if cfg.group is not None and cfg.group.devices and args.to not in cfg.group.devices:
            raise CommandRejected("invalid_payload", f"{args.to} is not in group {cfg.group.name}")
        try:
            parse_activation_code(args.code)
        except ActivationCodeError as exc:
            raise CommandRejected("invalid_payload", str(exc)) from None
        session = self._source_session(iccid, args.modem)
        for t in self.journal.outgoing():
            if t.from_iccid == iccid and not t.finished:
                raise CommandRejected("busy", f"transfer {t.id} of {iccid} is under way")
        now = time.time()
        t = Transfer(
            id=secrets.token_hex(8),
            from_iccid=iccid,
            modem=session.id,
            to=args.to,
            code=args.code,
            confirmation_code=args.confirmation_code,
            started_at=now,
            deadline_at=now + TRANSFER_DEADLINE_S,
        )
        self.journal.save(t)
        job = self._job(self._drive(t, machine.Begin(now=now)), t.id)
        self._out[t.id] = job
        # Shielded: a caller that stops waiting (MQTT command timeout) leaves the transfer on.
        done = await asyncio.shield(job)
        return done.public()

    def _source_session(self, iccid: str, modem: str | None) -> ModemSession:
        sessions = self.d.sessions
        if modem is not None:
            session = sessions.get(modem) or next(
                (s for s in sessions.values() if modem in (s.port, s.cfg.port)), None
            )
            if session is None:
                raise CommandRejected("unknown_modem", f"no modem {modem!r}")
            candidates = [session]
        else:
            candidates = list(sessions.values())
        for session in candidates:
            if any(p.iccid == iccid for p in session.profiles):
                return session
        raise CommandRejected("iccid_not_found", f"no profile {iccid} on this device")

    async def _drive(self, t: Transfer, event: machine.Event) -> Transfer:
        """Run the machine to its end: journal each record, then carry out its actions."""
        try:
            return await self._steps(t, event)
        except Exception:
            # A bug: the journal keeps the step reached, and the next start resumes from it.
            log.exception("transfer_crashed", id=t.id)
            raise

    async def _steps(self, t: Transfer, event: machine.Event) -> Transfer:
        while True:
            t, actions = machine.transition(t, event)
            self.journal.save(t)
            effect: machine.Effect | None = None
            for action in actions:
                if isinstance(action, machine.Emit):
                    self.emit(action.name, action.data)
                else:
                    effect = action
            if effect is None:
                return t
            if effect.delay_s > 0:
                await asyncio.sleep(effect.delay_s)
            event = await self._carry_out(t, effect)

    async def _carry_out(self, t: Transfer, effect: machine.Effect) -> machine.Event:
        if isinstance(effect, machine.AskTarget):
            return await self._ask(t)
        what = {
            machine.DisableSource: "disabled",
            machine.DeleteSource: "deleted",
            machine.NotifySource: "notified",
        }[type(effect)]
        # The machine never asks for these before the target verified; checked once more here,
        # where the card is changed.
        assert machine.may_touch_source(t), t.step
        try:
            if isinstance(effect, machine.DisableSource):
                async with asyncio.timeout(SOURCE_STEP_TIMEOUT_S):
                    await self._disable(t)
            elif isinstance(effect, machine.DeleteSource):
                async with asyncio.timeout(SOURCE_STEP_TIMEOUT_S):
                    await self._delete(t)
            else:
                sent = await self._notify(t)
                return machine.SourceDone(what=what, now=time.time(), sent=sent)
        except (AgentError, TimeoutError) as exc:
            return machine.SourceFailed(what=what, now=time.time(), error=str(exc) or "timeout")
        return machine.SourceDone(what=what, now=time.time())

    async def _ask(self, t: Transfer) -> machine.Event:
        """One long-poll request to the target."""
        settings = settings_from_config(self.d.cfg, self.d.config_path)
        body: dict[str, Any] = {"transfer_id": t.id, "code": t.code, "wait_s": ASK_WAIT_S}
        if t.confirmation_code is not None:
            body["confirmation_code"] = t.confirmation_code
        try:
            answer = await request(
                settings,
                t.to,
                "profile_transfer_in",
                body,
                timeout=ASK_WAIT_S + ANSWER_MARGIN_S,
                sender=self.d.cfg.device_id,
            )
        except RequestFailed as exc:
            log.info("transfer_target_silent", id=t.id, to=t.to, error=str(exc))
            return machine.TargetSilent(now=time.time(), error=str(exc))
        now = time.time()
        if not answer.ok:
            err = answer.error
            code = err.code if err is not None else "failed"
            message = f"{code}: {err.message}" if err is not None else code
            if code in _DEFINITIVE:
                return machine.TargetAnswer(state="failed", now=now, error=message)
            return machine.TargetSilent(now=now, error=message)
        result = answer.result if isinstance(answer.result, dict) else {}
        state = result.get("state")
        if state not in ("in_progress", "installed", "verified", "failed"):
            return machine.TargetSilent(now=now, error=f"unexpected answer {state!r}")
        iccid = result.get("iccid")
        error = result.get("error")
        return machine.TargetAnswer(
            state=str(state),
            now=now,
            iccid=iccid if isinstance(iccid, str) else None,
            error=error if isinstance(error, str) else None,
        )

    def _session(self, t: Transfer) -> ModemSession:
        session = self.d.sessions.get(t.modem)
        if session is None:
            raise AgentError(f"modem {t.modem} is no longer configured")
        if not session.online:
            raise AgentError(f"modem {t.modem} is offline")
        return session

    async def _disable(self, t: Transfer) -> None:
        """The old profile disabled; a modem running it moves to another profile first."""
        session = self._session(t)
        profiles = await session.refresh_profiles()
        mine = next((p for p in profiles if p.iccid == t.from_iccid), None)
        if mine is None or mine.state != "enabled":
            return  # already disabled (or deleted: a restart after the step, before its record)
        home = self.d.home_profile(session.id)
        others = [p.iccid for p in profiles if p.iccid and p.iccid != t.from_iccid]
        fallback = home if home in others else (others[0] if others else None)
        if fallback is not None:
            report = await self.d.switch_modem(session, fallback)
            if report.outcome != "switched":
                raise AgentError(f"switch to {fallback}: {report.outcome}: {report.error}")
            return
        log.warning("transfer_source_left_without_profile", id=t.id, modem=session.id)

        async def op(lpa: Lpa) -> None:
            await lpa.disable_profile(t.from_iccid)

        await session.with_lpa(op)

    async def _delete(self, t: Transfer) -> None:
        session = self._session(t)
        profiles = await session.refresh_profiles()
        if not any(p.iccid == t.from_iccid for p in profiles):
            return  # deleted before a restart took the record further

        async def op(lpa: Lpa) -> None:
            await lpa.delete_profile(t.from_iccid)

        await session.with_lpa(op)

    async def _notify(self, t: Transfer) -> bool:
        """Send the old profile's pending notifications now, through the daemon's courier;
        True when none is left on the card (sent now, or by the courier on its own before).
        An unsent one stays (never removed unsent) for the courier's next good link."""
        session = self._session(t)

        async def mine(lpa: Lpa) -> list[int]:
            pending = await lpa.list_notifications()
            return [n.seq_number for n in pending if n.iccid == t.from_iccid]

        async with asyncio.timeout(NOTIFY_TIMEOUT_S):
            for seq in cast("list[int]", await session.with_lpa(mine)):
                try:
                    await self.d.courier.process_now(session, seq)
                except AgentError as exc:
                    log.info("transfer_notification_pending", id=t.id, seq=seq, error=str(exc))
            return not await session.with_lpa(mine)

    async def _download(self, session: ModemSession, text: str, confirmation: str | None) -> str:
        """Download and install the activation code's profile (the daemon's provisioning: over
        the working layer, cancelled cleanly on both sides when it drops); its ICCID."""
        try:
            code = parse_activation_code(text)
        except ActivationCodeError as exc:
            raise CommandRejected("invalid_payload", str(exc)) from None
        installed = await self.d.provision.download(
            code, confirmation_code=confirmation, modem=session.id, enable=False
        )
        if installed.iccid is None:
            raise AgentError("the eUICC installed a profile without an ICCID")
        return installed.iccid

    # ---- target --------------------------------------------------------------------------

    async def receive(self, args: TransferInArgs) -> object:
        """`profile_transfer_in`: install and verify, answering within wait_s."""
        job = self._in.get(args.transfer_id)
        if job is None or (job.done() and job.cancelled()):
            rec = self.journal.load_in(args.transfer_id)
            if rec is not None and rec.step in ("verified", "failed"):
                return self._answer(rec)
            session = self._target_session(args.modem)
            if not self._probes(session):
                raise CommandRejected(
                    "not_configured",
                    f"no data-path probe on {session.id}: the new profile cannot be verified",
                )
            if rec is None:
                rec = Incoming(id=args.transfer_id, modem=session.id)
            self._in_progress[rec.id] = rec
            job = self._job(self._install(args, session, rec), f"transfer-in-{rec.id}")
            self._in[rec.id] = job
        done, _ = await asyncio.wait({job}, timeout=args.wait_s)
        if not done:
            rec = self._in_progress[args.transfer_id]
            state = "installed" if rec.step == "installed" else "in_progress"
            return {"transfer_id": rec.id, "state": state, "iccid": rec.iccid, "modem": rec.modem}
        return job.result()

    def _answer(self, rec: Incoming) -> dict[str, Any]:
        return {
            "transfer_id": rec.id,
            "state": rec.step,
            "iccid": rec.iccid,
            "modem": rec.modem,
            "error": rec.error,
        }

    def _target_session(self, modem: str | None) -> ModemSession:
        sessions = self.d.sessions
        if modem is None:
            if len(sessions) == 1:
                return next(iter(sessions.values()))
            raise CommandRejected("invalid_payload", "name the modem")
        session = sessions.get(modem) or next(
            (s for s in sessions.values() if modem in (s.port, s.cfg.port)), None
        )
        if session is None:
            raise CommandRejected("unknown_modem", f"no modem {modem!r}")
        return session

    def _probes(self, session: ModemSession) -> list[Any]:
        """Every probe of the layers on the modem: bound to its link, whatever profile runs."""
        d = self.d
        return [
            p
            for x in d.cfg.layers
            if x.modem == session.id
            for _, p, _ in d.layer_probes.get(x.name, [])
        ]

    def _data_path_check(self, session: ModemSession) -> Callable[[], Awaitable[bool]]:
        probes = self._probes(session)

        async def check() -> bool:
            deadline = time.monotonic() + DATA_PATH_TIMEOUT_S
            while True:
                results = await asyncio.gather(*(p.run() for p in probes))
                if any(r.ok for r in results):
                    return True
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(DATA_PATH_RETRY_S)

        return check

    async def _install(
        self, args: TransferInArgs, session: ModemSession, rec: Incoming
    ) -> dict[str, Any]:
        base: dict[str, object] = {"id": rec.id, "modem": rec.modem}
        try:
            async with asyncio.timeout(TARGET_JOB_TIMEOUT_S):
                if rec.iccid is None:
                    self.emit("transfer_in_started", base)
                    rec.step = "downloading"
                    self.journal.save_in(rec)
                    rec.iccid = await self._download(session, args.code, args.confirmation_code)
                    rec.step = "installed"
                    self.journal.save_in(rec)
                    self.emit("transfer_in_installed", {**base, "iccid": rec.iccid})
                report = await self._switch(session, rec.iccid)
            if report.outcome == "switched":
                rec.step = "verified"
                self.emit("transfer_in_verified", {**base, "iccid": rec.iccid})
            else:
                rec.step, rec.error = "failed", f"not verified: {report.outcome}: {report.error}"
        except (AgentError, TimeoutError) as exc:
            rec.step, rec.error = "failed", f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            log.exception("transfer_in_crashed", id=rec.id)
            rec.step, rec.error = "failed", f"internal error: {type(exc).__name__}"
        if rec.step == "failed":
            self.emit("transfer_in_failed", {**base, "iccid": rec.iccid, "error": rec.error})
        self.journal.save_in(rec)
        return self._answer(rec)

    async def _switch(self, session: ModemSession, iccid: str) -> SwitchReport:
        """A safe switch to the new profile, verified by registration and the modem's probes
        (no layer names the new profile yet); health reports on the modem held meanwhile."""
        check = self._data_path_check(session)
        if session.enabled_iccid == iccid:
            # Enabled before a restart cut the job short: verify it as it runs, no switch.
            ok = await check()
            outcome, error = ("switched", None) if ok else ("failed", "data-path probe failed")
            return SwitchReport(outcome=outcome, from_iccid=iccid, to_iccid=iccid, error=error)
        held = self.d.actuator.hold(session.id)
        try:
            await self.d.before_switch(session)
            report = await session.safe_switch(iccid, check)
            if self.d.datalinks is not None:
                self.d.datalinks.switched(session)
            return report
        finally:
            for m in held:
                m.resume(reset=True)
            self.d.actuator.refeed(session.id)
