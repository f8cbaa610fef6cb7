"""docs/benchmarks.md's section for bench/bench_datapath.py (rendered by bench.report)."""

from __future__ import annotations

from typing import Any

Result = dict[str, Any]

MOVERS = {
    "daemon": "`esim-agent run`, which moves the route itself",
    "inprocess": "the agent's parts in the bench's process (`DataPath` + a `LayerMonitor` per "
    "layer; the bench switches on the primary's `down`): the daemon did not drive the data "
    "path when this was run",
}


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _commit(text: str) -> str:
    """`abbreviated hash` and whatever note follows the hash."""
    sha, _, note = text.partition(" ")
    return f"commit `{sha[:12]}`" + (f" {note}" if note else "")


def _row(label: str, s: dict[str, Any] | None) -> str:
    s = s or {}
    cells = [_fmt(s.get(k)) for k in ("n", "p50_ms", "p95_ms", "max_ms")]
    return "| " + " | ".join([label, *cells]) + " |"


def section_datapath(r: Result) -> list[str]:
    """Failover on real interfaces against mwan3track's defaults; probe bytes on the wire."""
    out = [
        "## Traffic follows the layer (`bench/bench_datapath.py`)",
        "",
        "`python -m bench.bench_datapath [--rounds 20] [--agent auto|daemon|inprocess]` (root).",
        "Each mover gets its own lab: an agent namespace and the emulator in `--net netns` mode",
        "(two generic NCM modems, each a veth to an operator namespace holding 198.19.0.1). The",
        "outage is the same everywhere: `link down` on the primary's operator, which blackholes",
        "the upstream while the modem stays registered with its context up. t0 is the emulator's",
        "reply (blackhole in place); the cut lands at a random point of the mover's probe",
        "cadence. Measured from the agent namespace, on a thread of its own: **route** — the",
        "main table's lowest-metric default route (protocol 229 for the agent, static for the",
        "baseline), read every 20 ms, leaves by the failover interface; **connection** — a new",
        "TCP connection to 198.19.0.1:7 is started every 50 ms from t0, and the first that",
        "connects from the failover's address counts (its operator must log that address).",
        "",
        "Baseline in the same run: `bench/mwan3track_baseline.py`, mwan3track's defaults (one",
        "ping a round through the interface, every 10 s, timeout 4 s, down after 5 failed rounds,",
        "up after 5), demoting the primary's default route when it declares it down; links",
        "brought up as netifd would (AT+CGACT, the grant's address). Its rounds are spread over",
        f"{_fmt((r.get('baseline_mwan3track') or {}).get('labs'))} labs that run side by side "
        "with the agent's lab.",
        "",
        "Agent, at the shipped detection defaults (one ICMP probe a layer, interval 5 s,",
        "timeout 1 s; down after 3 failed rounds, confirmations every 0.5 s; modem poll 30 s):",
        f"{MOVERS.get(str(r.get('agent_mover')), str(r.get('agent_mover')))}"
        + (
            f" (code measured: {_commit(str(r['agent_commit']))})."
            if r.get("agent_commit")
            else "."
        ),
        "",
        "| upstream cut → … | n | p50 ms | p95 ms | max ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    agent = r.get("agent") or {}
    base = r.get("baseline_mwan3track") or {}
    out += [
        _row("agent: default route on the failover interface", agent.get("route")),
        _row("agent: new TCP connection through the failover", agent.get("connection")),
        _row("mwan3track defaults: route moved", base.get("route")),
        _row("mwan3track defaults: new TCP connection", base.get("connection")),
    ]
    ours = (agent.get("connection") or {}).get("p95_ms")
    theirs = (base.get("connection") or {}).get("p95_ms")
    if ours and theirs:
        out += [
            "",
            f"p95 from the cut to a working new connection: {_fmt(ours / 1000.0)} s for the agent, "
            f"{_fmt(theirs / 1000.0)} s for mwan3track's defaults ({_fmt(theirs / ours)} times "
            "as long).",
        ]
    pb = r.get("probe_bytes")
    if pb:
        out += [
            "",
            "Probe bytes per layer per day at the shipped defaults, measured on each modem",
            f"interface over an idle {_fmt(pb.get('window_s'))} s window (nothing but the probes,",
            "their replies and ARP; IPv6 off on the lab's links) and extrapolated to 86,400 s:",
            "the interface counters (Ethernet frames, ARP included) and, from a packet socket on",
            "the same interface, the IPv4 frames alone at IP level (frame − 14 B).",
            "",
            "| layer | frames (IPv4 / ARP) | counters: bytes | per day, counters | IPv4 at IP level | "
            "**per day, IPv4 at IP level** |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for layer in ("primary", "failover"):
            x = pb.get(layer) or {}
            c = x.get("counters") or {}
            kinds = x.get("frames_by_kind") or {}
            arp = sum((kinds.get(k) or {}).get("frames", 0) for k in ("arp_tx", "arp_rx"))
            frames = (c.get("rx_packets") or 0) + (c.get("tx_packets") or 0)
            wire = (c.get("rx_bytes") or 0) + (c.get("tx_bytes") or 0)
            out.append(
                f"| {layer} | {frames} ({_fmt(x.get('ipv4_frames'))} / {arp}) | {wire} B "
                f"| {_fmt(x.get('wire_bytes_per_day'))} B | {_fmt(x.get('ipv4_ip_bytes'))} B "
                f"| **{_fmt(x.get('ipv4_ip_bytes_per_day'))} B** |"
            )
        out += [
            "",
            "The arithmetic (docs/health.md): an ICMP round is 28 B out and 28 B back at IP level",
            "(56 B; 84 B as Ethernet frames); 17,280 rounds a day at 5 s: **967,680 B** at IP",
            "level, 1,451,520 B as frames. On an Ethernet-style modem interface (NCM, ECM, RNDIS)",
            "the host also sends frame headers and ARP, as the counters column shows, but those",
            "stay on the USB link (the modem answers ARP itself); the operator carries and bills",
            "IP packets, so the IP-level column is what probing costs on the data plan (a raw-IP",
            "interface, MBIM or QMI, carries nothing else).",
        ]
        window = pb.get("window_s") or 0.0
        rounds = ((pb.get("primary") or {}).get("ipv4_frames") or 0) // 2
        if window:
            out += [
                "",
                f"Measured: {rounds} ICMP rounds on the primary in {_fmt(window)} s, against "
                f"{round(window / 5.0)} at a fixed 5 s. The traffic-aware rule lets small received "
                "amounts add up until they reach `traffic_min_bytes` (1 KiB), so on an idle link "
                "the probes' own replies and ARP skip about one round in twenty; the measured "
                "day is therefore a little below the arithmetic.",
            ]
    idle = r.get("idle_cost")
    if idle:
        d = idle.get("daemon") or {}
        b = idle.get("baseline_bare_asyncio_python") or {}
        out += [
            "",
            "Idle cost of the daemon driving both modems' data paths, over the same window "
            "(bench_daemon's sampler; same-window baseline: a bare asyncio interpreter):",
            "",
            "| process | CPU % of one core | RSS MiB start / end / max |",
            "| --- | --- | --- |",
            f"| esim-agent daemon | {_fmt(d.get('cpu_percent_one_core'))} | "
            f"{_fmt(d.get('rss_mib_start'))} / {_fmt(d.get('rss_mib_end'))} / "
            f"{_fmt(d.get('rss_mib_max'))} |",
            f"| bare asyncio interpreter | {_fmt(b.get('cpu_percent_one_core'))} | "
            f"{_fmt(b.get('rss_mib_start'))} / {_fmt(b.get('rss_mib_end'))} / "
            f"{_fmt(b.get('rss_mib_max'))} |",
        ]
    return out
