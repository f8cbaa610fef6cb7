"""The live view: one rich table row per device, built from a Fleet snapshot (pure)."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from agent.watch.fleet import MAX_BARS

BAR_WIDTH = 10
_SIGNAL_GLYPHS = "▁▃▅▇"


def signal_text(bars: int | None) -> Text:
    """`▁▃▅▇` with the lit bars coloured; `-` when the modem gives no signal."""
    if bars is None:
        return Text("-", style="dim")
    text = Text()
    for i, glyph in enumerate(_SIGNAL_GLYPHS[:MAX_BARS]):
        text.append(glyph, style="green" if i < bars else "grey35")
    text.append(f" {bars}/{MAX_BARS}")
    return text


def usage_bar(label: str, used: int, quota: int | None, percent: float | None) -> Text:
    """`label [#####.....] 52% 1.2/2.0 GB`; without a quota just the bytes used."""
    text = Text(f"{label} ")
    if quota is None or percent is None:
        text.append(human_bytes(used))
        return text
    filled = max(0, min(BAR_WIDTH, round(percent / 100 * BAR_WIDTH)))
    style = "red" if percent >= 90 else "yellow" if percent >= 75 else "green"
    text.append("█" * filled, style=style)
    text.append("░" * (BAR_WIDTH - filled), style="grey35")
    text.append(f" {percent:.0f}% {human_bytes(used)}/{human_bytes(quota)}")
    return text


def human_bytes(n: int) -> str:
    """Bytes in B/kB/MB/GB (decimal, as carriers bill)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _availability(device: dict[str, Any]) -> Text:
    avail = device["availability"]
    if avail == "online":
        net = "connected" if device["connectivity"] else "no data"
        return Text(f"online, {net}", style="green" if device["connectivity"] else "yellow")
    if avail == "offline":
        return Text("offline", style="bold red")
    return Text("unknown", style="dim")


def _transition(record: dict[str, Any] | None) -> Text:
    if record is None:
        return Text("-", style="dim")
    timings = record.get("timings_ms") or {}
    total = timings.get("total")
    text = Text(f"{record.get('kind') or '?'} {record.get('from_layer')}→{record.get('to_layer')}")
    text.append(f" {record.get('outcome') or '?'}")
    if total is not None:
        text.append(f" {total:.0f} ms")
        parts = [
            f"{timings[k]:.0f}"
            for k in ("detect_to_decide", "decide_to_switch", "switch_to_verify")
            if timings.get(k) is not None
        ]
        if parts:
            text.append(f" ({'+'.join(parts)})", style="dim")
    # When, on the device's wall clock: `HH:MM:SS` of an ISO 8601 UTC time.
    at = record.get("verified_at") or record.get("switched_at") or record.get("detected_at")
    if isinstance(at, str) and "T" in at:
        text.append(f"\nat {at.partition('T')[2][:8]}Z", style="dim")
    return text


def device_row(device: dict[str, Any]) -> list[RenderableType]:
    """The cells of one device's row."""
    layer = device["active_layer"] or "-"
    profile = device["active_profile"] or "-"
    signal = Text("\n").join(
        Text.assemble(f"{m['id']} ", signal_text(m["signal_bars"])) for m in device["modems"]
    ) or Text("-", style="dim")
    bars = [
        usage_bar(u["iccid"][-4:], u["total_bytes"], u["quota_bytes"], u["percent"])
        for u in device["usage"]
    ] + [
        usage_bar(f"pool {p['name']}", p["total_bytes"], p["quota_bytes"], p["percent"])
        for p in device["pools"]
    ]
    alerts = Text("\n").join(
        Text(f"{a['kind']} {a['subject']}", style="red") for a in device["alerts"]
    ) or Text("-", style="dim")
    return [
        Text(device["device_id"], style="bold"),
        _availability(device),
        Text(f"{layer}\n{profile}"),
        signal,
        Text("\n").join(bars) if bars else Text("-", style="dim"),
        _transition(device["last_transition"]),
        alerts,
    ]


def render(snapshot: dict[str, Any], problem: str | None = None) -> RenderableType:
    """The whole screen for one `Fleet.snapshot()`."""
    table = Table(
        title=f"esim-agent watch · {snapshot['broker']} · {snapshot['base_topic']}/+",
        expand=True,
    )
    for header in (
        "device",
        "availability",
        "layer / profile",
        "signal",
        "usage",
        "last transition",
        "alerts",
    ):
        table.add_column(header)
    for device in snapshot["devices"]:
        table.add_row(*device_row(device))
    footer = Text(f"{len(snapshot['devices'])} devices · Ctrl-C to quit", style="dim")
    if snapshot["rejected"]:
        footer.append(f" · {snapshot['rejected']} malformed messages ignored", style="yellow")
    if problem is not None:
        return Group(
            Text(f"broker unreachable: {problem} (retrying)", style="bold red"), table, footer
        )
    return Group(table, footer)
