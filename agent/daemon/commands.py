"""The daemon's one command table: typed arguments and one handler per command.

The control socket, MQTT and the CLI's daemon path all dispatch through `CommandTable`, so a
command behaves the same whichever way it arrives. MQTT's own request structs
(agent/mqtt/payloads.py) check the wire contract and credentials first; the structs here type
the arguments a handler gets.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import structlog

from agent.daemon.control import UnknownCommand, progress_sink
from agent.daemon.provision import DownloadBusy, LinkLost, NoWorkingLink, ProgressThrottle
from agent.daemon.transfer import TransferArgs, TransferInArgs
from agent.euicc.activation import ActivationCodeError, parse_activation_code
from agent.euicc.download import Phase
from agent.euicc.lpa import Lpa
from agent.mqtt.commands import CommandContext, CommandRejected
from agent.policy.engine import Drill, ManualSwitch, summary

if TYPE_CHECKING:
    from agent.daemon.app import Daemon
    from agent.daemon.session import ModemSession

log = structlog.get_logger(__name__)

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Iccid = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{18,22}[Ff]?$")]
SeqNumber = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Nickname = Annotated[str, msgspec.Meta(max_length=64)]
Code = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
ConfirmationCode = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]

#: The MQTT request a handler runs for (its request_id goes into progress events).
_mqtt_request: contextvars.ContextVar[CommandContext | None] = contextvars.ContextVar(
    "mqtt_request", default=None
)


class NoArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A command without arguments."""


class SwitchLayerArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Pin `layer`; null unpins (back to automatic)."""

    layer: Name | None = None


class ModemArgs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The modem by id or port; may be left out when there is only one."""

    modem: Name | None = None


class ProfileArgs(ModemArgs, kw_only=True, forbid_unknown_fields=True):
    """A profile on a modem's eUICC."""

    iccid: Iccid


class ProfileChangeArgs(ProfileArgs, kw_only=True, forbid_unknown_fields=True):
    """Enable, disable or delete a profile; `force` overrides the layer guard (CLI only)."""

    force: bool = False


class ProfileNicknameArgs(ProfileArgs, kw_only=True, forbid_unknown_fields=True):
    """Set a profile's nickname (at most 64 UTF-8 bytes)."""

    nickname: Nickname


class NotificationProcessArgs(ModemArgs, kw_only=True, forbid_unknown_fields=True):
    """Send pending notifications now: all of them, or only `seq_number`."""

    seq_number: SeqNumber | None = None


class NotificationRemoveArgs(ModemArgs, kw_only=True, forbid_unknown_fields=True):
    """Remove one queued notification."""

    seq_number: SeqNumber


class ProfileDownloadArgs(ModemArgs, kw_only=True, forbid_unknown_fields=True):
    """Download a profile by activation code over the active layer; `enable` switches to it."""

    code: Code
    confirmation_code: ConfirmationCode | None = None
    enable: bool = False


@dataclass(frozen=True, slots=True)
class Command:
    """One entry of the table: its name, its argument type and its handler."""

    name: str
    args: type[msgspec.Struct]
    run: Callable[[Any], Awaitable[object]]
    help: str


class CommandTable:
    """Name → typed command; decodes arguments, runs the handler, one way for every caller."""

    def __init__(self, commands: Iterable[Command]) -> None:
        self._commands = {c.name: c for c in commands}

    @property
    def names(self) -> list[str]:
        """Known command names, sorted."""
        return sorted(self._commands)

    def get(self, name: str) -> Command | None:
        """The command with this name, if any."""
        return self._commands.get(name)

    def decode(self, name: str, raw: Mapping[str, Any]) -> tuple[Command, msgspec.Struct]:
        """The command and its typed arguments; CommandRejected when either is wrong."""
        command = self._commands.get(name)
        if command is None:
            raise CommandRejected("unknown_command", f"no command named {name[:64]!r}")
        try:
            args = msgspec.convert(dict(raw), command.args)
        except msgspec.ValidationError as exc:
            raise CommandRejected("invalid_payload", str(exc)) from None
        return command, args

    async def call(self, name: str, raw: Mapping[str, Any]) -> object:
        """Decode and run one command."""
        command, args = self.decode(name, raw)
        return await command.run(args)

    async def control(self, cmd: str, raw: dict[str, Any]) -> object:
        """The control socket's handler: unknown names answer as UnknownCommand."""
        if cmd not in self._commands:
            raise UnknownCommand(f"unknown command {cmd!r}; known: {', '.join(self.names)}")
        return await self.call(cmd, raw)

    async def mqtt(self, name: str, raw: dict[str, Any], ctx: CommandContext) -> object:
        """The MQTT bridge's handler (arguments already checked against the wire contract)."""
        log.info("mqtt_command", command=name, sender=ctx.sender, request_id=ctx.request_id)
        token = _mqtt_request.set(ctx)
        try:
            return await self.call(name, raw)
        finally:
            _mqtt_request.reset(token)


def _iccid(value: str) -> str:
    return value[:-1] if value[-1:] in ("F", "f") else value


class DaemonCommands:
    """The handlers, over the daemon's sessions, layers and policy."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def table(self) -> CommandTable:
        """Every command the daemon serves."""
        return CommandTable(
            [
                Command("status", NoArgs, self.status, "modems, layers, policy and transitions"),
                Command("switch_layer", SwitchLayerArgs, self.switch_layer, "pin or unpin"),
                Command("drill", NoArgs, self.drill, "move to the next usable layer now"),
                Command("profile_list", ModemArgs, self.profile_list, "read the profile list"),
                Command("profile_enable", ProfileChangeArgs, self.profile_enable, "safe switch"),
                Command("profile_disable", ProfileChangeArgs, self.profile_disable, "disable"),
                Command("profile_nickname", ProfileNicknameArgs, self.profile_nickname, "nickname"),
                Command("profile_delete", ProfileChangeArgs, self.profile_delete, "delete"),
                Command("euicc_info", ModemArgs, self.euicc_info, "EID and eUICC info"),
                Command("notification_list", ModemArgs, self.notification_list, "notifications"),
                Command(
                    "notification_process",
                    NotificationProcessArgs,
                    self.notification_process,
                    "send pending notifications to their SM-DP+ now",
                ),
                Command(
                    "notification_remove",
                    NotificationRemoveArgs,
                    self.notification_remove,
                    "remove a notification",
                ),
                Command("modem_info", ModemArgs, self.modem_info, "the modem's last poll"),
                Command("modems", NoArgs, self.modems, "what discovery sees (modem list)"),
                Command(
                    "profile_download",
                    ProfileDownloadArgs,
                    self.profile_download,
                    "download a profile by activation code",
                ),
                Command(
                    "profile_transfer",
                    TransferArgs,
                    self.profile_transfer,
                    "move a profile to another device (docs/transfer.md)",
                ),
                Command(
                    "profile_transfer_in",
                    TransferInArgs,
                    self.profile_transfer_in,
                    "a sibling's transfer: install, enable, verify",
                ),
            ]
        )

    # ---- helpers -------------------------------------------------------------------------

    def session(self, modem: str | None) -> ModemSession:
        """The modem by id or port; the only one when none is named."""
        sessions = self.d.sessions
        if modem is None:
            if len(sessions) == 1:
                return next(iter(sessions.values()))
            raise CommandRejected("invalid_payload", "name the modem")
        session = sessions.get(modem)
        if session is None:
            for s in sessions.values():
                if modem in (s.port, s.cfg.port):
                    return s
            raise CommandRejected("unknown_modem", f"no modem {modem!r}")
        return session

    @staticmethod
    def check_profile(session: ModemSession, iccid: str) -> None:
        """CommandRejected unless the modem's eUICC lists iccid."""
        if not any(p.iccid == iccid for p in session.profiles):
            raise CommandRejected("iccid_not_found", f"no profile {iccid} on {session.id}")

    def guard(self, session: ModemSession, iccid: str, verb: str, force: bool) -> None:
        """Refuse a profile change the policy owns: a layer's profile (above all the dormant
        emergency one) is enabled and disabled by the policy, asked through switch_layer."""
        affected = {iccid}
        if verb == "enable" and session.enabled_iccid is not None:
            affected.add(session.enabled_iccid)  # enabling one disables the running one
        owners = [x for x in self.d.cfg.layers if x.modem == session.id and x.profile in affected]
        if not owners:
            return
        names = ", ".join(f"{x.name} ({x.role})" for x in owners)
        if force:
            log.warning("profile_command_forced", verb=verb, iccid=iccid, layers=names)
            return
        raise CommandRejected(
            "not_allowed",
            f"{verb} {iccid} on {session.id} would change layer {names}, which the failover "
            "policy owns: use switch_layer (or --force on the CLI)",
        )

    # ---- handlers ------------------------------------------------------------------------

    async def modems(self, _: NoArgs) -> object:
        """`esim-agent modem list --json` as the daemon sees it (it holds the ports)."""
        from agent.daemon.devices import report
        from agent.transport.modemmanager import modemmanager_running

        d = self.d
        in_use = {s.id: s.port for s in d.sessions.values() if s.online and s.port}
        mm = await modemmanager_running(2.0, bus_address=d.cfg.discovery.dbus_address)
        return report(
            d.finder, d.cfg.modems, source=d.cfg.discovery.source, modemmanager=mm, in_use=in_use
        )

    async def status(self, _: NoArgs) -> object:
        """Everything `esim-agent status --json` shows."""
        d = self.d
        policy = d.policy
        layers = []
        for layer in d.cfg.layers:
            state, reason = d.fed.get(layer.name, ("unknown", "no_data"))
            mon = d.monitors[layer.name].snapshot() if layer.name in d.monitors else None
            profile = d.provision.profile_state(layer)
            layers.append(
                {
                    "name": layer.name,
                    "role": layer.role,
                    "modem": layer.modem,
                    "profile": layer.profile,
                    "device": layer.device,
                    "health": state,
                    "reason": reason,
                    "active": policy is not None and policy.active == layer.name,
                    "probe_interval_s": mon.round_interval_s if mon else None,
                    "probe_bytes": {"tx": mon.probe_tx_bytes, "rx": mon.probe_rx_bytes}
                    if mon
                    else None,
                    # This period's probe bytes from the ledger (in memory: no disk on the loop).
                    "probe_usage": d.metering.tracker.probe_snapshot(layer.name)
                    if d.metering is not None
                    else None,
                    # interface, addresses, metric, default, data (docs/network.md)
                    **d.link_status(layer.name),
                    # Is the layer's profile on the eUICC (store and forward, docs/downloads.md)
                    "profile_state": profile[0] if profile else None,
                    "profile_reason": profile[1] if profile else None,
                }
            )
        modems = []
        for s in d.sessions.values():
            entry = s.summary()
            entry["interface"] = d.interface(s.id)
            entry["info"] = self._info(s)
            entry["profiles"] = msgspec.to_builtins(s.profiles)
            modems.append(entry)
        return {
            "device_id": d.cfg.device_id,
            "active_layer": policy.active if policy else None,
            "phase": str(policy.phase) if policy else None,
            "layers": layers,
            # Sibling layers' view and the group claim (docs/siblings.md); None without [group].
            "group": d.siblings.status() if d.siblings.enabled else None,
            "modems": modems,
            "policy": summary(policy) if policy is not None else {},
            "tasks": d.supervisor.snapshot(),
            "timeline": d.timeline.recent(20),
            "notifications": d.courier.snapshot(),
            "uptime_s": round(time.time() - d.started_at, 1),
        }

    async def switch_layer(self, args: SwitchLayerArgs) -> object:
        """Pin a layer (null unpins) and wait for the resulting transition."""
        if args.layer is not None and args.layer not in self.d.monitors:
            raise CommandRejected("unknown_layer", f"no layer {args.layer!r}")
        result = await self.d.run_transition(ManualSwitch(layer=args.layer, now=time.monotonic()))
        result["pinned"] = self.d.policy.pinned if self.d.policy is not None else None
        return result

    async def drill(self, _: NoArgs) -> object:
        """Move to the next usable lower layer now, as a rehearsal."""
        return await self.d.run_transition(Drill(now=time.monotonic()))

    async def profile_list(self, args: ModemArgs) -> object:
        """Read the profile list again."""
        session = self.session(args.modem)
        return {"profiles": msgspec.to_builtins(await session.refresh_profiles())}

    async def profile_enable(self, args: ProfileChangeArgs) -> object:
        """Safe-switch a modem to a profile (a no-op when it already runs)."""
        session = self.session(args.modem)
        iccid = _iccid(args.iccid)
        self.check_profile(session, iccid)
        if session.enabled_iccid != iccid:
            self.guard(session, iccid, "enable", args.force)
        if session.switching:
            raise CommandRejected("busy", f"{session.id} is switching profiles right now")
        report = await self.d.switch_modem(session, iccid)
        return msgspec.to_builtins(report)

    async def profile_disable(self, args: ProfileChangeArgs) -> object:
        """Disable a profile no layer owns."""
        session = self.session(args.modem)
        iccid = _iccid(args.iccid)
        self.check_profile(session, iccid)
        self.guard(session, iccid, "disable", args.force)

        async def op(lpa: Lpa) -> None:
            await lpa.disable_profile(iccid)

        await session.with_lpa(op)
        return {"iccid": iccid, "state": "disabled"}

    async def profile_delete(self, args: ProfileChangeArgs) -> object:
        """Delete a profile no layer owns."""
        session = self.session(args.modem)
        iccid = _iccid(args.iccid)
        self.check_profile(session, iccid)
        self.guard(session, iccid, "delete", args.force)

        async def op(lpa: Lpa) -> None:
            await lpa.delete_profile(iccid)

        await session.with_lpa(op)
        return {"iccid": iccid, "deleted": True}

    async def profile_nickname(self, args: ProfileNicknameArgs) -> object:
        """Set a profile's nickname."""
        session = self.session(args.modem)
        iccid = _iccid(args.iccid)
        self.check_profile(session, iccid)
        if len(args.nickname.encode("utf-8")) > 64:
            raise CommandRejected("invalid_payload", "nickname exceeds 64 UTF-8 bytes")

        async def op(lpa: Lpa) -> None:
            await lpa.set_nickname(iccid, args.nickname)

        await session.with_lpa(op)
        return {"iccid": iccid, "nickname": args.nickname}

    async def euicc_info(self, args: ModemArgs) -> object:
        """EID, versions and capacities."""
        session = self.session(args.modem)

        async def op(lpa: Lpa) -> object:
            return await lpa.info()

        return msgspec.to_builtins(await session.with_lpa(op))

    async def notification_list(self, args: ModemArgs) -> object:
        """Notifications queued for the SM-DP+."""
        session = self.session(args.modem)

        async def op(lpa: Lpa) -> object:
            return await lpa.list_notifications()

        return {"notifications": msgspec.to_builtins(await session.with_lpa(op))}

    async def notification_process(self, args: NotificationProcessArgs) -> object:
        """Send pending notifications now (the courier does it on its own as well)."""
        session = self.session(args.modem)
        if session.switching:
            raise CommandRejected("busy", f"{session.id} is switching profiles right now")
        outcomes = await self.d.courier.process_now(session, args.seq_number)
        return {"notifications": msgspec.to_builtins(outcomes)}

    async def notification_remove(self, args: NotificationRemoveArgs) -> object:
        """Remove one notification."""
        session = self.session(args.modem)
        seq = args.seq_number

        async def op(lpa: Lpa) -> None:
            await lpa.remove_notification(seq)

        await session.with_lpa(op)
        return {"seq_number": seq, "removed": True}

    async def modem_info(self, args: ModemArgs) -> object:
        """The modem's last poll (and ask for a fresh one)."""
        session = self.session(args.modem)
        session.poll_soon()
        return self._info(session)

    def _info(self, session: ModemSession) -> object:
        """`modem info`'s keys, with the modem's network interface."""
        if session.info is None:
            return None
        info = msgspec.structs.replace(session.info, interface=self.d.interface(session.id))
        return msgspec.to_builtins(info)

    async def profile_download(self, args: ProfileDownloadArgs) -> object:
        """Download (and with `enable` switch to) a profile over the active layer; progress
        goes to the control socket's caller and, throttled, to MQTT events."""
        try:
            code = parse_activation_code(args.code)
        except ActivationCodeError as exc:
            raise CommandRejected("invalid_payload", f"activation code: {exc}") from None
        session = self.session(args.modem)
        if args.enable:
            # Enabling the new profile disables the running one: not one a layer owns.
            owners = [
                x.name
                for x in self.d.cfg.layers
                if x.modem == session.id and x.profile == session.enabled_iccid
            ]
            if owners:
                raise CommandRejected(
                    "not_allowed",
                    f"enable after download would disable {session.enabled_iccid} of layer "
                    f"{', '.join(owners)} on {session.id}, which the failover policy owns",
                )
        ctx = _mqtt_request.get()
        sink = progress_sink()
        events = self.d.provision.progress_events(session.id, ctx.request_id if ctx else None)
        throttle = ProgressThrottle()

        def progress(phase: Phase, done: int, total: int) -> None:
            events(phase, done, total)
            if sink is not None and throttle.admit(phase, done, total, time.monotonic()):
                sink({"phase": phase.value, "bytes": done, "total": total})

        try:
            installed = await self.d.provision.download(
                code,
                confirmation_code=args.confirmation_code,
                modem=session.id,
                enable=args.enable,
                on_progress=progress,
            )
        except (NoWorkingLink, LinkLost, DownloadBusy) as exc:
            raise CommandRejected(exc.code, str(exc).removeprefix("no working link: ")) from None
        return msgspec.to_builtins(installed)

    async def profile_transfer(self, args: TransferArgs) -> object:
        """Move a profile to another device: the target verifies before the source lets go."""
        return await self.d.transfers.start(args)

    async def profile_transfer_in(self, args: TransferInArgs) -> object:
        """The target's side of a transfer."""
        return await self.d.transfers.receive(args)
