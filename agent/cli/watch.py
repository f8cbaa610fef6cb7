"""`esim-agent watch [--config FILE | --broker URL] [--json]`: every agent on the broker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import TYPE_CHECKING

from agent.cli.args import positive_seconds
from agent.cli.output import error, print_json

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from agent.mqtt.bridge import MqttSettings
    from agent.watch.fleet import Fleet

EXIT_RUNTIME = 1
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_BASE = "esim-agent"
#: Only when our marker cannot come back (an ACL that forbids the viewer to write under its
#: own tree): this long a gap in the retained messages ends the snapshot.
DEFAULT_QUIET_S = 1.0
#: Shortest time between two redraws: a burst of retained messages paints once, not 1,000 times.
MIN_FRAME_S = 0.1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `watch` command."""
    p = sub.add_parser(
        "watch",
        help="live view of every agent on the broker (or --json: one snapshot)",
        description="Subscribe to every device's retained state under the base topic and show "
        "availability, active layer and profile, signal, usage against quota and pool, the last "
        "transition and open alerts. Redraws on change; Ctrl-C quits (exit 0).",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--config", metavar="FILE", help="take broker, credentials, TLS and base topic from here"
    )
    g.add_argument(
        "--broker",
        metavar="URL",
        help=f"mqtt://[user[:pass]@]host[:port] or mqtts://… (default {DEFAULT_BROKER})",
    )
    p.add_argument(
        "--base-topic", default=None, help=f"base topic (default: the config's, or {DEFAULT_BASE})"
    )
    p.add_argument("--tls-ca", metavar="FILE", help="CA file for an mqtts:// --broker")
    p.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    p.add_argument(
        "--quiet-period",
        type=positive_seconds,
        default=DEFAULT_QUIET_S,
        metavar="SECONDS",
        help="--json: when the broker does not echo our marker, snapshot once no message "
        f"arrived for this long (default {DEFAULT_QUIET_S})",
    )
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="--json: print what arrived after this long, with complete: false (default 10)",
    )
    p.set_defaults(handler=_watch)


def _settings(args: argparse.Namespace) -> MqttSettings:
    from agent.config import load_config
    from agent.mqtt.reach import settings_from_config, settings_from_url

    if args.config:
        cfg = load_config(args.config)
        settings = settings_from_config(cfg, args.config)
        if args.base_topic:
            from dataclasses import replace

            settings = replace(settings, base_topic=args.base_topic)
        return settings
    return settings_from_url(
        args.broker or DEFAULT_BROKER,
        base_topic=args.base_topic or DEFAULT_BASE,
        tls_ca=args.tls_ca,
    )


def _watch(args: argparse.Namespace) -> int:
    from agent.config import EX_CONFIG
    from agent.errors import ConfigError
    from agent.mqtt.reach import BrokerUnreachable
    from agent.watch.fleet import Fleet

    try:
        settings = _settings(args)
    except ConfigError as exc:
        error(str(exc), "config")
        return EX_CONFIG
    fleet = Fleet(settings.base_topic)
    broker = f"{settings.host}:{settings.port}"
    if args.json:
        from agent.watch.session import snapshot

        try:
            run = asyncio.run(
                snapshot(settings, fleet, quiet=args.quiet_period, timeout=args.timeout)
            )
        except BrokerUnreachable as exc:
            error(str(exc), "broker")
            return EXIT_RUNTIME
        print_json(fleet.snapshot(broker=broker, complete=run.complete, settled=run.settled))
        return 0
    asyncio.run(_live(settings, fleet, broker))
    return 0


async def _live(
    settings: MqttSettings, fleet: Fleet, broker: str, console: Console | None = None
) -> None:
    """The live view until Ctrl-C or SIGTERM: one frame per change of what it shows, never on
    a timer (a burst of changes is painted at most every MIN_FRAME_S)."""
    from rich.console import Console
    from rich.live import Live

    from agent.watch.render import render
    from agent.watch.session import follow

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Ctrl-C and SIGTERM end the view through the loop, so Live restores the terminal and the
    # exit status is 0 rather than a KeyboardInterrupt's 130.
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    changed = asyncio.Event()
    problem: list[str | None] = [None]

    def on_change(why: str | None) -> None:
        problem[0] = why
        changed.set()

    shown: list[object] = [None]

    def frame() -> RenderableType | None:
        """The next frame, or None when it would show exactly what is on screen (a message
        may change a field the view does not show, such as a record's `updated_at`)."""
        snap = fleet.snapshot(broker=broker, complete=True)
        key = ({k: v for k, v in snap.items() if k != "taken_at"}, problem[0])
        if key == shown[0]:
            return None
        shown[0] = key
        return render(snap, problem[0])

    with Live(
        frame() or "",
        console=console or Console(),
        screen=True,
        auto_refresh=False,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as live:
        follower = asyncio.create_task(follow(settings, fleet, on_change), name="watch-follow")
        stopped = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                woken = asyncio.create_task(changed.wait())
                await asyncio.wait({woken, stopped, follower}, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if stop.is_set():
                    break
                if follower.done():
                    follower.result()  # a bug, not the broker: end the view and report it
                changed.clear()
                if (next_frame := frame()) is None:
                    continue
                live.update(next_frame, refresh=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopped), MIN_FRAME_S)
        finally:
            follower.cancel()
            stopped.cancel()
            await asyncio.gather(follower, stopped, return_exceptions=True)
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
