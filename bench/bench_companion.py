"""Companion mode: the hub dies (SIGKILL -> Last Will) -> the companion's own profile carries traffic.

Run: `python bench/bench_companion.py [--runs N] [--quick]`, or `python -m bench --only companion`;
writes bench/results/companion.json.

Two real daemons (hw_fixtures/group_lab.py), each with its own emulator, on one Mosquitto with
the shipped ACL and per-device credentials: "phone" on its own modem, "watch" its companion
(first layer the phone, its own profile disabled). Each run, with the group at rest (the watch's
profile disabled and its data path refusing connections):

- t0: SIGKILL to the phone's daemon;
- `to_traffic`: until a TCP connect through the watch's own emulated data path succeeds
  (polled every 10 ms): what a user of the watch waits for;
- baseline in the same run, `to_last_will`: until an independent MQTT subscriber receives the
  phone's Last Will (`availability = offline`): the part no agent can shorten;
- `watch_transition_ms`: the watch daemon's own record of the switch (detected -> verified,
  monotonic clock), its share;
- second baseline, interleaved run by run: a plain local failover on a third device ("solo"):
  its primary modem's link dies (t0) -> TCP through its failover modem, whose radio is off
  while inactive (`radio_down_when_inactive`): detection by its own probes instead of a Will.

Then the phone is restarted and the run ends once the watch has put its profile back to sleep.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.stats import summary_ms  # noqa: E402
from hw_fixtures.group_lab import (  # noqa: E402
    BASE,
    DeviceSpec,
    GroupLab,
    ModemSpec,
    Profile,
    iccid_for,
    own_layer,
    sibling_layer,
)

RESULTS = ROOT / "bench" / "results" / "companion.json"
RUNS = 20  # p95 needs at least 20 samples (bench.stats)
QUICK_RUNS = 3
SEED = 20261206
STEP_TIMEOUT_S = 60.0
POLL_S = 0.01
PHONE = iccid_for(0, 1)
WATCH = iccid_for(1, 1)
SOLO_A = iccid_for(2, 1)
SOLO_B = iccid_for(2, 2)


def specs() -> list[DeviceSpec]:
    return [
        DeviceSpec(
            "phone",
            (ModemSpec("m0", (Profile(PHONE, enabled=True),)),),
            [own_layer("primary", PHONE, "primary")],
        ),
        DeviceSpec(
            "watch",
            (ModemSpec("m0", (Profile(WATCH),)),),
            [sibling_layer("phone-link", "phone", "primary"), own_layer("own", WATCH, "failover")],
        ),
        # The baseline: a plain local failover, primary modem -> a dormant (radio off) one.
        DeviceSpec(
            "solo",
            (
                ModemSpec("m0", (Profile(SOLO_A, enabled=True),)),
                ModemSpec("m1", (Profile(SOLO_B, enabled=True),)),
            ),
            [
                own_layer("primary", SOLO_A, "primary"),
                {**own_layer("failover", SOLO_B, modem="m1"), "radio_down_when_inactive": True},
            ],
        ),
    ]


async def answers(port: int) -> bool:
    """One TCP connect through the emulated data path."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def until_true(
    check: Callable[[], Awaitable[bool]], timeout: float = STEP_TIMEOUT_S
) -> float:
    """Poll an async check until it holds; the monotonic time it first held."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the state lives in other processes
            await asyncio.sleep(POLL_S)
    return time.monotonic()


async def stamped(waiting: Awaitable[None]) -> float:
    """The monotonic time `waiting` finished (run as a task beside the traffic poll)."""
    await waiting
    return time.monotonic()


async def at_rest(lab: GroupLab, since: int, port: int) -> None:
    """Phone up, watch riding on it, the watch's own profile disabled and its path silent."""
    await lab.state(
        "phone",
        lambda s: s["active_layer"] == "primary" and s["connectivity"],
        STEP_TIMEOUT_S,
        since,
    )
    await lab.state(
        "watch",
        lambda s: s["active_layer"] == "phone-link" and s["connectivity"],
        STEP_TIMEOUT_S,
        since,
    )

    async def asleep() -> bool:
        return not await lab["watch"].enabled() and not await answers(port)

    await until_true(asleep)


async def solo_at_rest(lab: GroupLab, since: int, port: int) -> None:
    """The solo device on its primary, its failover modem's radio off (nothing answers)."""
    await lab.state(
        "solo",
        lambda s: s["active_layer"] == "primary" and s["connectivity"],
        STEP_TIMEOUT_S,
        since,
    )

    async def silent() -> bool:
        return not await answers(port)

    await until_true(silent)


async def local_run(lab: GroupLab, port: int, rng: random.Random) -> dict[str, Any]:
    """Baseline: the solo device's primary data path dies -> traffic on its failover modem."""
    assert lab.watcher is not None
    await asyncio.sleep(rng.uniform(0.0, 1.0))
    mark = lab.mark()
    t0 = time.monotonic()
    await lab.cut_data("solo", "m0")
    traffic_at = await until_true(lambda: answers(port))
    event = await lab.watcher.wait_json(
        f"{BASE}/solo/events",
        lambda e: (
            e.get("type") == "transition"
            and e["data"].get("to_layer") == "failover"
            and e["data"].get("outcome") not in (None, "pending")
        ),
        STEP_TIMEOUT_S,
        mark,
    )
    restore = lab.mark()
    await lab.heal_data("solo", "m0")
    await solo_at_rest(lab, restore, port)
    return {
        "to_traffic_ms": round((traffic_at - t0) * 1000, 1),
        "transition_ms": event["data"].get("timings_ms", {}).get("total"),
        "outcome": event["data"]["outcome"],
    }


async def one_run(lab: GroupLab, port: int, rng: random.Random) -> dict[str, Any]:
    assert lab.watcher is not None
    # Dephase from the daemons' probe and poll rounds.
    await asyncio.sleep(rng.uniform(0.0, 1.0))
    mark = lab.mark()
    will = asyncio.create_task(stamped(lab.availability("phone", "offline", STEP_TIMEOUT_S, mark)))
    t0 = time.monotonic()
    await lab.kill("phone")
    traffic_at = await until_true(lambda: answers(port))
    will_at = await will
    event = await lab.watcher.wait_json(
        f"{BASE}/watch/events",
        lambda e: (
            e.get("type") == "transition"
            and e["data"].get("to_layer") == "own"
            and e["data"].get("outcome") is not None
            and e["data"]["outcome"] != "pending"
        ),
        STEP_TIMEOUT_S,
        mark,
    )
    enabled = await lab["watch"].enabled()
    restart_mark = lab.mark()
    lab.restart("phone")
    await at_rest(lab, restart_mark, port)
    return {
        "to_traffic_ms": round((traffic_at - t0) * 1000, 1),
        "to_last_will_ms": round((will_at - t0) * 1000, 1),
        "watch_transition_ms": event["data"].get("timings_ms", {}).get("total"),
        "outcome": event["data"]["outcome"],
        "own_profile_enabled": WATCH in enabled,
    }


async def measure(runs: int, workdir: Path) -> dict[str, Any]:
    lab = GroupLab(workdir, specs())
    rng = random.Random(SEED)
    try:
        await lab.start()
        port = int(lab["watch"].modem_info()["tcp_port"])
        solo_port = int(lab["solo"].modem_info("m1")["tcp_port"])
        await at_rest(lab, 0, port)
        # The failover modem's radio goes down when the layer is left, not at start: one
        # unmeasured failover and failback first.
        await lab.state("solo", lambda s: s["active_layer"] == "primary", STEP_TIMEOUT_S)
        await local_run(lab, solo_port, rng)
        rows: list[dict[str, Any]] = []
        local: list[dict[str, Any]] = []
        for _ in range(runs):
            # Interleaved, so both see the same load on this shared machine.
            rows.append(await one_run(lab, port, rng))
            local.append(await local_run(lab, solo_port, rng))
        local_ok = [r for r in local if r["outcome"] == "switched"]
        ok = [r for r in rows if r["outcome"] == "switched" and r["own_profile_enabled"]]
        agent = [float(r["watch_transition_ms"]) for r in ok if r["watch_transition_ms"]]
        return {
            "benchmark": "companion_takeover",
            "what": "SIGKILL of the phone's daemon (t0) -> TCP through the watch's own profile",
            "runs": runs,
            "switched_runs": len(ok),
            "timers": lab.timers,
            "mqtt_keepalive_s": 5,
            "emulator_reattach_s": 0.3,
            "to_traffic": summary_ms([r["to_traffic_ms"] for r in ok]),
            "baseline_to_last_will": summary_ms([r["to_last_will_ms"] for r in ok]),
            "watch_transition": summary_ms(agent),
            "baseline_local_failover": {
                "what": "solo device: primary modem's link down (t0) -> TCP through its "
                "failover modem (radio off while inactive)",
                "switched_runs": len(local_ok),
                "to_traffic": summary_ms([r["to_traffic_ms"] for r in local_ok]),
                "transition": summary_ms(
                    [float(r["transition_ms"]) for r in local_ok if r["transition_ms"]]
                ),
            },
            "runs_detail": rows,
            "local_runs_detail": local,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        }
    except TimeoutError:
        lab.report(sys.stderr)
        raise
    finally:
        await lab.close()


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The few figures the bench runner prints."""
    return {
        "to_traffic_p50_ms": result["to_traffic"].get("p50_ms"),
        "to_traffic_p95_ms": result["to_traffic"].get("p95_ms"),
        "last_will_p50_ms": result["baseline_to_last_will"].get("p50_ms"),
        "local_failover_p50_ms": result["baseline_local_failover"]["to_traffic"].get("p50_ms"),
    }


def run(quick: bool = False, runs: int | None = None) -> dict[str, Any]:
    """Measure, write bench/results/companion.json, return the result."""
    n = runs if runs is not None else (QUICK_RUNS if quick else RUNS)
    with tempfile.TemporaryDirectory(prefix="bench-companion-") as tmp:
        result = asyncio.run(measure(n, Path(tmp)))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=None, help=f"runs ({RUNS})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} runs")
    args = parser.parse_args(argv)
    result = run(args.quick, args.runs)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_detail")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
