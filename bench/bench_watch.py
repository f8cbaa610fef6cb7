"""1,000 simulated siblings -> `esim-agent watch --json` sees every one: time after the last publish.

Run: `python bench/bench_watch.py [--devices N] [--runs R]`; writes bench/results/watch.json.

Method (also written into the result): N siblings, each its own MQTT v5 connection with a Last
Will, publish their retained tree (availability, state, modem, layers, health, usage, pool
share: 7 messages, QoS 1) concurrently. `t_last` is when the last PUBACK came back. Then, per
run, three observers start at `t_last`, one after the other:

- `watch_cli`: `esim-agent watch --json` as a child process (interpreter start, imports,
  connect, subscribe, retained burst until its own marker comes back, JSON on stdout): what a
  user or a script gets;
- `watch_inproc`: the same snapshot() in this process (no interpreter start), with where its
  time went: connect, subscribe + marker publish, the retained flood until the marker's echo,
  and of that the Fleet's decoding and the settle (last retained message to the marker's
  echo) (`phases_ms_p50`);
- `baseline_raw`: a bare aiomqtt subscriber on `<base>/#` (QoS 0, MQTT 3.1.1 like watch)
  that stops once it holds all 7N retained topics and N states with this run's marker (it
  knows N, so it needs no quiet period and folds nothing).

A run counts only when the snapshot holds all N devices with this run's `updated_at` marker
and ended on its marker's echo (`settled: "marker"`, not a quiet-period guess). `cli_startup`
is `esim-agent watch --help` (interpreter and imports, no broker), measured in the same run.
Scenarios: `one_broker` (siblings and observers on one Mosquitto) and `bridged` (siblings on a
"van" Mosquitto bridged with config/mosquitto/bridge.conf to a "home" one; observers at home).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.cli.watch import DEFAULT_QUIET_S  # noqa: E402
from agent.mqtt.bridge import MqttSettings  # noqa: E402
from agent.watch.fleet import Fleet  # noqa: E402
from agent.watch.session import snapshot  # noqa: E402
from bench.stats import summary_s  # noqa: E402
from tests.mosquitto import MosquittoBroker  # noqa: E402
from tests.mosquitto_lab import ConfiguredMosquitto  # noqa: E402
from tests.watch_fleet import BASE, device_tree  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "watch.json"
GOAL_S = 2.0
WAIT_S = 60.0
CONNECT_CONCURRENCY = 50


def _tree(device: str, marker: str) -> dict[str, bytes]:
    tree = device_tree(device)
    state = json.loads(tree[f"{BASE}/{device}/state"])
    state["updated_at"] = marker
    tree[f"{BASE}/{device}/state"] = json.dumps(state).encode()
    return tree


class Siblings:
    """N connected simulated devices, each with its own session and Last Will."""

    def __init__(self, broker: MosquittoBroker, n: int) -> None:
        self.names = [f"sib{i:04d}" for i in range(n)]
        self.clients = [
            aiomqtt.Client(
                broker.host,
                broker.port,
                identifier=f"esim-agent-{name}",
                protocol=aiomqtt.ProtocolVersion.V5,
                will=aiomqtt.Will(f"{BASE}/{name}/availability", b"offline", qos=1, retain=True),
                timeout=WAIT_S,
            )
            for name in self.names
        ]

    async def __aenter__(self) -> Siblings:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def connect(client: aiomqtt.Client) -> None:
            async with gate:
                await client.__aenter__()

        await asyncio.gather(*(connect(c) for c in self.clients))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(
            *(c.__aexit__(None, None, None) for c in self.clients), return_exceptions=True
        )

    async def publish_all(self, marker: str) -> float:
        """Every sibling publishes its tree at once; returns the time of the last PUBACK."""

        async def one(client: aiomqtt.Client, name: str) -> None:
            for topic, payload in _tree(name, marker).items():
                await client.publish(topic, payload, qos=1, retain=True, timeout=WAIT_S)

        await asyncio.gather(*(one(c, n) for c, n in zip(self.clients, self.names, strict=True)))
        return time.perf_counter()


def _complete(devices: list[dict[str, Any]], n: int, marker: str) -> bool:
    fresh = [d for d in devices if d["updated_at"] == marker and d["availability"] == "online"]
    return len(fresh) == n


async def watch_cli(broker: MosquittoBroker, n: int, marker: str, t_last: float) -> float:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "watch",
        "--json",
        "--broker",
        f"mqtt://{broker.host}:{broker.port}",
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), WAIT_S)
    elapsed = time.perf_counter() - t_last
    snap = json.loads(out)
    if proc.returncode != 0 or not _complete(snap["devices"], n, marker):
        raise RuntimeError(f"watch --json saw {len(snap['devices'])} devices, not all {n} fresh")
    if snap["settled"] != "marker":
        raise RuntimeError(f"watch --json settled by {snap['settled']}, not its marker")
    return elapsed


PHASES: list[dict[str, float]] = []


async def watch_inproc(broker: MosquittoBroker, n: int, marker: str, t_last: float) -> float:
    settings = MqttSettings(host=broker.host, port=broker.port, base_topic=BASE)
    fleet = Fleet(BASE)
    run = await snapshot(settings, fleet, quiet=DEFAULT_QUIET_S, timeout=WAIT_S)
    elapsed = time.perf_counter() - t_last
    snap = fleet.snapshot(broker="", complete=True)
    if not _complete(snap["devices"], n, marker) or run.settled != "marker":
        raise RuntimeError(f"in-process snapshot saw {len(snap['devices'])} ({run.settled})")
    PHASES.append(
        {
            "connect": run.connect_s,
            "subscribe_and_marker": run.subscribe_s,
            "flood_to_marker_echo": run.flood_s,
            "of_which_fleet_ingest": run.ingest_s,
            "of_which_settle": run.settle_s,
        }
    )
    return elapsed


def cli_startup() -> float:
    """`esim-agent watch --help`: what the CLI costs before it touches the broker."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "agent", "watch", "--help"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return time.perf_counter() - started


async def baseline_raw(broker: MosquittoBroker, n: int, marker: str, t_last: float) -> float:
    """A bare aiomqtt client, same transport choices as watch (QoS 0, MQTT 3.1.1), counting
    the same retained messages: every device's whole tree, the states with this run's marker."""
    per_device = len(device_tree("x"))
    topics: set[str] = set()
    fresh: set[str] = set()
    async with aiomqtt.Client(
        broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V311
    ) as client:
        await client.subscribe(f"{BASE}/#", qos=0, timeout=WAIT_S)
        async with asyncio.timeout(WAIT_S):
            async for message in client.messages:
                topic = message.topic.value
                topics.add(topic)
                payload = message.payload
                if (
                    isinstance(payload, bytes)
                    and topic.endswith("/state")
                    and marker.encode() in payload
                ):
                    fresh.add(topic)
                if len(fresh) == n and len(topics) >= n * per_device:
                    break
    return time.perf_counter() - t_last


def _stats(samples: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = dict(summary_s(samples, 1))
    out["within_goal_every_run"] = all(s <= GOAL_S for s in samples)
    out["samples_ms"] = [round(s * 1000, 1) for s in samples]
    return out


async def scenario(
    publish_to: MosquittoBroker, observe: MosquittoBroker, n: int, runs: int
) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"watch_cli": [], "watch_inproc": [], "baseline_raw": []}
    publish_s: list[float] = []
    startup_s: list[float] = []
    PHASES.clear()
    async with Siblings(publish_to, n) as siblings:
        for run in range(runs):
            for name, observer in (
                ("watch_cli", watch_cli),
                ("watch_inproc", watch_inproc),
                ("baseline_raw", baseline_raw),
            ):
                marker = f"run-{run}-{name}-{time.time_ns()}"
                started = time.perf_counter()
                t_last = await siblings.publish_all(marker)
                publish_s.append(t_last - started)
                samples[name].append(await observer(observe, n, marker, t_last))
            startup_s.append(await asyncio.to_thread(cli_startup))
    out: dict[str, Any] = {name: _stats(values) for name, values in samples.items()}
    out["cli_startup_ms_p50"] = round(float(statistics.median(startup_s)) * 1000, 1)
    out["watch_inproc"]["phases_ms_p50"] = {
        k: round(float(statistics.median(p[k] for p in PHASES)) * 1000, 1) for k in PHASES[0]
    }
    out["publish_all_ms_p50"] = round(float(statistics.median(publish_s)) * 1000, 1)
    return out


def _bridge_lines(home: MosquittoBroker) -> list[str]:
    shipped = (ROOT / "config" / "mosquitto" / "bridge.conf").read_text().splitlines()
    drop = ("address", "remote_username", "remote_password", "bridge_cafile", "bridge_insecure")
    lines = [x for x in shipped if x.strip() and not x.startswith(("#", *drop))]
    lines.insert(lines.index("connection home") + 1, f"address {home.host}:{home.port}")
    return lines


async def _bridge_up(home: MosquittoBroker) -> None:
    async with aiomqtt.Client(home.host, home.port) as c:
        await c.subscribe("bridges/van/state", timeout=WAIT_S)
        async with asyncio.timeout(WAIT_S):
            async for message in c.messages:
                if message.payload == b"1":
                    return


async def main(n: int, runs: int) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "watch_snapshot_1000_siblings",
        "method": (__doc__ or "").strip(),
        "devices": n,
        "messages_per_device": len(device_tree("x")),
        "goal_s": GOAL_S,
        "settled_by": "marker echo",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        # The machine is shared: the load says how much CPU the run had to compete for.
        "loadavg_start": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        root = Path(tmp)
        for sub in ("one", "home", "van"):
            (root / sub).mkdir()
        with ConfiguredMosquitto(root / "one", ["allow_anonymous true"]) as one:
            result["one_broker"] = await scenario(one, one, n, runs)
        with ConfiguredMosquitto(root / "home", ["allow_anonymous true"]) as home:
            lines = ["allow_anonymous true", *_bridge_lines(home)]
            with ConfiguredMosquitto(root / "van", lines) as van:
                await _bridge_up(home)
                result["bridged"] = await scenario(van, home, n, runs)
    result["loadavg_end"] = round(os.getloadavg()[0], 2)
    return result


def run(quick: bool = False) -> dict[str, Any]:
    """Entry point for `python -m bench`; writes bench/results/watch.json."""
    result = asyncio.run(main(1000, 2 if quick else 5))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """p50 of the CLI snapshot on one broker and through the bridge, and the baseline."""
    return {
        "one_broker_cli_p50_ms": result["one_broker"]["watch_cli"]["p50_ms"],
        "bridged_cli_p50_ms": result["bridged"]["watch_cli"]["p50_ms"],
        "one_broker_raw_p50_ms": result["one_broker"]["baseline_raw"]["p50_ms"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    out = asyncio.run(main(args.devices, args.runs))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "method"}, indent=2))
