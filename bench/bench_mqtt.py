"""State change -> message at an independent subscriber: p50/p99 latency, with a raw aiomqtt baseline.

Run: `python bench/bench_mqtt.py [N]`; writes bench/results/mqtt.json.
"""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.mqtt.bridge import MqttBridge, MqttSettings  # noqa: E402
from bench.stats import summary_s  # noqa: E402
from tests.mosquitto import MosquittoBroker  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "mqtt.json"
WAIT_S = 10.0


def summary(samples_s: list[float]) -> dict[str, float | int | None]:
    """Latency figures in milliseconds (bench.stats: one percentile method for every bench)."""
    return summary_s(samples_s)


async def measure(
    broker: MosquittoBroker, topic: str, n: int, send: Callable[[int], Awaitable[None]]
) -> list[float]:
    """Time from calling `send(seq)` to the subscriber receiving the payload carrying `seq`."""
    arrived: dict[int, asyncio.Future[float]] = {}
    async with aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5) as sub:
        await sub.subscribe(topic, qos=1, timeout=WAIT_S)

        async def collect() -> None:
            async for message in sub.messages:
                if isinstance(message.payload, bytes) and message.payload:
                    seq = json.loads(message.payload).get("seq")
                    fut = arrived.get(seq) if isinstance(seq, int) else None
                    if fut is not None and not fut.done():
                        fut.set_result(time.perf_counter())

        collector = asyncio.create_task(collect())
        samples = []
        try:
            for seq in range(-20, n):  # negative seqs warm up and are not counted
                fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                arrived[seq] = fut
                started = time.perf_counter()
                await send(seq)
                received = await asyncio.wait_for(fut, WAIT_S)
                if seq >= 0:
                    samples.append(received - started)
        finally:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
    return samples


async def main(n: int) -> dict[str, object]:
    """Run both measurements against one private broker."""
    with MosquittoBroker() as broker:
        base = f"bench/{uuid.uuid4().hex[:8]}"
        async with aiomqtt.Client(
            broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as pub:

            async def raw(seq: int) -> None:
                await pub.publish(f"{base}/raw", json.dumps({"seq": seq}), qos=1, timeout=WAIT_S)

            baseline = await measure(broker, f"{base}/raw", n, raw)

        settings = MqttSettings(
            host=broker.host, port=broker.port, base_topic=base, discovery_prefix=None
        )
        bridge = MqttBridge(settings, "bench")
        task = asyncio.create_task(bridge.run())
        try:
            await bridge.wait_connected(WAIT_S)

            async def state(seq: int) -> None:
                bridge.publish_state("state", {"device_id": "bench", "seq": seq})

            bridged = await measure(broker, f"{base}/bench/state", n, state)
        finally:
            await bridge.close()
            await asyncio.wait_for(task, WAIT_S)
    return {
        "benchmark": "mqtt_state_latency",
        "what": "publish_state() -> message at an independent subscriber, QoS 1, loopback Mosquitto",
        "n": n,
        "bridge": summary(bridged),
        "baseline_raw_aiomqtt": summary(baseline),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "aiomqtt": aiomqtt.__version__ if hasattr(aiomqtt, "__version__") else "unknown",
    }


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    result = asyncio.run(main(count))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
