"""`esim-agent euicc|profile|notification`: the LPA on a modem's AT port."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from agent.cli import transfer as transfer_cli
from agent.cli.args import add_vendor, iccid, positive_seconds
from agent.cli.output import error, print_json, print_sections, print_table
from agent.cli.port import describe
from agent.errors import AgentError

Action = Callable[[Any, Any], Awaitable[Any]]  # (lpa, modem) -> result

_EXIT_RUNTIME = 1
_EXIT_USAGE = 2


_FORCE_HELP = (
    "through the daemon: change a profile a failover layer owns anyway (normally refused: "
    "use `esim-agent switch`)"
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the euicc, profile and notification command groups."""
    euicc = subparsers.add_parser("euicc", help="the eUICC itself")
    euicc_sub = euicc.add_subparsers(dest="euicc_command", metavar="ACTION", required=True)
    _common(euicc_sub.add_parser("info", help="EID, versions, free memory")).set_defaults(
        handler=_info
    )

    profile = subparsers.add_parser("profile", help="eSIM profiles on the eUICC")
    psub = profile.add_subparsers(dest="profile_command", metavar="ACTION", required=True)
    _common(psub.add_parser("list", help="installed profiles")).set_defaults(handler=_list)
    p = _common(psub.add_parser("enable", help="enable a profile (disables the current one)"))
    _iccid_positional(p, "the profile to enable")
    p.add_argument(
        "--no-refresh",
        action="store_true",
        help="only switch on the card; the modem keeps the old profile until it restarts "
        "(same as --strategy none)",
    )
    p.add_argument("--safe", action="store_true", help="verify the new link, roll back if not")
    p.add_argument(
        "--rollback-timeout",
        type=positive_seconds,
        default=120.0,
        metavar="S",
        help="with --safe: seconds the new profile has to work before the old one comes back",
    )
    p.add_argument(
        "--strategy",
        choices=("auto", "none", "refresh", "cfun", "reset"),
        default="auto",
        help="how the modem takes the new profile: refresh (the eUICC's REFRESH), cfun "
        "(radio off/on), reset (modem restart), none (nothing); default auto, the vendor's",
    )
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(handler=_enable)
    p = _common(psub.add_parser("disable", help="disable a profile (leaves none enabled)"))
    _iccid_positional(p, "the profile to disable")
    p.add_argument(
        "--no-refresh", action="store_true", help="do not ask the modem to re-read the card"
    )
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(handler=_disable)
    p = _common(psub.add_parser("nickname", help="set a profile's nickname"))
    _iccid_positional(p, "the profile to name")
    p.add_argument("nickname", help="the new nickname (at most 64 bytes of UTF-8)")
    p.set_defaults(handler=_nickname)
    p = _common(psub.add_parser("delete", help="delete a disabled profile for good"))
    _iccid_positional(p, "the profile to delete")
    p.add_argument("--yes", action="store_true", help="confirm the deletion")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p.set_defaults(handler=_delete)

    p = _common(
        psub.add_parser("download", help="download and install a profile from an activation code")
    )
    p.add_argument(
        "--code",
        required=True,
        help="activation code as printed or scanned, e.g. 'LPA:1$smdp.example.com$MATCHING-ID'",
    )
    p.add_argument(
        "--confirmation-code", default=None, metavar="C", help="the operator's confirmation code"
    )
    _es9_options(p)
    p.add_argument(
        "--bpp-apdu-timeout",
        type=positive_seconds,
        default=240.0,
        metavar="S",
        help="deadline of one APDU while the profile package loads (default 240)",
    )
    p.add_argument(
        "--modem",
        default=None,
        metavar="ID",
        help="with --socket: the daemon's modem (id or port) to install onto; may be left out "
        "when the daemon has one modem",
    )
    for action in p._actions:
        if action.dest == "timeout":  # a download takes minutes over a slow modem
            action.default = 900.0
            action.help = "overall deadline in seconds (default 900)"
        elif action.dest == "port":  # --socket alone: the daemon downloads on its own modem
            action.required = False
            action.help = "serial port of the modem's AT interface (or give --socket)"
    p.set_defaults(handler=_download)
    transfer_cli.register(psub)

    notes = subparsers.add_parser("notification", help="notifications queued for the SM-DP+")
    nsub = notes.add_subparsers(dest="notification_command", metavar="ACTION", required=True)
    _common(nsub.add_parser("list", help="queued notifications")).set_defaults(handler=_nlist)
    p = _common(nsub.add_parser("process", help="send pending notifications to their SM-DP+"))
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every pending notification")
    which.add_argument("seq", type=int, nargs="?", help="one notification's sequence number")
    _es9_options(p)
    p.set_defaults(handler=_nprocess)
    p = _common(nsub.add_parser("remove", help="remove a notification (after it was sent)"))
    p.add_argument("seq", type=int, help="the notification's sequence number (from list)")
    p.set_defaults(handler=_nremove)


def _es9_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resolve",
        action="append",
        default=[],
        metavar="HOST:PORT:ADDR",
        help="connect to ADDR for the SM-DP+ HOST:PORT (test networks; TLS still checks HOST)",
    )
    p.add_argument(
        "--ci-cert",
        action="append",
        default=[],
        metavar="PEM",
        help="CI root certificate(s) the SM-DP+ TLS certificate must chain to, repeatable "
        "(required: no GSMA CI is bundled; default $ESIM_AGENT_CI_CERTS, colon-separated)",
    )


def _aid(text: str) -> str:
    """argparse type: an AID is 5 to 16 bytes of hex (ISO 7816-4)."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not hex: {text!r}") from None
    if not 5 <= len(raw) <= 16:
        raise argparse.ArgumentTypeError("an AID is 5 to 16 bytes")
    return raw.hex().upper()


def _iccid_positional(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "iccid", type=iccid, help=f"{what}: ICCID, 18-20 digits with an optional trailing F"
    )


def _common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--port", required=True, help="serial port of the modem's AT interface")
    p.add_argument("--json", action="store_true", help="print JSON (stable field names)")
    add_vendor(p)
    p.add_argument(
        "--aid", type=_aid, default=None, help="ISD-R AID in hex (removable eUICCs differ)"
    )
    p.add_argument(
        "--apdu-mode",
        choices=("auto", "cgla", "csim"),
        default="auto",
        help="how APDUs reach the card: logical channel (AT+CGLA), basic channel (AT+CSIM), "
        "or auto (default: try CGLA first)",
    )
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=120.0,
        metavar="S",
        help="overall deadline in seconds (default 120)",
    )
    p.add_argument(
        "--socket",
        default=None,
        help="a running daemon's control socket; when that daemon owns --port the command "
        "goes through it instead of fighting it for the port (default $ESIM_AGENT_SOCKET "
        "or /run/esim-agent/control.sock)",
    )
    return p


async def _session(args: argparse.Namespace, action: Action) -> Any:
    """Open the modem and the ISD-R channel, run action, close both whatever happens."""
    from agent.cli.port import cli_modem
    from agent.euicc.lpa import Lpa
    from agent.euicc.transport import ISD_R_AID, AtApduTransport

    aid = bytes.fromhex(args.aid) if args.aid else ISD_R_AID
    mode = None if args.apdu_mode == "auto" else args.apdu_mode
    async with asyncio.timeout(args.timeout), cli_modem(args.port, args.vendor) as modem:
        transport = AtApduTransport(modem.channel, modem.port, aid=aid, mode=mode)
        async with Lpa(transport) as lpa:
            return await action(lpa, modem)


_NOT_ROUTED = object()


class DaemonRefused(AgentError):
    """The daemon that owns the port answered with an error."""


def _fail(args: argparse.Namespace, exc: AgentError) -> int:
    """Report a failure as one line (or JSON); the exit status for a runtime error."""
    if isinstance(exc, DaemonRefused):
        error(str(exc), "daemon")
    else:
        code, message = describe(exc, args.port)
        error(message, code)
    return _EXIT_RUNTIME


def _via_daemon(args: argparse.Namespace, cmd: str, cmd_args: dict[str, Any]) -> Any:
    """The daemon's answer when a daemon owns args.port; _NOT_ROUTED when none does."""
    from pathlib import Path

    from agent.cli.daemon import call_daemon, default_socket
    from agent.daemon.control import ControlError, DaemonNotRunning

    socket = args.socket or default_socket()
    if not Path(socket).exists():
        return _NOT_ROUTED
    try:
        return call_daemon(socket, cmd, {"modem": args.port, **cmd_args})
    except DaemonNotRunning:
        return _NOT_ROUTED
    except ControlError as exc:
        if exc.message.startswith("unknown_modem"):
            return _NOT_ROUTED  # the daemon runs, but not on this port
        raise DaemonRefused(f"{args.port} (via daemon): {exc.message}") from exc


def _run(
    args: argparse.Namespace,
    action: Action,
    render: Callable[[Any], None],
    daemon: tuple[str, dict[str, Any]] | None = None,
    convert: Callable[[Any], Any] = lambda value: value,
) -> int:
    if daemon is not None:
        try:
            routed = _via_daemon(args, *daemon)
        except AgentError as exc:
            return _fail(args, exc)
        if routed is not _NOT_ROUTED:
            result = convert(routed)
            if args.json:
                print_json(result)
            else:
                render(result)
            return 0
    try:
        result = asyncio.run(_session(args, action))
    except AgentError as exc:
        return _fail(args, exc)
    except TimeoutError:
        error(f"{args.port}: no result within {args.timeout:g} s", "timeout")
        return _EXIT_RUNTIME
    if args.json:
        print_json(result)
    else:
        render(result)
    return 0


def _forced(args: argparse.Namespace) -> dict[str, Any]:
    # Sent only when asked: a daemon that predates --force still takes the request.
    return {"force": True} if getattr(args, "force", False) else {}


def _info(args: argparse.Namespace) -> int:
    async def action(lpa: Any, _modem: Any) -> Any:
        return await lpa.info()

    def render(info: Any) -> None:
        import msgspec

        items = list(msgspec.structs.asdict(info).items())
        print_sections(
            [("eUICC", [(k, ", ".join(v) if isinstance(v, list) else v) for k, v in items])]
        )

    def convert(value: Any) -> Any:
        import msgspec

        from agent.euicc.lpa import EuiccInfo

        return msgspec.convert(value, EuiccInfo)

    return _run(args, action, render, ("euicc_info", {}), convert)


def _list(args: argparse.Namespace) -> int:
    async def action(lpa: Any, _modem: Any) -> Any:
        return {"profiles": await lpa.list_profiles()}

    def render(result: Any) -> None:
        rows = [
            (p.iccid, p.state, p.profile_class, p.nickname, p.service_provider_name, p.profile_name)
            for p in result["profiles"]
        ]
        print_table(("iccid", "state", "class", "nickname", "provider", "name"), rows)

    def convert(value: Any) -> Any:
        import msgspec

        from agent.euicc.es10 import ProfileInfo

        return {"profiles": msgspec.convert(value["profiles"], list[ProfileInfo])}

    return _run(args, action, render, ("profile_list", {}), convert)


def _enable(args: argparse.Namespace) -> int:
    iccid: str = args.iccid
    try:
        routed = _via_daemon(args, "profile_enable", {"iccid": iccid, **_forced(args)})
    except AgentError as exc:
        return _fail(args, exc)
    if routed is not _NOT_ROUTED:
        # The daemon always switches safely: verified, with rollback.
        import msgspec

        from agent.euicc.switch import SwitchReport

        return _print_report(args, msgspec.convert(routed, SwitchReport))
    if args.safe:
        return _safe_enable(args, iccid)

    async def action(lpa: Any, modem: Any) -> Any:
        from agent.cli.progress import spinner
        from agent.euicc.switch import kick_modem

        strategy = _strategy(args, modem)
        with spinner(f"enabling {iccid}") as status:
            changed = await lpa.enable_profile(iccid, refresh=strategy.value != "none")
            if changed:
                # Without this a Sierra or Dell modem keeps searching on the old profile's
                # settings until someone resets it: the card switched, the modem did not.
                status.update(f"{iccid} enabled; the modem takes it ({strategy.value})")
                await kick_modem(modem, strategy)
        return {"iccid": iccid, "state": "enabled", "changed": changed, "strategy": strategy.value}

    def render(result: Any) -> None:
        note = "" if result["changed"] else " (already enabled)"
        print(f"{iccid} enabled{note}")

    return _run(args, action, render)


def _strategy(args: argparse.Namespace, modem: Any) -> Any:
    """The refresh strategy the command line asks for: --no-refresh, --strategy, or the vendor's."""
    from agent.euicc.switch import RefreshStrategy

    if args.no_refresh:
        return RefreshStrategy.NONE
    if args.strategy == "auto":
        return RefreshStrategy.from_vendor(modem.vendor.refresh)
    return RefreshStrategy(args.strategy)


def _safe_enable(args: argparse.Namespace, iccid: str) -> int:
    from agent.cli.port import cli_modem
    from agent.cli.progress import spinner
    from agent.euicc.lpa import Lpa
    from agent.euicc.switch import SafeSwitch, SwitchReport
    from agent.euicc.transport import ISD_R_AID, AtApduTransport

    aid = bytes.fromhex(args.aid) if args.aid else ISD_R_AID
    mode = None if args.apdu_mode == "auto" else args.apdu_mode
    phases = {
        "enable": f"enabling {iccid}",
        "refresh": "the modem takes the new profile",
        "reattach": "waiting for the network to register the new profile",
        "verify": "verifying the data path",
        "rollback": "rolling back to the previous profile",
    }

    async def run() -> SwitchReport:
        async with cli_modem(args.port, args.vendor) as modem:
            with spinner(phases["enable"]) as status:
                switch = SafeSwitch(
                    modem,
                    lambda: Lpa(AtApduTransport(modem.channel, modem.port, aid=aid, mode=mode)),
                    strategy=_strategy(args, modem),
                    rollback_timeout=args.rollback_timeout,
                    on_phase=lambda phase: status.step(phases.get(phase, phase)),
                )
                return await switch.run(iccid)

    try:
        report = asyncio.run(run())
    except AgentError as exc:
        return _fail(args, exc)
    except TimeoutError:
        error(f"{args.port}: the switch did not finish", "timeout")
        return _EXIT_RUNTIME
    return _print_report(args, report)


def _print_report(args: argparse.Namespace, report: Any) -> int:
    if args.json:
        print_json(report)
    else:
        print(f"{report.outcome}: {report.from_iccid} -> {report.to_iccid}")
        if report.error:
            print(f"error: {report.error}")
    return 0 if report.outcome == "switched" else _EXIT_RUNTIME


def _disable(args: argparse.Namespace) -> int:
    iccid: str = args.iccid

    async def action(lpa: Any, _modem: Any) -> Any:
        await lpa.disable_profile(iccid, refresh=not args.no_refresh)
        return {"iccid": iccid, "state": "disabled"}

    return _run(
        args,
        action,
        lambda r: print(f"{r['iccid']} disabled"),
        ("profile_disable", {"iccid": iccid, **_forced(args)}),
    )


def _nickname(args: argparse.Namespace) -> int:
    iccid: str = args.iccid
    if len(args.nickname.encode("utf-8")) > 64:
        error("nickname is limited to 64 bytes of UTF-8", "usage")
        return _EXIT_USAGE

    async def action(lpa: Any, _modem: Any) -> Any:
        await lpa.set_nickname(iccid, args.nickname)
        return {"iccid": iccid, "nickname": args.nickname}

    return _run(
        args,
        action,
        lambda r: print(f"{r['iccid']} nickname set to {r['nickname']!r}"),
        ("profile_nickname", {"iccid": iccid, "nickname": args.nickname}),
    )


def _delete(args: argparse.Namespace) -> int:
    iccid: str = args.iccid
    if not args.yes:
        error(f"deleting {iccid} cannot be undone: add --yes to confirm", "usage")
        return _EXIT_USAGE

    async def action(lpa: Any, _modem: Any) -> Any:
        await lpa.delete_profile(iccid)
        return {"iccid": iccid, "deleted": True}

    return _run(
        args,
        action,
        lambda r: print(f"{r['iccid']} deleted"),
        ("profile_delete", {"iccid": iccid, **_forced(args)}),
    )


def _nlist(args: argparse.Namespace) -> int:
    async def action(lpa: Any, _modem: Any) -> Any:
        return {"notifications": await lpa.list_notifications()}

    def render(result: Any) -> None:
        rows = [
            (n.seq_number, n.profile_management_operation, n.iccid, n.notification_address)
            for n in result["notifications"]
        ]
        print_table(("seq", "operation", "iccid", "address"), rows)

    def convert(value: Any) -> Any:
        import msgspec

        from agent.euicc.es10 import NotificationMetadata

        return {
            "notifications": msgspec.convert(value["notifications"], list[NotificationMetadata])
        }

    return _run(args, action, render, ("notification_list", {}), convert)


def _nremove(args: argparse.Namespace) -> int:
    async def action(lpa: Any, _modem: Any) -> Any:
        await lpa.remove_notification(args.seq)
        return {"seq_number": args.seq, "removed": True}

    return _run(
        args,
        action,
        lambda r: print(f"notification {r['seq_number']} removed"),
        ("notification_remove", {"seq_number": args.seq}),
    )


def _ci_certs(args: argparse.Namespace) -> list[str]:
    import os

    if args.ci_cert:
        return list(args.ci_cert)
    env = os.environ.get("ESIM_AGENT_CI_CERTS", "")
    return [p for p in env.split(":") if p]


class _DownloadView:
    """A rich progress bar (phase and package bytes) on a terminal; nothing otherwise."""

    def __init__(self) -> None:
        from agent.cli.progress import interactive

        self._progress: Any = None
        self._task: Any = None
        if interactive():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description:<12}"),
                BarColumn(),
                DownloadColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self) -> _DownloadView:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("authenticate", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, phase: Any, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, description=str(phase), completed=done, total=total or None
            )


def _download(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent.euicc.activation import ActivationCodeError, parse_activation_code
    from agent.euicc.es9 import Es9Client, Resolve

    try:
        code = parse_activation_code(args.code)
        resolve = [Resolve.parse(r) for r in args.resolve]
    except (ActivationCodeError, AgentError) as exc:
        error(str(exc), "usage")
        return _EXIT_USAGE
    if args.socket is not None:
        return _download_via_daemon(args)
    if args.port is None:
        error("give --port (the modem's AT port) or --socket (a running daemon)", "usage")
        return _EXIT_USAGE
    certs = _ci_certs(args)
    if not certs:
        error(
            "no CI root certificate: pass --ci-cert PEM (or set ESIM_AGENT_CI_CERTS); "
            "no GSMA CI certificate is bundled",
            "config",
        )
        return _EXIT_USAGE
    try:
        es9 = Es9Client(code.smdp_address, [Path(c) for c in certs], resolve=resolve)
    except AgentError as exc:
        error(str(exc), "config")
        return _EXIT_USAGE

    async def action(lpa: Any, modem: Any) -> Any:
        from agent.euicc.download import DEFAULT_TAC, Downloader, tac_from_imei

        tac = DEFAULT_TAC
        with contextlib.suppress(AgentError):
            # DeviceInfo names the device by its TAC (the IMEI's first 8 digits).
            tac = tac_from_imei((await modem.identity()).imei) or DEFAULT_TAC
        with _DownloadView() as view:
            return await Downloader(
                lpa,
                es9,
                code,
                confirmation_code=args.confirmation_code,
                tac=tac,
                progress=view.update,
                bpp_apdu_timeout=args.bpp_apdu_timeout,
            ).run()

    def render(result: Any) -> None:
        what = ", ".join(x for x in (result.profile_name, result.service_provider_name) if x)
        print(f"{result.iccid} installed{f' ({what})' if what else ''} from {result.smdp_address}")
        if not result.notification_sent:
            print("the install notification is still pending: `esim-agent notification list`")

    return _run(args, action, render)


def _render_download(result: dict[str, Any]) -> None:
    what = ", ".join(
        x for x in (result.get("profile_name"), result.get("service_provider_name")) if x
    )
    print(
        f"{result.get('iccid')} installed on {result.get('modem')}{f' ({what})' if what else ''} "
        f"from {result.get('smdp_address')} over layer {result.get('layer')}"
    )
    if not result.get("notification_sent"):
        print("the install notification is still pending: `esim-agent notification list`")


def _download_via_daemon(args: argparse.Namespace) -> int:
    """`profile download --socket`: the daemon downloads over its active layer; its progress
    lines drive the same progress bar."""
    from agent.cli.daemon import EXIT_NO_DAEMON
    from agent.daemon.control import ControlError, DaemonNotRunning, control_call

    cmd_args: dict[str, Any] = {"code": args.code, "modem": args.modem or args.port}
    if args.confirmation_code:
        cmd_args["confirmation_code"] = args.confirmation_code
    with _DownloadView() as view:

        def progress(data: object) -> None:
            if isinstance(data, dict):
                done, total = data.get("bytes"), data.get("total")
                view.update(
                    str(data.get("phase", "")),
                    done if isinstance(done, int) else 0,
                    total if isinstance(total, int) else 0,
                )

        try:
            result = asyncio.run(
                control_call(
                    args.socket,
                    "profile_download",
                    cmd_args,
                    timeout=args.timeout,
                    on_progress=progress,
                )
            )
        except DaemonNotRunning as exc:
            error(f"no daemon answers on {args.socket}: {exc.message}", "no_daemon")
            return EXIT_NO_DAEMON
        except ControlError as exc:
            error(f"profile download (via daemon): {exc.message}", "daemon")
            return _EXIT_RUNTIME
    if args.json:
        print_json(result)
    elif isinstance(result, dict):
        _render_download(result)
    return 0


def _nprocess(args: argparse.Namespace) -> int:
    from pathlib import Path

    import msgspec

    from agent.euicc.es9 import Es9Client, Resolve
    from agent.euicc.notifications import NotificationOutcome

    seq = None if args.all else args.seq
    try:
        # A daemon that owns the port sends them itself, with its own [rsp] settings.
        routed = _via_daemon(args, "notification_process", {"seq_number": seq})
    except AgentError as exc:
        return _fail(args, exc)
    if routed is not _NOT_ROUTED:
        outcomes = msgspec.convert(routed["notifications"], list[NotificationOutcome])
        return _nprocess_result(args, {"notifications": outcomes})
    try:
        resolve = [Resolve.parse(r) for r in args.resolve]
    except AgentError as exc:
        error(str(exc), "usage")
        return _EXIT_USAGE
    certs = [Path(c) for c in _ci_certs(args)]
    if not certs:
        error(
            "no CI root certificate: pass --ci-cert PEM (or set ESIM_AGENT_CI_CERTS); "
            "no GSMA CI certificate is bundled",
            "config",
        )
        return _EXIT_USAGE

    async def action(lpa: Any, _modem: Any) -> Any:
        from agent.euicc.notifications import process_notifications

        return {
            "notifications": await process_notifications(
                lpa, lambda address: Es9Client(address, certs, resolve=resolve), seq
            )
        }

    try:
        result = asyncio.run(_session(args, action))
    except AgentError as exc:
        return _fail(args, exc)
    except TimeoutError:
        error(f"{args.port}: no result within {args.timeout:g} s", "timeout")
        return _EXIT_RUNTIME
    return _nprocess_result(args, result)


def _nprocess_result(args: argparse.Namespace, result: Any) -> int:
    def render(result: Any) -> None:
        rows = [
            (
                n.seq_number,
                n.operation,
                n.iccid,
                n.address,
                "removed" if n.removed else ("sent" if n.sent else "kept"),
                n.error,
            )
            for n in result["notifications"]
        ]
        print_table(("seq", "operation", "iccid", "address", "result", "error"), rows)

    if args.json:
        print_json(result)
    else:
        render(result)
    return 0 if all(n.removed for n in result["notifications"]) else _EXIT_RUNTIME
